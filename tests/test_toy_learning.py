"""CoDi learns: distil a pretrained unconditional 2-D diffusion model into a conditional few-step
model (paper Algorithm 1 with the eq. 10 μ-blend on an MLP) and measure the samples.

Data: a mixture of four Gaussians (std 0.1) at (±1, ±1); the condition is the component's one-hot
label. The conditional target of label c is N(m_c, 0.1² I), so E‖x − m_c‖² = 0.02 for perfect
samples and ≈ 4 for samples of the whole mixture.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from codi_jax import diffusion
from codi_jax.distill import CoDiLossConfig, ema_update, make_codi_loss

SCHED = diffusion.get_schedule("scaled_linear")
PRED = "v_prediction"
MEANS = jnp.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
GRID = 20


def sample_data(rng, n):
    k1, k2 = jax.random.split(rng)
    label = jax.random.randint(k1, (n,), 0, 4)
    x = MEANS[label] + 0.1 * jax.random.normal(k2, (n, 2))
    return x, jax.nn.one_hot(label, 4)


def time_features(model_time):
    freqs = jnp.exp(jnp.linspace(0.0, jnp.log(100.0), 8))
    angles = (model_time / 1000.0)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def dense_init(rng, n_in, n_out):
    return {"w": jax.random.normal(rng, (n_in, n_out)) / np.sqrt(n_in), "b": jnp.zeros(n_out)}


def init_teacher(rng, width=128):
    k = jax.random.split(rng, 3)
    return {"l1": dense_init(k[0], 2 + 16, width), "l2": dense_init(k[1], width, width),
            "out": dense_init(k[2], width, 2)}


def teacher_forward(p, z, model_time, first_layer_blend=None):
    h = jax.nn.silu(jnp.concatenate([z, time_features(model_time)], -1) @ p["l1"]["w"] + p["l1"]["b"])
    if first_layer_blend is not None:
        h = first_layer_blend(h)
    h = jax.nn.silu(h @ p["l2"]["w"] + p["l2"]["b"])
    return h @ p["out"]["w"] + p["out"]["b"]


def adapt(teacher_params, rng):
    """eq. 10 on the MLP: the conditional encoder is a copy of the first layer reading c, blended as
    (1 − μ) h_θ(z_t) + μ h_η(c) with μ = 0, so the adapted model starts as the teacher."""
    enc = {"w": jnp.concatenate([0.1 * jax.random.normal(rng, (4, 128)), teacher_params["l1"]["w"][2:]]),
           "b": teacher_params["l1"]["b"]}
    return {"unet": teacher_params, "enc": enc, "mu": jnp.zeros(())}


def student_model(p, z, model_time, cond, context):
    h_c = jax.nn.silu(jnp.concatenate([cond, time_features(model_time)], -1) @ p["enc"]["w"] + p["enc"]["b"])
    return teacher_forward(p["unet"], z, model_time, lambda h: (1 - p["mu"]) * h + p["mu"] * h_c)


def train(loss_fn, params, steps, lr, rng, ema=None):
    opt = optax.adam(lr)

    def step(carry, key):
        params, target, opt_state = carry
        k_data, k_loss = jax.random.split(key)
        x, c = sample_data(k_data, 256)
        batch = {"x": x, "cond": c}
        if ema is None:
            grads = jax.grad(lambda p: loss_fn(p, batch, k_loss)[0])(params)
        else:
            grads = jax.grad(lambda p: loss_fn(p, target, batch, k_loss)[0])(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        target = params if ema is None else ema_update(target, params, ema)
        return (params, target, opt_state), None

    (params, target, _), _ = jax.lax.scan(step, (params, params, opt.init(params)),
                                          jax.random.split(rng, steps))
    return params, target


def conditional_error(denoise_for, num_steps, rng):
    """E‖x − m_c‖² of samples drawn for 512 random labels."""
    k1, k2 = jax.random.split(rng)
    label = jax.random.randint(k1, (512,), 0, 4)
    z = jax.random.normal(k2, (512, 2))
    x = diffusion.codi_sample(denoise_for(jax.nn.one_hot(label, 4)), z, SCHED, num_steps, GRID)
    return float(jnp.mean(jnp.sum((x - MEANS[label]) ** 2, -1)))


def test_codi_distils_an_unconditional_teacher_into_a_few_step_conditional_model():
    rng = jax.random.PRNGKey(0)
    k_init, k_pre, k_adapt, k_distil, k_eval = jax.random.split(rng, 5)

    teacher_loss = diffusion.make_diffusion_loss(
        lambda p, z, mt, c, ctx: teacher_forward(p, z, mt), SCHED, PRED)
    teacher, _ = jax.jit(lambda p, k: train(teacher_loss, p, 3000, 2e-3, k))(init_teacher(k_init), k_pre)

    def teacher_denoiser(cond):
        return diffusion.make_denoiser(lambda z, mt: teacher_forward(teacher, z, mt), SCHED, PRED)

    def student_denoiser(params):
        return lambda cond: diffusion.make_denoiser(
            lambda z, mt: student_model(params, z, mt, cond, None), SCHED, PRED)

    # The teacher has learnt the (unconditional) mixture: its 20-step samples sit on the modes.
    z = jax.random.normal(k_eval, (2048, 2))
    x = diffusion.codi_sample(teacher_denoiser(None), z, SCHED, GRID, GRID)
    nearest = jnp.min(jnp.sum((x[:, None] - MEANS[None]) ** 2, -1), axis=1)
    assert float(jnp.mean(nearest)) < 0.1

    student0 = adapt(teacher, k_adapt)
    loss = make_codi_loss(student_model, SCHED, PRED, CoDiLossConfig(grid=GRID))
    student, _ = jax.jit(lambda p, k: train(loss, p, 2000, 1e-3, k, ema=0.95))(student0, k_distil)

    before = {n: conditional_error(student_denoiser(student0), n, k_eval) for n in (1, 4)}
    teacher_4 = conditional_error(teacher_denoiser, 4, k_eval)
    after = {n: conditional_error(student_denoiser(student), n, k_eval) for n in (1, 4)}
    print(f"E|x - m_c|^2: before {before}, teacher@4 {teacher_4:.3f}, after {after}, mu {float(student['mu']):.3f}")
    for n in (1, 4):
        assert after[n] < 0.25 * before[n], (n, after, before)
        assert after[n] < 0.25 * teacher_4, (n, after, teacher_4)
        assert after[n] < 0.3
    assert abs(float(student["mu"])) > 1e-3  # the conditional encoder is actually used
