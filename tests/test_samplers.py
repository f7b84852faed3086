"""Samplers: parity with diffusers' DDIM / DPM-Solver++ updates, model-call counts, and exactness
on a point-mass data distribution."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sampler_reference as ref
from codi_jax import diffusion

SCHED = diffusion.get_schedule("scaled_linear")


def _denoiser(prediction_type, counter=None):
    def model_fn(z, model_time):
        if counter is not None:
            jax.debug.callback(lambda: counter.append(1))
        k = jnp.round(model_time).astype(jnp.int32).reshape((-1,) + (1,) * (z.ndim - 1))
        return ref.analytic_model(z, k, prediction_type, xp=jnp)

    return diffusion.make_denoiser(model_fn, SCHED, prediction_type)


def _ours(solver, prediction_type, steps_taken):
    """z after the first ``steps_taken`` of a ref.NUM_STEPS-step trailing-spaced run."""
    ts = diffusion.timesteps(ref.NUM_STEPS, ref.NUM_STEPS)[: steps_taken + 1]
    z0 = jnp.asarray(ref.initial_noise())
    sample = diffusion.ddim_sample if solver == "ddim" else diffusion.dpm_solver_pp_2m
    return np.asarray(jax.jit(lambda z: sample(_denoiser(prediction_type), z, SCHED, ts))(z0))


def _check_trajectory(solver, prediction_type, expected):
    for j in range(1, ref.NUM_STEPS + 1):
        got = _ours(solver, prediction_type, j)
        np.testing.assert_allclose(got, expected[j - 1], atol=1e-5, rtol=0,
                                   err_msg=f"{solver}/{prediction_type} step {j}")


@pytest.mark.parametrize("solver", ["ddim", "dpmpp"])
@pytest.mark.parametrize("prediction_type", ref.PREDICTION_TYPES)
def test_matches_recorded_diffusers_updates(solver, prediction_type):
    recorded = np.load(ref.FIXTURE)
    np.testing.assert_array_equal(recorded["initial_noise"], ref.initial_noise())
    _check_trajectory(solver, prediction_type, recorded[f"{solver}_{prediction_type}"])


@pytest.mark.parity
@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None
                    or importlib.util.find_spec("torch") is None, reason="needs torch + diffusers")
@pytest.mark.parametrize("solver", ["ddim", "dpmpp"])
def test_matches_live_diffusers_updates(solver):
    for prediction_type in ref.PREDICTION_TYPES:
        _check_trajectory(solver, prediction_type, ref.diffusers_trajectory(solver, prediction_type))


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_each_sampler_calls_the_model_once_per_step(num_steps):
    z0 = jnp.zeros((2, 3))
    ts = diffusion.timesteps(num_steps, 20)
    rng = jax.random.PRNGKey(0)
    samplers = {
        "ddim": lambda d: diffusion.ddim_sample(d, z0, SCHED, ts),
        "codi": lambda d: diffusion.codi_sample(d, z0, SCHED, num_steps, 20),
        "ddim_on_grid": lambda d: diffusion.ddim_sample_on_grid(d, z0, SCHED, jnp.int32(num_steps), 20),
        "consistency": lambda d: diffusion.consistency_sample(d, z0, SCHED, ts, rng),
        "stochastic": lambda d: diffusion.stochastic_sample(d, z0, SCHED, num_steps, rng, 20),
        "dpmpp": lambda d: diffusion.dpm_solver_pp_2m(d, z0, SCHED, ts),
    }
    for name, run in samplers.items():
        calls = []
        jax.block_until_ready(jax.jit(lambda: run(_denoiser("v_prediction", calls)))())
        jax.effects_barrier()
        assert len(calls) == num_steps, name


def test_one_compiled_grid_sampler_equals_the_fixed_step_samplers():
    """ddim_sample_on_grid with a traced step count: one program, the same times (rounded half
    to even, as ``timesteps``) and the same result as DDIM along ``timesteps(n, grid)``."""
    den = _denoiser("v_prediction")
    z0 = jax.random.normal(jax.random.PRNGKey(3), (2, 3))
    on_grid = jax.jit(lambda n, grid: diffusion.ddim_sample_on_grid(den, z0, SCHED, n, grid),
                      static_argnums=1)
    for grid, steps in ((20, (1, 2, 3, 4, 8, 20)), (1000, (1, 4, 50, 200))):
        for n in steps:
            fixed = jax.jit(lambda: diffusion.ddim_sample(den, z0, SCHED, diffusion.timesteps(n, grid)))()
            np.testing.assert_allclose(on_grid(jnp.int32(n), grid), fixed, atol=1e-6, err_msg=f"{n}/{grid}")
    assert on_grid._cache_size() == 2  # one compilation per grid, whatever the step count


def _point_mass_denoiser(m, prediction_type="v_prediction"):
    """The exact denoiser of data x ≡ m: x̂(z, t) = m for every z, expressed as a raw prediction."""
    def model_fn(z, model_time):
        t = (model_time + 1.0) / 1000.0
        eps = (z - diffusion.diffuse(jnp.broadcast_to(m, z.shape), 0 * z, SCHED.alpha(t), 0 * t)) \
            / SCHED.sigma(t).reshape(-1, 1)
        return diffusion.from_x_eps(jnp.broadcast_to(m, z.shape), eps, SCHED.alpha(t), SCHED.sigma(t),
                                    prediction_type)

    return diffusion.make_denoiser(model_fn, SCHED, prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_samplers_recover_a_point_mass_exactly(prediction_type):
    m = jnp.array([0.3, -0.7, 0.5])
    z0 = jax.random.normal(jax.random.PRNGKey(1), (4, 3))
    den = _point_mass_denoiser(m, prediction_type)
    rng = jax.random.PRNGKey(2)
    outs = [diffusion.ddim_sample(den, z0, SCHED, diffusion.timesteps(7, 1000)),
            diffusion.codi_sample(den, z0, SCHED, 4, 20),
            diffusion.consistency_sample(den, z0, SCHED, diffusion.timesteps(4, 20), rng),
            diffusion.stochastic_sample(den, z0, SCHED, 4, rng, 20),
            diffusion.dpm_solver_pp_2m(den, z0, SCHED, diffusion.timesteps(6, 1000))]
    for out in outs:
        np.testing.assert_allclose(out, jnp.broadcast_to(m, out.shape), atol=2e-5)


def test_stochastic_sampler_uses_its_noise():
    den = _denoiser("v_prediction")
    z0 = jnp.ones((2, 3))
    a = diffusion.stochastic_sample(den, z0, SCHED, 4, jax.random.PRNGKey(0), 20)
    b = diffusion.stochastic_sample(den, z0, SCHED, 4, jax.random.PRNGKey(1), 20)
    c = diffusion.stochastic_sample(den, z0, SCHED, 4, jax.random.PRNGKey(0), 20)
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(a, c)


def test_timesteps_snap_to_the_teacher_grid_and_reject_too_many_steps():
    np.testing.assert_allclose(diffusion.timesteps(4, 20), [1, .75, .5, .25, 0])
    np.testing.assert_allclose(diffusion.timesteps(3, 20) * 20, [20, 13, 7, 0])
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.timesteps(21, 20)
    with pytest.raises(ValueError, match="num_steps"):
        diffusion.timesteps(0)
