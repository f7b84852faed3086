"""The baselines' objectives: consistency distillation (CM) and guided/progressive distillation
(GD). Exactness on point-mass data, gradient flow, evaluation counts, the rounds driver and a toy
learning test of progressive distillation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_codi_loss import EXACT, M, SCHED, point_mass_model
from test_toy_learning import init_teacher, sample_data, teacher_forward, train

from codi_jax import diffusion
from codi_jax.distill import codi
from codi_jax.distill.consistency import CMLossConfig, consistency_function, make_cm_denoiser, \
    make_cm_loss
from codi_jax.diffusion.guidance import init_w_conditioned, w_conditioned
from codi_jax.distill.progressive import ProgressiveLossConfig, make_guided_stage_one_loss, \
    make_progressive_loss, progressive_distillation, two_step_target, with_guidance_weight


def _batch(n=8, cond=0.0):
    return {"x": jnp.broadcast_to(M, (n, 4)), "cond": jnp.full((n, 4), cond)}


def _teacher(prediction_type, params=EXACT):
    model = point_mass_model(prediction_type)
    return lambda z, mt, cond, ctx: model(params, z, mt, cond, ctx)


PERTURBED = {"m": M + 0.2, "w": EXACT["w"], "k": 0.3}


# ----------------------------------------------------------------------------------------- CM


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
@pytest.mark.parametrize("kind", ["l2", "pseudo_huber"])
def test_cm_exact_student_and_teacher_give_zero_loss(prediction_type, kind):
    model = point_mass_model(prediction_type)
    cfg = CMLossConfig(grid=20, distance=kind)
    loss = make_cm_loss(model, _teacher(prediction_type), SCHED, prediction_type, cfg)
    for seed in range(3):
        rng = jax.random.PRNGKey(seed)
        value, _ = loss(EXACT, EXACT, _batch(), rng)
        # c_skip(t ≥ 1/N) ≈ 1e-6, so the exact x̂ = m is exact up to that: (1e-6)² scale.
        assert float(value) < 1e-9, (seed, float(value))
        assert float(loss(PERTURBED, PERTURBED, _batch(), rng)[0]) > 1e-6
    # A wrong teacher: the constant student x̂ = m is self-consistent at s > 0 whatever ẑ_s is, but at
    # s = 0 the boundary condition makes the target the teacher's last DDIM step, m + 1.
    wrong = make_cm_loss(model, _teacher(prediction_type, {"m": M + 1.0, "w": EXACT["w"]}), SCHED,
                         prediction_type, dataclasses.replace(cfg, grid=4))
    assert float(wrong(EXACT, EXACT, _batch(64), jax.random.PRNGKey(0))[0]) > 1e-2


def test_cm_boundary_condition_and_denoiser():
    """f(z, 0) = z whatever the network says; for t on the grid f ≈ the network's x̂."""
    cfg = CMLossConfig()
    z = jax.random.normal(jax.random.PRNGKey(0), (3, 4))
    garbage = jnp.full((3, 4), 7.0)
    np.testing.assert_allclose(consistency_function(garbage, z, jnp.zeros(3), SCHED, "sample", cfg), z)
    t = jnp.full((3,), 0.5)
    np.testing.assert_allclose(consistency_function(garbage, z, t, SCHED, "sample", cfg), garbage,
                               rtol=1e-5, atol=1e-5)
    model = point_mass_model("epsilon")
    denoise = make_cm_denoiser(lambda zz, mt: model(PERTURBED, zz, mt, jnp.zeros_like(zz), None),
                               SCHED, "epsilon", cfg)
    x_hat, eps_hat = denoise(z, jnp.zeros(()))
    np.testing.assert_allclose(x_hat, z)
    assert bool(jnp.all(jnp.isfinite(eps_hat)))


def test_cm_gradients_reach_online_params_only():
    model = point_mass_model("v_prediction")
    loss = make_cm_loss(model, _teacher("v_prediction"), SCHED, "v_prediction", CMLossConfig(grid=10))
    online = {"m": M + 0.1, "w": jnp.full((1, 4), 0.5)}
    target = {"m": M - 0.1, "w": jnp.full((1, 4), 2.0)}
    batch = _batch(cond=1.0)
    g_online, g_target = jax.grad(lambda o, t: loss(o, t, batch, jax.random.PRNGKey(3))[0],
                                  argnums=(0, 1))(online, target)
    assert all(float(jnp.abs(g).max()) > 1e-4 for g in jax.tree.leaves(g_online))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_target))


def _count_calls(make_loss, call_loss):
    calls = []
    model = point_mass_model("epsilon")

    def student(*args):
        calls.append("student")
        return model(*args)

    def teacher(z, mt, cond, ctx):
        calls.append("teacher")
        return model(EXACT, z, mt, cond, ctx)

    loss = make_loss(student, teacher)
    jax.make_jaxpr(jax.value_and_grad(lambda p: call_loss(loss, p)[0]))(EXACT)
    return calls.count("student"), calls.count("teacher")


def test_evaluations_per_step():
    rng = jax.random.PRNGKey(0)
    cm = _count_calls(lambda s, t: make_cm_loss(s, t, SCHED, "epsilon"),
                      lambda loss, p: loss(p, EXACT, _batch(), rng))
    assert cm == (2, 1)
    gd = _count_calls(lambda s, t: make_progressive_loss(s, t, SCHED, "epsilon", 4),
                      lambda loss, p: loss(p, _batch(), rng))
    assert gd == (1, 2)
    stage_one = _count_calls(
        lambda s, t: make_guided_stage_one_loss(lambda p, z, mt, c, ctx: s(p, z, mt, c["cond"], ctx), t,
                                                lambda c, ctx: (jnp.zeros_like(c), ctx), SCHED, "epsilon"),
        lambda loss, p: loss(p, _batch(), rng))
    assert stage_one == (1, 2)


def test_cm_config_errors():
    with pytest.raises(ValueError, match="distance"):
        CMLossConfig(distance="l3")
    with pytest.raises(ValueError, match="unknown keys.*'lr'"):
        CMLossConfig.from_mapping({"grid": 10, "lr": 1.0})
    assert CMLossConfig.from_mapping({"weighting": "inverse_step"}).weighting == "inverse_step"
    loss = make_cm_loss(point_mass_model("epsilon"), _teacher("epsilon"), SCHED, "epsilon",
                        CMLossConfig(weighting="inverse_step"))
    value = float(loss(PERTURBED, PERTURBED, _batch(), jax.random.PRNGKey(0))[0])
    assert np.isfinite(value) and value > 0


# ------------------------------------------------------------------------------- progressive


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
@pytest.mark.parametrize("student_steps", [1, 4, 16])
def test_progressive_exact_teacher_and_student_give_zero_loss(prediction_type, student_steps):
    model = point_mass_model(prediction_type)
    loss = make_progressive_loss(model, _teacher(prediction_type), SCHED, prediction_type, student_steps)
    for seed in range(3):
        rng = jax.random.PRNGKey(seed)
        value, metrics = loss(EXACT, _batch(), rng)
        assert float(metrics["x_mse"]) < 1e-9 and float(value) < 1e-6, (seed, metrics)
        assert float(loss(PERTURBED, _batch(), rng)[1]["x_mse"]) > 1e-3


def test_two_step_target_is_what_one_student_step_must_predict():
    """With a non-linear teacher, one DDIM step t → t'' from z_t with x̂ = x̃ lands exactly where the
    teacher's two DDIM steps land, and x̃ differs from the teacher's own one-step x̂."""
    model = point_mass_model("v_prediction")
    teacher = lambda z, t: diffusion.to_x_eps(model(PERTURBED, z, SCHED.model_time(t), 0.0, None), z,
                                              SCHED.alpha(t), SCHED.sigma(t), "v_prediction")
    z_t = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    t, t_mid, t_end = (jnp.full((5,), v) for v in (0.75, 0.625, 0.5))
    x_tilde = two_step_target(lambda z, tt: teacher(z, tt)[0], z_t, t, t_mid, t_end, SCHED)
    two = diffusion.ddim_sample(lambda z, tt: teacher(z, jnp.full((5,), tt)), z_t, SCHED,
                                np.array([0.75, 0.625, 0.5]))
    eps_tilde = (z_t - SCHED.alpha(t)[:, None] * x_tilde) / SCHED.sigma(t)[:, None]
    one = diffusion.ddim_update(x_tilde, eps_tilde, SCHED.alpha(t_end), SCHED.sigma(t_end))
    np.testing.assert_allclose(one, two, atol=1e-5)
    assert float(jnp.max(jnp.abs(x_tilde - teacher(z_t, t)[0]))) > 1e-3


def test_progressive_gradient_reaches_the_student_only():
    model = point_mass_model("epsilon")

    def f(params, teacher_params):
        teacher = lambda z, mt, c, ctx: model(teacher_params, z, mt, c, ctx)
        return make_progressive_loss(model, teacher, SCHED, "epsilon", 2)(params, _batch(cond=1.0),
                                                                            jax.random.PRNGKey(1))[0]

    g_student, g_teacher = jax.grad(f, argnums=(0, 1))(PERTURBED, EXACT)
    assert all(float(jnp.abs(g).max()) > 1e-4 for g in jax.tree.leaves(g_student))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_teacher))


def test_progressive_driver_chains_rounds():
    seen = []

    def train_round(loss_fn, init_params, steps):
        value, _ = loss_fn(init_params, _batch(), jax.random.PRNGKey(0))
        seen.append((float(init_params["m"][0, 0]), steps, float(value)))
        # The "trained" student: its teacher's params shifted, so the chain is visible.
        return {**init_params, "m": init_params["m"] + 1.0}

    model = point_mass_model("epsilon")
    rounds = progressive_distillation(model, EXACT, SCHED, "epsilon", train_round, teacher_steps=16,
                                      target_steps=2, steps_per_round=[10, 20, 30])
    assert [(r.teacher_steps, r.student_steps) for r in rounds] == [(16, 8), (8, 4), (4, 2)]
    assert [s for _, s, _ in seen] == [10, 20, 30]
    np.testing.assert_allclose([m for m, _, _ in seen], float(M[0, 0]) + np.arange(3.0))
    # Each round's student starts as its own teacher: the loss at initialisation is zero.
    assert max(v for _, _, v in seen) < 1e-6
    assert float(rounds[-1].params["m"][0, 0]) == pytest.approx(float(M[0, 0]) + 3.0)
    with pytest.raises(ValueError, match="teacher_steps"):
        progressive_distillation(model, EXACT, SCHED, "epsilon", train_round, teacher_steps=12,
                                 target_steps=2, steps_per_round=1)
    with pytest.raises(ValueError, match="steps_per_round"):
        progressive_distillation(model, EXACT, SCHED, "epsilon", train_round, teacher_steps=8,
                                 target_steps=2, steps_per_round=[1])


# ------------------------------------------------------------------------ stage one (guidance)


def test_guided_stage_one_regresses_onto_the_guided_teacher():
    """Teacher x̂_c = m + cond, x̂_∅ = m (cond dropped to 0) ⇒ x̂^w = m + (1 + w)·cond. A student that
    reads w and outputs exactly that has zero loss; one that ignores w does not."""
    def student(params, z, mt, cond, ctx):
        t = (mt + 1.0) / 1000.0
        a, s = SCHED.alpha(t)[:, None], SCHED.sigma(t)[:, None]
        x_hat = params["m"] + params["w"] * (1.0 + cond["w"][:, None]) * cond["cond"]
        return (z - a * x_hat) / s   # ε-prediction

    teacher = _teacher("epsilon")
    uncond = lambda c, ctx: (jnp.zeros_like(c), ctx)
    cfg = ProgressiveLossConfig(w_min=1.0, w_max=6.0)
    loss = make_guided_stage_one_loss(student, teacher, uncond, SCHED, "epsilon", cfg)
    batch = _batch(cond=0.5)
    value, metrics = loss(EXACT, batch, jax.random.PRNGKey(0))
    assert float(metrics["x_mse"]) < 1e-9 and 1.0 <= float(metrics["w"]) <= 6.0
    ignores_w = lambda p, z, mt, c, ctx: point_mass_model("epsilon")(p, z, mt, c["cond"], ctx)
    loss = make_guided_stage_one_loss(ignores_w, teacher, uncond, SCHED, "epsilon", cfg)
    assert float(loss(EXACT, batch, jax.random.PRNGKey(0))[1]["x_mse"]) > 0.1


def test_w_conditioned_model_starts_as_the_teacher_and_learns_w():
    model = point_mass_model("epsilon")
    guided = w_conditioned(model)
    params = init_w_conditioned(EXACT, channels=4)
    z = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    mt = jnp.full((8,), 499.0)
    c = jnp.full((8, 4), 0.3)
    w = jnp.linspace(0.0, 8.0, 8)
    np.testing.assert_allclose(guided(params, z, mt, {"cond": c, "w": w}, None), model(EXACT, z, mt, c, None))
    # Stage one with w > 0: the guided target differs from the conditional one, and the gradient
    # reaches the (zero-initialised) w embedding.
    loss = make_guided_stage_one_loss(guided, _teacher("epsilon"), lambda cc, ctx: (jnp.zeros_like(cc), ctx),
                                      SCHED, "epsilon", ProgressiveLossConfig(w_min=2.0, w_max=8.0))
    grads = jax.grad(lambda p: loss(p, _batch(cond=0.3), jax.random.PRNGKey(0))[0])(params)
    assert float(jnp.abs(grads["w_embed"]["kernel"]).max()) > 1e-4
    moved = {**params, "w_embed": {"kernel": params["w_embed"]["kernel"] - grads["w_embed"]["kernel"]}}
    out = guided(moved, z, mt, {"cond": c, "w": w}, None)
    assert float(jnp.abs(out[0] - out[-1]).max()) > 1e-4   # the output now depends on w
    # Into the text context instead of the condition.
    ctx_model = lambda p, zz, m, cc, ctx: model(p, zz, m, cc, None) + ctx.sum(axis=1)
    ctx_guided = w_conditioned(ctx_model, into="context")
    ctx = jnp.zeros((8, 3, 4))
    np.testing.assert_allclose(ctx_guided(params, z, mt, {"cond": c, "w": w}, ctx), ctx_model(EXACT, z, mt, c, ctx))
    # Stage-two batches carry w inside cond, so the progressive loss passes it through untouched.
    staged = with_guidance_weight(_batch(), jax.random.PRNGKey(0), ProgressiveLossConfig(w_min=2.0, w_max=3.0))
    assert staged["cond"]["w"].shape == (8,) and float(staged["cond"]["w"].min()) >= 2.0
    prog = make_progressive_loss(guided, lambda zz, m, cc, ctx: guided(params, zz, m, cc, ctx), SCHED, "epsilon", 2)
    assert float(prog(params, staged, jax.random.PRNGKey(0))[0]) < 1e-6
    with pytest.raises(ValueError, match="cond"):
        guided(params, z, mt, c, None)
    with pytest.raises(ValueError, match="into"):
        w_conditioned(model, into="time")


def test_progressive_config_errors():
    with pytest.raises(ValueError, match="weighting"):
        ProgressiveLossConfig(weighting="min_snr")
    with pytest.raises(ValueError, match="w_min"):
        ProgressiveLossConfig(w_min=3.0, w_max=1.0)
    with pytest.raises(ValueError, match="unknown keys"):
        ProgressiveLossConfig.from_mapping({"grid": 4})
    with pytest.raises(ValueError, match="student_steps"):
        make_progressive_loss(point_mass_model("epsilon"), _teacher("epsilon"), SCHED, "epsilon", 0)
    assert dataclasses.asdict(ProgressiveLossConfig.from_mapping({"w_max": 14.0}))["w_max"] == 14.0


# --------------------------------------------------------------------------------- learning


def test_progressive_distillation_learns_on_the_toy_teacher():
    """8 → 4 → 2 steps on the 2-D mixture: the distilled 2-step DDIM sampler lands closer to the
    teacher's 8-step samples (same initial noise) than the teacher's own 2-step DDIM does."""
    pred = "v_prediction"
    k_init, k_pre, k_rounds, k_eval = jax.random.split(jax.random.PRNGKey(0), 4)
    forward = lambda p, z, mt, c, ctx: teacher_forward(p, z, mt)
    teacher_loss = diffusion.make_diffusion_loss(forward, SCHED, pred)
    teacher, _ = jax.jit(lambda p, k: train(teacher_loss, p, 800, 2e-3, k))(init_teacher(k_init), k_pre)

    round_keys = iter(jax.random.split(k_rounds, 2))

    def train_round(loss_fn, init_params, steps):
        return jax.jit(lambda p, k: train(loss_fn, p, steps, 5e-4, k))(init_params, next(round_keys))[0]

    rounds = progressive_distillation(forward, teacher, SCHED, pred, train_round, teacher_steps=8,
                                      target_steps=2, steps_per_round=200)

    def ddim(params, steps):
        denoise = diffusion.make_denoiser(lambda z, mt: teacher_forward(params, z, mt), SCHED, pred)
        z = jax.random.normal(k_eval, (1024, 2))
        return diffusion.ddim_sample(denoise, z, SCHED, diffusion.timesteps(steps))

    reference = ddim(teacher, 8)
    gap_teacher = float(jnp.mean(jnp.sum((ddim(teacher, 2) - reference) ** 2, -1)))
    gap_student = float(jnp.mean(jnp.sum((ddim(rounds[-1].params, 2) - reference) ** 2, -1)))
    gap_round1 = float(jnp.mean(jnp.sum((ddim(rounds[0].params, 4) - reference) ** 2, -1)))
    print(f"|x_2 - x_8|^2: teacher {gap_teacher:.4f}, distilled {gap_student:.4f}; 4-step round {gap_round1:.4f}")
    assert gap_student < 0.5 * gap_teacher, (gap_student, gap_teacher)
    assert gap_round1 < gap_teacher
