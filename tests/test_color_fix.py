"""The wavelet colour fix of SR outputs: exact identities of its low-pass filter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codi_jax import color_fix


def _images(seed=0, shape=(2, 16, 16, 3)):
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=-0.5, maxval=0.5)


def test_low_pass_keeps_constants_and_the_mean_and_smooths():
    const = jnp.full((1, 8, 8, 3), 0.3)
    np.testing.assert_allclose(color_fix.low_pass(const, 3), const, atol=1e-7)
    x = _images()
    smooth = color_fix.low_pass(x, 2)
    assert smooth.shape == x.shape
    # A normalised kernel keeps the mean up to the replicated borders, and removes most of the
    # pixel-to-pixel variation of white noise.
    np.testing.assert_allclose(smooth.mean(), x.mean(), atol=2e-2)
    assert float(jnp.var(jnp.diff(smooth, axis=1))) < 0.1 * float(jnp.var(jnp.diff(x, axis=1)))


def test_the_fix_removes_a_colour_offset_and_keeps_the_details():
    x = _images(1)
    offset = jnp.array([0.2, -0.1, 0.05])
    # An output whose colours are off by a constant gets the reference's colours back, exactly.
    np.testing.assert_allclose(color_fix.wavelet_color_fix(x + offset, x, 2), x, atol=1e-6)
    # Its details stay its own: fixing towards a blurred reference keeps the high frequencies.
    fixed = color_fix.wavelet_color_fix(x, color_fix.low_pass(x, 2), 2)
    high = lambda a: a - color_fix.low_pass(a, 2)
    np.testing.assert_allclose(high(fixed), high(x), atol=0.1)


def test_levels_follow_the_scale_and_bad_input_is_named():
    assert [color_fix.levels_for_scale(s) for s in (2, 4, 8)] == [1, 2, 3]
    with pytest.raises(ValueError, match="at least 2"):
        color_fix.levels_for_scale(1)
    with pytest.raises(ValueError, match="differ in shape"):
        color_fix.wavelet_color_fix(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 4, 4, 3)), 2)
