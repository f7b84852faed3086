"""The CoDi objective (Algorithm 1, eqs. 11-12): exactness on point-mass data, gradient flow,
evaluation counts, switches and errors; the EMA update; the standard diffusion loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import diffusion
from codi_jax.distill import CoDiLossConfig, ema_update, make_codi_loss, sample_grid_index

SCHED = diffusion.get_schedule("scaled_linear")
M = jnp.array([[0.5, -0.3, 0.8, 0.1]])


def point_mass_model(prediction_type):
    """model(params, z, model_time, cond, context) with x̂ = m + w·cond + k·tanh(z): the exact model
    of the data x ≡ m when params['m'] = m and k = 0; with k ≠ 0 it is not self-consistent."""
    def model(params, z, model_time, cond, context):
        t = (model_time + 1.0) / 1000.0
        a, s = SCHED.alpha(t)[:, None], SCHED.sigma(t)[:, None]
        x_hat = params["m"] + params["w"] * cond + params.get("k", 0.0) * jnp.tanh(z)
        return diffusion.from_x_eps(x_hat, (z - a * x_hat) / s, a[:, 0], s[:, 0], prediction_type)
    return model


def _batch(n=8):
    return {"x": jnp.broadcast_to(M, (n, 4)), "cond": jnp.zeros((n, 4))}


EXACT = {"m": M, "w": jnp.ones((1, 4))}


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
@pytest.mark.parametrize("predictor", ["prev", "ddim"])
@pytest.mark.parametrize("space", ["eps", "x"])
@pytest.mark.parametrize("sampling", ["batch", "sample"])
def test_exact_model_has_zero_loss_and_perturbed_does_not(prediction_type, predictor, space, sampling):
    cfg = CoDiLossConfig(grid=20, predictor=predictor, consistency_space=space,
                         timestep_sampling=sampling)
    loss = make_codi_loss(point_mass_model(prediction_type), SCHED, prediction_type, cfg)
    perturbed = {"m": M + 0.2, "w": EXACT["w"], "k": 0.3}
    bad_consistency = []
    for seed in range(4):
        rng = jax.random.PRNGKey(seed)
        value, metrics = loss(EXACT, EXACT, _batch(), rng)
        assert float(metrics["consistency"]) < 1e-8 and float(metrics["cg"]) < 1e-10, metrics
        assert float(value) < 1e-8
        _, bad = loss(perturbed, perturbed, _batch(), rng)
        assert float(bad["cg"]) > 1e-2
        bad_consistency.append(float(bad["consistency"]))
    # Draws with s = 0 carry no consistency term; over four draws some have s > 0.
    assert max(bad_consistency) > 1e-4


def test_gradients_reach_online_params_only():
    cfg = CoDiLossConfig(grid=10)
    loss = make_codi_loss(point_mass_model("v_prediction"), SCHED, "v_prediction", cfg)
    online = {"m": M + 0.1, "w": jnp.full((1, 4), 0.5)}
    target = {"m": M - 0.1, "w": jnp.full((1, 4), 2.0)}
    batch = {"x": jnp.broadcast_to(M, (8, 4)), "cond": jnp.ones((8, 4))}
    g_online, g_target = jax.grad(lambda o, t: loss(o, t, batch, jax.random.PRNGKey(3))[0],
                                  argnums=(0, 1))(online, target)
    assert all(float(jnp.abs(g).max()) > 1e-4 for g in jax.tree.leaves(g_online))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_target))


@pytest.mark.parametrize("predictor,expected", [("prev", 2), ("ddim", 2), ("teacher", 3)])
def test_model_evaluations_per_step(predictor, expected):
    calls = []
    model = point_mass_model("epsilon")

    def counted_model(*args):
        calls.append("student")
        return model(*args)

    def teacher(z, model_time, context):
        calls.append("teacher")
        return model(EXACT, z, model_time, jnp.zeros_like(z), context)

    loss = make_codi_loss(counted_model, SCHED, "epsilon", CoDiLossConfig(predictor=predictor),
                          teacher_fn=teacher)
    jax.make_jaxpr(jax.value_and_grad(lambda p: loss(p, EXACT, _batch(), jax.random.PRNGKey(0))[0]))(EXACT)
    assert len(calls) == expected
    if predictor == "teacher":
        assert calls.count("teacher") == 1


def test_teacher_predictor_uses_the_frozen_teacher():
    """With an exact teacher the 'teacher' predictor also gives ẑ_s on the true trajectory."""
    model = point_mass_model("v_prediction")
    teacher = lambda z, mt, ctx: model(EXACT, z, mt, jnp.zeros_like(z), ctx)
    loss = make_codi_loss(model, SCHED, "v_prediction", CoDiLossConfig(predictor="teacher"),
                          teacher_fn=teacher)
    _, metrics = loss(EXACT, EXACT, _batch(), jax.random.PRNGKey(1))
    assert float(metrics["loss"]) < 1e-8
    wrong_teacher = lambda z, mt, ctx: model({"m": M + 1.0, "w": EXACT["w"]}, z, mt, jnp.zeros_like(z), ctx)
    loss = make_codi_loss(model, SCHED, "v_prediction",
                          CoDiLossConfig(predictor="teacher", timestep_sampling="sample"),
                          teacher_fn=wrong_teacher)
    assert float(loss(EXACT, EXACT, _batch(), jax.random.PRNGKey(1))[1]["consistency"]) > 1e-3


def test_timestep_sampling_modes():
    i = sample_grid_index(jax.random.PRNGKey(0), 64, 20, "batch")
    assert i.shape == (64,) and len(np.unique(i)) == 1 and 1 <= int(i[0]) <= 20
    i = sample_grid_index(jax.random.PRNGKey(0), 256, 20, "sample")
    assert set(np.unique(i)) == set(range(1, 21))


def test_cg_weight_and_boundary_scalings():
    model = point_mass_model("v_prediction")
    perturbed = {"m": M + 0.2, "w": EXACT["w"]}
    rng = jax.random.PRNGKey(0)
    with_cg = make_codi_loss(model, SCHED, "v_prediction", CoDiLossConfig(cg_weight=2.0))
    no_cg = make_codi_loss(model, SCHED, "v_prediction", CoDiLossConfig(cg_weight=0.0))
    v1, m1 = with_cg(perturbed, perturbed, _batch(), rng)
    v0, m0 = no_cg(perturbed, perturbed, _batch(), rng)
    assert float(v1) == pytest.approx(float(m1["consistency"]) + 2.0 * 0.04, rel=1e-4)
    assert float(v0) == pytest.approx(float(m0["consistency"]), rel=1e-6)
    # Boundary scalings keep the exact model exact only where c_skip ≈ 0; they must still be finite.
    bc = make_codi_loss(model, SCHED, "v_prediction", CoDiLossConfig(boundary_scalings=True))
    assert np.isfinite(float(bc(EXACT, EXACT, _batch(), rng)[0]))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_boundary_scalings_stay_finite_when_s_is_zero(prediction_type):
    # grid 2 with one t per example: about half the examples have s = 0 (σ_s = 0), where the
    # boundary-scaled ε̂ = (z − α x̂)/σ was 0/0 and the mask let the NaN through.
    cfg = CoDiLossConfig(grid=2, timestep_sampling="sample", boundary_scalings=True)
    i = sample_grid_index(jax.random.split(jax.random.PRNGKey(3))[0], 64, 2, "sample")
    assert (i == 1).any() and (i == 2).any()
    loss = make_codi_loss(point_mass_model(prediction_type), SCHED, prediction_type, cfg)
    params = {"m": M + 0.2, "w": EXACT["w"], "k": jnp.asarray(0.3)}
    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, params, _batch(64),
                                                                     jax.random.PRNGKey(3))
    assert np.isfinite(float(value)) and float(metrics["consistency"]) > 0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_pixel_and_perceptual_cg_go_through_the_decoder():
    model = point_mass_model("epsilon")
    decode = lambda x: 3.0 * x
    perturbed = {"m": M + 0.2, "w": EXACT["w"]}
    pixel = make_codi_loss(model, SCHED, "epsilon", CoDiLossConfig(cg_distance="pixel_l2"),
                           decode_fn=decode)
    assert float(pixel(perturbed, perturbed, _batch(), jax.random.PRNGKey(0))[1]["cg"]) == \
        pytest.approx(9 * 0.04, rel=1e-3)
    # image_l2 compares D(x̂) with the pictures, not with D(x): here pictures at D(x) + 0.5.
    image = make_codi_loss(model, SCHED, "epsilon", CoDiLossConfig(cg_distance="image_l2"), decode_fn=decode)
    batch = dict(_batch(), image=decode(_batch()["x"]) + 0.5)
    assert float(image(perturbed, perturbed, batch, jax.random.PRNGKey(0))[1]["cg"]) == \
        pytest.approx((3 * 0.2 - 0.5) ** 2, rel=1e-3)
    with pytest.raises(ValueError, match="image_l2.*batch"):
        image(perturbed, perturbed, _batch(), jax.random.PRNGKey(0))
    perceptual = make_codi_loss(model, SCHED, "epsilon", CoDiLossConfig(cg_distance="perceptual"),
                                decode_fn=decode,
                                perceptual_fn=lambda a, b: jnp.abs(a - b).sum(axis=-1))
    assert float(perceptual(perturbed, perturbed, _batch(), jax.random.PRNGKey(0))[1]["cg"]) == \
        pytest.approx(3 * 0.2 * 4, rel=1e-3)


def test_bad_configuration_and_input_name_the_argument():
    with pytest.raises(ValueError, match="predictor"):
        CoDiLossConfig(predictor="euler")
    with pytest.raises(ValueError, match="consistency_space"):
        CoDiLossConfig(consistency_space="v")
    with pytest.raises(ValueError, match="unknown keys.*'lr'"):
        CoDiLossConfig.from_mapping({"grid": 10, "lr": 1.0})
    with pytest.raises(ValueError, match="teacher_fn"):
        make_codi_loss(point_mass_model("epsilon"), SCHED, "epsilon", CoDiLossConfig(predictor="teacher"))
    with pytest.raises(ValueError, match="decode_fn"):
        make_codi_loss(point_mass_model("epsilon"), SCHED, "epsilon", CoDiLossConfig(cg_distance="pixel_l2"))
    with pytest.raises(ValueError, match="prediction_type"):
        make_codi_loss(point_mass_model("epsilon"), SCHED, "eps")
    loss = make_codi_loss(point_mass_model("epsilon"), SCHED, "epsilon")
    with pytest.raises(ValueError, match="cond"):
        loss(EXACT, EXACT, {"x": jnp.zeros((8, 4)), "cond": jnp.zeros((4, 4))}, jax.random.PRNGKey(0))
    assert dataclasses.asdict(CoDiLossConfig.from_mapping({"grid": 50}))["grid"] == 50


def test_ema_update_is_the_algorithm_1_line():
    target = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(3.0)}}
    online = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(-1.0)}}
    new = ema_update(target, online, 0.9)
    np.testing.assert_allclose(new["a"], 0.9 * target["a"] + 0.1 * online["a"], rtol=1e-6)
    np.testing.assert_allclose(new["b"]["c"], 0.9 * 3.0 + 0.1 * -1.0, rtol=1e-6)


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
def test_standard_diffusion_loss_is_zero_for_the_exact_model(prediction_type):
    model = point_mass_model(prediction_type)
    loss = jax.jit(diffusion.make_diffusion_loss(model, SCHED, prediction_type))
    assert float(loss(EXACT, _batch(), jax.random.PRNGKey(0))[0]) < 1e-6
    assert float(loss({"m": M + 0.2, "w": EXACT["w"]}, _batch(), jax.random.PRNGKey(0))[0]) > 1e-4
    weighted = diffusion.make_diffusion_loss(model, SCHED, prediction_type, snr_weighting="min_snr")
    assert np.isfinite(float(weighted({"m": M + 0.2, "w": EXACT["w"]}, _batch(), jax.random.PRNGKey(0))[0]))
    with pytest.raises(ValueError, match="snr_weighting"):
        diffusion.make_diffusion_loss(model, SCHED, prediction_type, snr_weighting="p2")


def test_lowpass_cg_term_weighs_the_local_means():
    """An x̂ off by a constant δ: the plain CG term is δ², the low-pass one adds weight·δ² (every
    local mean is off by δ too); an x̂ off by a checkerboard of ±δ (no local mean moves) adds 0."""
    from codi_jax.distill.codi import local_means

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    checker = 0.3 * (-1.0) ** (jnp.arange(8)[:, None] + jnp.arange(8)[None])[None, :, :, None]
    for pool in (0, 2, 4):
        np.testing.assert_allclose(local_means(x + 0.3, pool) - local_means(x, pool), 0.3, atol=1e-6)
        np.testing.assert_allclose(local_means(x + checker, pool), local_means(x, pool), atol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        local_means(x, 3)
    with pytest.raises(ValueError, match="latent_l2"):
        CoDiLossConfig(cg_lowpass_weight=1.0, cg_distance="pixel_l2")


def test_rollout_builds_z_t_from_the_targets_one_step_prediction():
    """rollout_fraction = 1: the target model is evaluated at t = 1 (one more evaluation), the
    online model sees z_t = α_t x̂⁻_1 + σ_t ε (ε the one PREv re-uses for ẑ_s), and the CG term is
    the low band alone: a checkerboard in the data (no 2x2 cell mean moves) costs nothing."""
    n, grid = 4, 10
    m_online, m_target = 0.2, -0.5
    checker = 0.4 * (-1.0) ** (jnp.arange(8)[:, None] + jnp.arange(8)[None])[None, :, :, None]
    x = jnp.broadcast_to(0.1 + checker, (n, 8, 8, 2))
    calls = []

    def model(params, z, model_time, cond, context):  # x̂ = params, whatever z is (v-prediction)
        t = (model_time + 1.0) / 1000.0
        calls.append((params, z, t))
        a, s = SCHED.alpha(t)[:, None, None, None], SCHED.sigma(t)[:, None, None, None]
        x_hat = jnp.full_like(z, params)
        return a * (z - a * x_hat) / s - s * x_hat

    for rollout, expected_cg in ((1.0, (0.1 - m_online) ** 2), (0.0, (0.1 - m_online) ** 2 + 0.16)):
        cfg = CoDiLossConfig(grid=grid, timestep_sampling="batch", rollout_fraction=rollout,
                             cg_lowpass_pool=2)
        loss = make_codi_loss(model, SCHED, "v_prediction", cfg)
        for seed in range(6):
            calls.clear()
            _, metrics = loss(m_online, m_target, {"x": x, "cond": None}, jax.random.PRNGKey(seed))
            np.testing.assert_allclose(float(metrics["cg"]), expected_cg, rtol=1e-4)
            if not rollout:
                assert len(calls) == 2
                continue
            assert float(metrics["rollout"]) == 1.0
            (p_one, _, t_one), (p_t, z_t, t), (p_s, z_s, s) = calls
            assert (p_one, p_t, p_s) == (m_target, m_online, m_target)
            np.testing.assert_allclose(t_one, 1.0, atol=1e-6)
            if float(s[0]) <= 0:
                continue
            a_t, s_t = SCHED.alpha(t)[0], SCHED.sigma(t)[0]
            eps = (z_s - SCHED.alpha(s)[0] * m_online) / SCHED.sigma(s)[0]
            np.testing.assert_allclose(z_t, a_t * m_target + s_t * eps, atol=2e-4)
    with pytest.raises(ValueError, match="rollout_fraction"):
        CoDiLossConfig(rollout_fraction=0.5, cg_distance="pixel_l2")
    with pytest.raises(ValueError, match="rollout_fraction"):
        CoDiLossConfig(rollout_fraction=1.5)
