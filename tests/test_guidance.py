"""Guidance-aware distillation: CoDi (and Flash) with classifier-free-guided targets into a student
that reads the guidance weight w (diffusion/guidance.py, distill/codi.py), in the loss and in the
trainer (preset ``guided``, export, predict)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import diffusion, predict, sharding, train
from codi_jax.diffusion.guidance import init_w_conditioned, w_conditioned, with_w
from codi_jax.distill import CoDiLossConfig, make_codi_loss
from codi_jax.export import export, load_exported
from test_toy_learning import GRID, MEANS, PRED, SCHED, adapt, init_teacher, sample_data, student_model, \
    teacher_forward, train as toy_train
from tiny import tiny_config

GUIDED_STUDENT = w_conditioned(student_model)


def _uncond(teacher):
    return lambda z, mt, ctx: teacher_forward(teacher, z, mt)


def test_at_w_zero_the_guided_objective_is_codi():
    """w → 0: the guided CG target (1 + w) x − w x̂_u is x, and the zero-initialised w embedding
    changes nothing: loss and gradients equal the plain objective's."""
    k_t, k_a, k_b = jax.random.split(jax.random.PRNGKey(3), 3)
    teacher = init_teacher(k_t)
    params = adapt(teacher, k_a)
    params = {**params, "mu": jnp.asarray(0.3)}   # the condition matters
    x, c = sample_data(k_b, 64)
    batch = {"x": x, "cond": c}
    plain = make_codi_loss(student_model, SCHED, PRED, CoDiLossConfig(grid=GRID, timestep_sampling="sample"))
    guided = make_codi_loss(GUIDED_STUDENT, SCHED, PRED,
                            CoDiLossConfig(grid=GRID, timestep_sampling="sample", guidance_max=1e-9),
                            uncond_fn=_uncond(teacher))
    wp = init_w_conditioned(params, 4)
    (v0, m0), g0 = jax.value_and_grad(plain, has_aux=True)(params, params, batch, jax.random.PRNGKey(0))
    (v1, m1), g1 = jax.value_and_grad(guided, has_aux=True)(wp, wp, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves({k: v for k, v in g1.items() if k != "w_embed"})):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(m1["w"]) < 1e-9


def test_guided_targets_extrapolate_from_the_unconditional_model():
    """At initialisation (μ = 0, w embedding 0) the student and its target are the unconditional
    teacher u itself. The CG target (1 + w) x − w x̂_u then lies (1 + w) times as far from the
    student's x̂_t = x̂_u as x does: the CG term scales exactly as (1 + w)². The consistency term,
    the same model at the same w on both sides, does not depend on w yet."""
    k_t, k_a, k_b = jax.random.split(jax.random.PRNGKey(4), 3)
    teacher = init_teacher(k_t)
    wp = init_w_conditioned(adapt(teacher, k_a), 4)
    x, c = sample_data(k_b, 64)
    metrics = {}
    for w in (0.5, 2.0):
        cfg = CoDiLossConfig(grid=GRID, timestep_sampling="sample", guidance_min=w, guidance_max=w)
        loss = make_codi_loss(GUIDED_STUDENT, SCHED, PRED, cfg, uncond_fn=_uncond(teacher))
        metrics[w] = loss(wp, wp, {"x": x, "cond": c}, jax.random.PRNGKey(0))[1]
        assert abs(float(metrics[w]["w"]) - w) < 1e-6
    np.testing.assert_allclose(float(metrics[2.0]["cg"]) / float(metrics[0.5]["cg"]), (3.0 / 1.5) ** 2, rtol=1e-4)
    np.testing.assert_allclose(float(metrics[2.0]["consistency"]), float(metrics[0.5]["consistency"]), rtol=1e-4)


def test_guided_mode_needs_its_unconditional_model_and_a_guided_cg_target():
    with pytest.raises(ValueError, match="uncond_fn"):
        make_codi_loss(GUIDED_STUDENT, SCHED, PRED, CoDiLossConfig(guidance_max=3.0))
    with pytest.raises(ValueError, match="cg_weight"):
        CoDiLossConfig(guidance_max=3.0, cg_weight=0.0)
    with pytest.raises(ValueError, match="image_l2"):
        CoDiLossConfig(guidance_max=3.0, cg_distance="image_l2")
    with pytest.raises(ValueError, match="guidance_min"):
        CoDiLossConfig(guidance_min=2.0, guidance_max=1.0)


def test_guidance_aware_codi_moves_samples_toward_the_labelled_component():
    """The 2-D mixture of test_toy_learning: an unconditional teacher, CoDi-distilled into a
    label-conditioned student that reads w ~ U[0, 3]. Guidance extrapolates away from the
    unconditional model (whose x̂ at t = 1 is the mixture's centre, 0) past the label's component:
    in one step x̂^w ≈ (1 + w) m_c, so at w = 3 the samples lie far further out along m_c than at
    w = 0 (measured: 3.7 against 1.3 times m_c); in four steps the later, low-noise steps, where u
    also sees the component, bring them back near it, still outward (1.025 against 0.997). A
    flipped sign in the combination would pull them inward."""
    k_init, k_pre, k_adapt, k_distil, k_eval = jax.random.split(jax.random.PRNGKey(0), 5)
    teacher_loss = diffusion.make_diffusion_loss(lambda p, z, mt, c, ctx: teacher_forward(p, z, mt), SCHED, PRED)
    teacher, _ = jax.jit(lambda p, k: toy_train(teacher_loss, p, 3000, 2e-3, k))(init_teacher(k_init), k_pre)
    loss = make_codi_loss(GUIDED_STUDENT, SCHED, PRED,
                          CoDiLossConfig(grid=GRID, timestep_sampling="sample", guidance_max=3.0),
                          uncond_fn=_uncond(teacher))
    params0 = init_w_conditioned(adapt(teacher, k_adapt), 4)
    student, _ = jax.jit(lambda p, k: toy_train(loss, p, 2000, 1e-3, k, ema=0.95))(params0, k_distil)

    k1, k2 = jax.random.split(k_eval)
    label = jax.random.randint(k1, (512,), 0, 4)
    z = jax.random.normal(k2, (512, 2))
    m = MEANS[label]

    def projection(w, steps):
        cond = with_w(jax.nn.one_hot(label, 4), jnp.full((512,), w))
        denoise = diffusion.make_denoiser(lambda zz, mt: GUIDED_STUDENT(student, zz, mt, cond, None), SCHED, PRED)
        x = diffusion.codi_sample(denoise, z, SCHED, steps, GRID)
        return float(jnp.mean(jnp.sum(x * m, -1) / jnp.sum(m * m, -1)))

    proj = {(w, n): projection(w, n) for w in (0.0, 3.0) for n in (1, 4)}
    print("projection onto m_c:", proj)
    assert proj[(3.0, 1)] > proj[(0.0, 1)] + 1.0, proj     # guided: further out
    assert abs(proj[(0.0, 4)] - 1.0) < 0.1, proj           # unguided: on the component
    assert proj[(3.0, 4)] > proj[(0.0, 4)] + 0.01, proj


def test_guided_flash_student_reads_the_w_of_its_targets():
    """Flash's guidance-aware mode: the student is w-conditioned and gets the w its teacher targets
    (and DMD's scores) were guided at, so the w embedding receives a gradient."""
    from codi_jax.distill import FlashLossConfig, make_flash_losses

    teacher = init_teacher(jax.random.PRNGKey(7))
    shifted = lambda p, z, mt, c: teacher_forward(p, z, mt) + c[:, :2]   # the condition matters
    student = w_conditioned(lambda p, z, mt, c, ctx: shifted(p["net"], z, mt, c))
    params = init_w_conditioned({"net": teacher}, 4)
    cfg = FlashLossConfig(guidance_max=3.0, adv_weight=0.0, dmd_weight=1.0, teacher_steps=2)
    losses = make_flash_losses(student, lambda z, mt, c, ctx: shifted(teacher, z, mt, c), None, None,
                               SCHED, PRED, cfg, uncond_fn=lambda c, ctx: (jnp.zeros_like(c), ctx))
    x, c = sample_data(jax.random.PRNGKey(8), 32)
    grads = jax.grad(lambda p: losses.generator(p, {}, {"x": x, "cond": c}, jax.random.PRNGKey(9), 0.5)[0])(params)
    assert float(jnp.abs(grads["w_embed"]["kernel"]).max()) > 1e-6


# ------------------------------------------------------------------------------- the trainer


def _guided_config():
    # Four steps: w reaches the model through the condition, which μ gates; μ starts at 0 and the
    # learning rate's warm-up at 0, so the w embedding gets its first gradient at step 2.
    cfg = tiny_config(num_steps=4)
    cfg.model.guidance_input, cfg.model.guidance = True, 2.0
    cfg.distill.guidance_min, cfg.distill.guidance_max = 0.0, 4.0
    return cfg


def test_the_trainer_distils_a_guidance_aware_student_and_exports_it(tmp_path):
    cfg = _guided_config()
    cfg.export = True
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(cfg, workdir)
    student, params, aux, _ = load_exported(os.path.join(workdir, "export"))
    assert student.guidance_input and student.guidance == 2.0
    # The w embedding trained (it starts at zero) and the exported model's output depends on w.
    assert float(jnp.abs(params["w_embed"]["kernel"]).max()) > 0
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    c = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    mt = jnp.full((2,), 999.0)
    at = lambda w: student.model_fn(params, z, mt, with_w(c, jnp.full((2,), w)), None)
    assert float(jnp.abs(at(0.0) - at(4.0)).max()) > 0
    # A plain condition samples at the model's own w.
    np.testing.assert_array_equal(student.model_fn(params, z, mt, c, None), at(2.0))
    p = predict.load_predictor(os.path.join(workdir, "export"), guidance=3.0)
    assert p.student.guidance == 3.0
    out = predict.predict(p, np.zeros((16, 16, 3), np.float32), steps=1, seed=0, tile=16, overlap=0, batch=1)
    assert out.shape == (16, 16, 3) and np.all(np.isfinite(out))


def test_guidance_needs_the_w_input_and_a_droppable_condition(tmp_path):
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    cfg = _guided_config()
    cfg.model.guidance_input = False
    with pytest.raises(ValueError, match="guidance_input"):
        train.make_train_step(cfg, train.setup(cfg, mesh).student, None, None)
    cfg = _guided_config()
    cfg.objective = "diffusion"
    with pytest.raises(ValueError, match="guidance-aware"):
        train.build(cfg)
    # A plain model has no w to pick.
    cfg = tiny_config(num_steps=1)
    parts = train.setup(cfg, mesh)
    folder = export(parts.student, train.final_params(parts.state, parts.frozen), str(tmp_path / "plain"), cfg)
    with pytest.raises(ValueError, match="not guidance-aware"):
        predict.load_predictor(folder, guidance=3.0)
