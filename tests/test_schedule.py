"""Schedules: diffusers' alphas_cumprod, the VP identity, the t ↔ model-time mapping."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import diffusion


def test_scaled_linear_matches_diffusers_recorded_values():
    sched = diffusion.get_schedule("scaled_linear")
    assert sched.alphas_cumprod.shape == (1000,)
    # diffusers DDPMScheduler(beta_schedule="scaled_linear", 0.00085 → 0.012).
    np.testing.assert_allclose(sched.alphas_cumprod[[0, 499, 999]], [0.99915, 0.27767, 0.00466],
                               atol=5e-6)


@pytest.mark.parity
@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None
                    or importlib.util.find_spec("torch") is None, reason="needs torch + diffusers")
@pytest.mark.parametrize("name,kwargs", [
    ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
    ("linear", dict(beta_start=0.0001, beta_end=0.02)),
])
def test_discrete_schedules_match_live_diffusers(name, kwargs):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule=name, num_train_timesteps=1000, **kwargs).alphas_cumprod.numpy()
    ours = diffusion.get_schedule(name, **kwargs)
    np.testing.assert_allclose(ours.alphas_cumprod, ref, atol=1e-6, rtol=0)
    k = np.arange(1000)
    np.testing.assert_allclose(ours.alpha((k + 1) / 1000.0) ** 2, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["scaled_linear", "linear", "cosine"])
def test_variance_preserving_and_monotone(name):
    sched = diffusion.get_schedule(name)
    t = jnp.linspace(0.0, 1.0, 1001)
    a, s = sched.alpha(t), sched.sigma(t)
    np.testing.assert_allclose(a**2 + s**2, 1.0, atol=1e-6)
    assert bool(jnp.all(jnp.diff(a) <= 0)) and bool(jnp.all(jnp.diff(s) >= 0))
    assert float(a[0]) == pytest.approx(1.0, abs=1e-4)
    inner = t[1:-1]
    np.testing.assert_allclose(sched.logsnr(inner), jnp.log(sched.alpha(inner) ** 2 / sched.sigma(inner) ** 2),
                               rtol=1e-3, atol=1e-3)


def test_grid_times_map_to_trailing_integer_timesteps():
    sched = diffusion.get_schedule("scaled_linear")
    t = jnp.arange(1, 21) / 20.0
    np.testing.assert_array_equal(sched.model_time(t), 50 * np.arange(1, 21) - 1)  # 49 … 999
    np.testing.assert_allclose(sched.alpha(t) ** 2, sched.alphas_cumprod[50 * np.arange(1, 21) - 1],
                               rtol=1e-5)
    assert float(sched.sigma(0.0)) == 0.0 and float(sched.model_time(0.0)) == -1.0


def test_cosine_model_time_and_endpoints():
    sched = diffusion.get_schedule("cosine")
    assert float(sched.model_time(0.5)) == pytest.approx(500.0)
    assert float(sched.logsnr(1.0)) == pytest.approx(-20.0)
    assert float(sched.logsnr(0.0)) == pytest.approx(20.0)


def test_unknown_schedule_names_the_argument():
    with pytest.raises(ValueError, match="schedule.*'sqrt'.*scaled_linear"):
        diffusion.get_schedule("sqrt")
    with pytest.raises(ValueError, match="beta_schedule"):
        diffusion.schedule_from_scheduler_config({"beta_schedule": "squaredcos_cap_v2"})
    sched = diffusion.schedule_from_scheduler_config(
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "_class_name": "PNDM"})
    np.testing.assert_allclose(sched.alphas_cumprod[999], 0.00466, atol=5e-6)
