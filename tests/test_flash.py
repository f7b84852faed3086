"""Flash Diffusion (codi_jax/distill/flash.py): the timestep distribution, the teacher target, the
gradient flow between generator, discriminator and teacher, DMD on a 1-D Gaussian, and learning
on the 2-D mixture of tests/test_toy_learning.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from codi_jax import diffusion
from codi_jax.distill import FlashLossConfig, make_flash_losses
from codi_jax.distill.flash import dmd_surrogate, guided_denoiser, phase_betas, teacher_solution, timestep_pmf
from codi_jax.models.discriminator import LatentDiscriminator
from tests.test_toy_learning import MEANS, PRED, SCHED, init_teacher, sample_data, teacher_forward, train


@pytest.mark.parametrize("distribution", ["mixture", "uniform", "gaussian", "sharp"])
@pytest.mark.parametrize("k", [16, 32])
def test_timestep_pmf_sums_to_one_at_every_phase(distribution, k):
    cfg = FlashLossConfig(num_timesteps=k, distribution=distribution)
    for progress in np.linspace(0.0, 1.0, 11):
        pmf = np.asarray(timestep_pmf(cfg, progress))
        assert pmf.shape == (k,) and np.all(pmf >= 0)
        np.testing.assert_allclose(pmf.sum(), 1.0, atol=1e-6)


def test_timestep_phases_follow_the_schedule():
    cfg = FlashLossConfig(num_timesteps=32)
    t = np.arange(1, 33) / 32
    # Phase p is in force on [phase_ends[p - 1], phase_ends[p]).
    for progress, phase in [(0.0, 0), (0.24, 0), (0.25, 1), (0.6, 2), (0.99, 3), (1.0, 3)]:
        np.testing.assert_array_equal(phase_betas(cfg, progress), np.float32(cfg.phase_betas[phase]))
    warm = np.asarray(timestep_pmf(cfg, 0.0))
    # Warm-up: the mass sits on t = ¼ and ½ only (eq. 3 with β = (½, ½, 0, 0)).
    assert warm[t > 0.6].sum() < 1e-6
    np.testing.assert_allclose(warm[7], warm[15], rtol=1e-6)
    assert warm[7] == warm.max()
    late = np.asarray(timestep_pmf(cfg, 0.9))
    assert late.argmax() == 31                      # the mass has moved to full noise
    # The four inference times stay over-sampled: each is a local maximum of π.
    for i in (7, 15, 23):
        assert late[i] > late[i - 1] and late[i] > late[i + 1]
    # The Gaussians' σ = √(0.5/K²): a neighbour gets e^{-1} of its mode's density.
    sharp_neighbour = np.exp(-1.0)
    mode_only = dataclasses.replace(cfg, phase_betas=((0, 0, 0, 1.0),), phase_ends=(1.0,))
    p = np.asarray(timestep_pmf(mode_only, 0.5))
    np.testing.assert_allclose(p[30] / p[31], sharp_neighbour, rtol=1e-5)
    sharp = np.asarray(timestep_pmf(dataclasses.replace(cfg, distribution="sharp"), 0.9))
    assert set(np.flatnonzero(sharp)) == {7, 15, 23, 31}


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="num_timesteps"):
        FlashLossConfig(num_timesteps=30)
    with pytest.raises(ValueError, match="distribution"):
        FlashLossConfig(distribution="beta")
    with pytest.raises(ValueError, match="phase_betas"):
        FlashLossConfig(phase_betas=((1, 0, 0),), phase_ends=(1.0,))
    with pytest.raises(ValueError, match="uncond_fn"):
        make_flash_losses(None, None, None, None, SCHED, PRED, FlashLossConfig(guidance_max=3.0))


def _toy_teacher():
    return init_teacher(jax.random.PRNGKey(3), width=32)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp"])
def test_teacher_target_equals_the_sampler_run_for_k_steps(solver):
    teacher = _toy_teacher()
    denoise = diffusion.make_denoiser(lambda z, mt: teacher_forward(teacher, z, mt), SCHED, PRED)
    cfg = FlashLossConfig(teacher_steps=5, teacher_solver=solver)
    z = jax.random.normal(jax.random.PRNGKey(0), (6, 2))
    run = diffusion.ddim_sample if solver == "ddim" else diffusion.dpm_solver_pp_2m
    got = teacher_solution(denoise, z, jnp.ones((6,)), SCHED, cfg)
    np.testing.assert_allclose(got, run(denoise, z, SCHED, diffusion.timesteps(5)), atol=1e-6)
    # Per-example start times: each example follows its own path t·(1 − k/n).
    t = jnp.array([1.0, 0.75, 0.5, 0.25, 0.125, 0.0625])
    got = teacher_solution(denoise, z, t, SCHED, cfg)
    for i in range(6):
        ts = float(t[i]) * diffusion.timesteps(5)
        np.testing.assert_allclose(got[i:i + 1], run(denoise, z[i:i + 1], SCHED, ts), atol=1e-5)


def _toy_losses(teacher, cfg, disc_width=16):
    disc = LatentDiscriminator(channels=disc_width, num_layers=1, groups=4)

    def features(z, model_time, context):   # the frozen teacher's "encoder": its first layer
        from tests.test_toy_learning import time_features
        h = jax.nn.silu(jnp.concatenate([z, time_features(model_time)], -1) @ teacher["l1"]["w"]
                        + teacher["l1"]["b"])
        return h[:, None, None, :]

    def disc_fn(p, f):
        return disc.apply(p, f)

    def model(p, z, mt, cond, ctx):
        return teacher_forward(p, z, mt)

    losses = make_flash_losses(model, lambda z, mt, c, ctx: teacher_forward(teacher, z, mt), features,
                               disc_fn, SCHED, PRED, cfg)
    disc_params = disc.init(jax.random.PRNGKey(1), features(jnp.zeros((1, 2)), jnp.zeros((1,)), None))
    return losses, disc_params


def test_each_update_moves_only_its_own_parameters():
    teacher = _toy_teacher()
    cfg = FlashLossConfig(adv_weight=1.0, dmd_weight=1.0, teacher_steps=2)
    losses, disc = _toy_losses(teacher, cfg)
    student = jax.tree.map(lambda a: a + 0.01, teacher)
    x, _ = sample_data(jax.random.PRNGKey(0), 16)
    batch, key = {"x": x}, jax.random.PRNGKey(5)

    g_student, g_disc = jax.grad(lambda p, d: losses.generator(p, d, batch, key, 0.5)[0], argnums=(0, 1))(student, disc)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(g_disc))
    assert any(float(jnp.abs(a).max()) > 0.0 for a in jax.tree.leaves(g_student))
    d_disc, d_student = jax.grad(lambda d, p: losses.discriminator(d, p, batch, key, 0.5)[0], argnums=(0, 1))(disc, student)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(d_student))
    assert any(float(jnp.abs(a).max()) > 0.0 for a in jax.tree.leaves(d_disc))

    # The teacher is frozen: its parameters, passed in as an argument, get no gradient.
    def generator_through_teacher(t_params):
        ls = make_flash_losses(lambda p, z, mt, c, ctx: teacher_forward(p, z, mt),
                               lambda z, mt, c, ctx: teacher_forward(t_params, z, mt),
                               lambda z, mt, ctx: z[:, None, None, :], lambda p, f: jnp.mean(f, (1, 2, 3)),
                               SCHED, PRED, cfg)
        return ls.generator(student, {}, batch, key, 0.5)[0]

    g_teacher = jax.grad(generator_through_teacher)(teacher)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(g_teacher))


def test_dmd_moves_a_gaussian_student_toward_the_teacher():
    """1-D data N(m, s²): the posterior mean at z_t = α x + σ ε is m + αs²/(α²s² + σ²)(z − αm).
    The student generates θ + s·n and is its own fake score; DMD's gradient pulls θ to m."""
    s, m = 0.5, 2.0

    def posterior_mean(mean, z, t):
        a, sig = SCHED.alpha(t), SCHED.sigma(t)
        return mean + a * s**2 / (a**2 * s**2 + sig**2) * (z - a * mean)

    def loss(theta, key):
        k_n, k_t, k_e = jax.random.split(key, 3)
        x_hat = theta + s * jax.random.normal(k_n, (256, 1))
        t = jax.random.uniform(k_t, (256,), minval=0.02, maxval=1.0)[:, None]
        z = SCHED.alpha(t) * x_hat + SCHED.sigma(t) * jax.random.normal(k_e, (256, 1))
        x_fake = posterior_mean(jax.lax.stop_gradient(theta), z, t)
        return jnp.mean(dmd_surrogate(x_hat, x_fake, posterior_mean(m, z, t)))

    theta = jnp.asarray(-1.0)
    for i in range(200):
        theta = theta - 0.05 * jax.grad(loss)(theta, jax.random.PRNGKey(i))
    assert abs(float(theta) - m) < 0.1, float(theta)


def energy_distance(a, b):
    d = lambda u, v: jnp.mean(jnp.linalg.norm(u[:, None] - v[None], axis=-1))
    return float(2 * d(a, b) - d(a, a) - d(b, b))


def test_flash_samples_are_closer_to_the_teacher_than_its_own_few_step_ddim():
    rng = jax.random.PRNGKey(0)
    k_init, k_pre, k_flash, k_eval = jax.random.split(rng, 4)
    teacher_loss = diffusion.make_diffusion_loss(
        lambda p, z, mt, c, ctx: teacher_forward(p, z, mt), SCHED, PRED)
    teacher, _ = jax.jit(lambda p, k: train(teacher_loss, p, 3000, 2e-3, k))(init_teacher(k_init), k_pre)

    cfg = FlashLossConfig(num_timesteps=16, teacher_steps=16, adv_weight=0.1, dmd_weight=0.1)
    losses, disc0 = _toy_losses(teacher, cfg)
    steps = 1500
    g_opt, d_opt = optax.adam(1e-3), optax.adam(cfg.disc_lr)

    def step(carry, inputs):
        params, disc, g_state, d_state = carry
        i, key = inputs
        k_data, k_loss = jax.random.split(key)
        batch = {"x": sample_data(k_data, 256)[0]}
        progress = i / steps
        g = jax.grad(lambda p: losses.generator(p, disc, batch, k_loss, progress)[0])(params)
        upd, g_state = g_opt.update(g, g_state, params)
        params = optax.apply_updates(params, upd)
        d = jax.grad(lambda q: losses.discriminator(q, params, batch, k_loss, progress)[0])(disc)
        upd, d_state = d_opt.update(d, d_state, disc)
        return (params, optax.apply_updates(disc, upd), g_state, d_state), None

    init = (teacher, disc0, g_opt.init(teacher), d_opt.init(disc0))
    (student, _, _, _), _ = jax.jit(lambda c, k: jax.lax.scan(
        step, c, (jnp.arange(steps, dtype=jnp.float32), jax.random.split(k, steps))))(init, k_flash)

    z = jax.random.normal(k_eval, (1024, 2))
    teacher_denoise = diffusion.make_denoiser(lambda z, mt: teacher_forward(teacher, z, mt), SCHED, PRED)
    student_denoise = diffusion.make_denoiser(lambda z, mt: teacher_forward(student, z, mt), SCHED, PRED)
    reference = diffusion.ddim_sample(teacher_denoise, z, SCHED, diffusion.timesteps(50))
    nearest = jnp.min(jnp.sum((reference[:, None] - MEANS[None]) ** 2, -1), axis=1)
    assert float(jnp.mean(nearest)) < 0.1               # the teacher knows the mixture

    z2 = jax.random.normal(jax.random.PRNGKey(9), (1024, 2))
    scores = {}
    for n in (1, 4):
        ddim = diffusion.ddim_sample(teacher_denoise, z2, SCHED, diffusion.timesteps(n))
        flash = diffusion.consistency_sample(student_denoise, z2, SCHED, diffusion.timesteps(n, cfg.num_timesteps),
                                             jax.random.PRNGKey(n))
        scores[n] = (energy_distance(flash, reference), energy_distance(ddim, reference))
    print("energy distance to the teacher's 50-step samples (flash, teacher DDIM):", scores)
    for n, (flash, ddim) in scores.items():
        assert flash < 0.5 * ddim, (n, scores)


def test_guided_teacher_target_moves_samples_toward_the_labelled_component():
    """Flash's teacher with classifier-free guidance (w ~ U[w_min, w_max], x̂^w = (1 + w) x̂_c − w x̂_∅):
    on the 2-D mixture, a conditional teacher trained with label dropout moves its targets further
    out along the labelled component's direction at w = 3 than at w = 0 (guidance extrapolates away
    from the unconditional mixture, centred at 0); swapped branches would pull them inward."""
    from tests.test_toy_learning import dense_init, time_features

    def init(rng, width=128):
        k = jax.random.split(rng, 3)
        return {"l1": dense_init(k[0], 2 + 16 + 4, width), "l2": dense_init(k[1], width, width),
                "out": dense_init(k[2], width, 2)}

    def forward(p, z, model_time, cond, context=None):
        h = jax.nn.silu(jnp.concatenate([z, time_features(model_time), cond], -1) @ p["l1"]["w"] + p["l1"]["b"])
        h = jax.nn.silu(h @ p["l2"]["w"] + p["l2"]["b"])
        return h @ p["out"]["w"] + p["out"]["b"]

    base = diffusion.make_diffusion_loss(forward, SCHED, PRED)

    def loss(p, batch, key):   # label dropout: a fifth of the examples see the zero condition
        k_drop, k_loss = jax.random.split(key)
        keep = jax.random.bernoulli(k_drop, 0.8, (batch["x"].shape[0], 1))
        return base(p, {"x": batch["x"], "cond": batch["cond"] * keep}, k_loss)

    teacher, _ = jax.jit(lambda p, k: train(loss, p, 3000, 2e-3, k))(init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))

    label = jnp.arange(512) % 4
    cond = jax.nn.one_hot(label, 4)
    z = jax.random.normal(jax.random.PRNGKey(2), (512, 2))
    t = jnp.ones((512,))
    projection = {}
    for w in (0.0, 3.0):
        denoise = guided_denoiser(lambda zz, mt, c, ctx: forward(teacher, zz, mt, c), SCHED, PRED, cond, None,
                                  jnp.full((512,), w), lambda c, ctx: (jnp.zeros_like(c), ctx))
        target = teacher_solution(denoise, z, t, SCHED, FlashLossConfig(teacher_steps=8))
        # The targets' coordinate along their label's mean (1 at the component's centre).
        projection[w] = float(jnp.mean(jnp.sum(target * MEANS[label], -1) / 2.0))
    print("projection on the labelled component's mean at w = 0, 3:", projection)
    assert abs(projection[0.0] - 1.0) < 0.1       # unguided: on the component
    assert projection[3.0] > projection[0.0] + 0.05   # guided: further out, away from the others
