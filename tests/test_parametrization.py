"""eq. 7 conversions, eq. 6 ≡ eq. 8, and Remark 1 checked numerically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import diffusion

SCHED = diffusion.get_schedule("scaled_linear")


def _random(key, shape=(5, 4, 4, 3)):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
    t = jax.random.uniform(k3, (shape[0],), minval=0.02, maxval=0.98)
    return jax.random.normal(k1, shape), jax.random.normal(k2, shape), SCHED.alpha(t), SCHED.sigma(t)


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
def test_round_trip_through_x_eps(prediction_type):
    x, eps, a, s = _random(0)
    z = diffusion.diffuse(x, eps, a, s)
    pred = diffusion.from_x_eps(x, eps, a, s, prediction_type)
    x_hat, eps_hat = diffusion.to_x_eps(pred, z, a, s, prediction_type)
    np.testing.assert_allclose(x_hat, x, atol=2e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=2e-4)
    again = diffusion.from_x_eps(x_hat, eps_hat, a, s, prediction_type)
    np.testing.assert_allclose(again, pred, atol=2e-4)


def test_v_prediction_is_eq7_literally():
    z, v, a, s = _random(1)
    x_hat, eps_hat = diffusion.to_x_eps(v, z, a, s, "v_prediction")
    a4, s4 = a[:, None, None, None], s[:, None, None, None]
    np.testing.assert_allclose(x_hat, a4 * z - s4 * v, atol=1e-6)
    np.testing.assert_allclose(eps_hat, a4 * v + s4 * z, atol=1e-6)
    # Every representation describes the same z: z = α x̂ + σ ε̂.
    np.testing.assert_allclose(a4 * x_hat + s4 * eps_hat, z, atol=1e-5)


def test_ddim_v_form_eq8_equals_eps_x_form_eq6():
    z_t, v, a_t, s_t = _random(2)
    _, _, a_s, s_s = _random(3)
    a_t4, s_t4, a_s4, s_s4 = (c[:, None, None, None] for c in (a_t, s_t, a_s, s_s))
    x_hat, eps_hat = diffusion.to_x_eps(v, z_t, a_t, s_t, "v_prediction")
    eq6_eps_form = a_s4 * x_hat + s_s4 * (z_t - a_t4 * x_hat) / s_t4
    eq8 = a_s4 * (a_t4 * z_t - s_t4 * v) + s_s4 * (a_t4 * v + s_t4 * z_t)
    ours = diffusion.ddim_update(x_hat, eps_hat, a_s, s_s)
    np.testing.assert_allclose(ours, eq8, atol=1e-5)
    np.testing.assert_allclose(eq6_eps_form, eq8, atol=1e-4)


def test_remark_1_noise_consistency_implies_signal_consistency():
    """If ε̂(z_s, s) = ε̂(z_t, t) along a DDIM step (eq. 13 gives that v̂ at s), then x̂ agrees too."""
    z_t, v_t, a_t, s_t = _random(4)
    _, _, a_s, s_s = _random(5)
    x_t, eps_t = diffusion.to_x_eps(v_t, z_t, a_t, s_t, "v_prediction")
    z_s = diffusion.ddim_update(x_t, eps_t, a_s, s_s)
    v_s = (eps_t - s_s[:, None, None, None] * z_s) / a_s[:, None, None, None]  # eq. 13
    x_s, eps_s = diffusion.to_x_eps(v_s, z_s, a_s, s_s, "v_prediction")
    np.testing.assert_allclose(eps_s, eps_t, atol=1e-5)
    np.testing.assert_allclose(x_s, x_t, atol=1e-4)
    # And a v̂ at s that breaks ε-consistency breaks x-consistency.
    x_bad, _ = diffusion.to_x_eps(v_s + 0.1, z_s, a_s, s_s, "v_prediction")
    assert float(jnp.abs(x_bad - x_t).max()) > 1e-2


def test_unknown_prediction_type_names_the_argument():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="prediction_type.*'flow'"):
        diffusion.to_x_eps(x, x, 1.0, 0.0, "flow")
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion.from_x_eps(x, x, 1.0, 0.0, "eps")
