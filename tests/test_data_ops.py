"""Per-example data ops (codi_jax.data.ops / degradations / tasks): eager and inside tf.data."""
import math

import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from codi_jax import data
from codi_jax.data import degradations, ops

SR = data.default_config("sr").sr
CROP = tf.constant(skimage.data.astronaut()[180:212, 200:232], tf.float32) / 255.0


def key(i: int) -> tf.Tensor:
    return ops.example_key(0, i)


# One call per registered op: (key index) -> output tensor(s).
OP_CALLS = {
    "to_signed": lambda i: ops.to_signed(CROP),
    "resize_bicubic": lambda i: ops.resize_bicubic(CROP, [8, 8]),
    "stroke_field": lambda i: ops.stroke_field(key(i), 32, 32, 4, 6),
    "box_field": lambda i: ops.box_field(key(i), 32, 32, 3),
    "random_inpaint_mask": lambda i: ops.random_inpaint_mask(key(i), 32, 32, (0.1, 0.5), 0.5, 4, 6, 3),
    "canny": lambda i: ops.canny(CROP, 100.0, 200.0, 1.0),
    "normalize_depth": lambda i: ops.normalize_depth(CROP[..., :1] * 10.0),
    "sinc_kernel": lambda i: degradations.sinc_kernel(tf.constant(13), tf.constant(1.0)),
    "blur_kernel": lambda i: degradations.blur_kernel(tf.constant(21), 2.0, 1.0, 0.5, 1.0, tf.constant(0)),
    "random_mixed_kernel": lambda i: degradations.random_mixed_kernel(key(i), SR.kernel_prob, SR.blur_sigma, SR.betag_range, SR.betap_range, 0.1),
    "filter2d": lambda i: degradations.filter2d(CROP, tf.ones([21, 21]) / 441.0),
    "random_noise": lambda i: degradations.random_noise(key(i), CROP, 0.5, (1.0, 30.0), (0.05, 3.0), 0.4),
    "random_jpeg": lambda i: degradations.random_jpeg(key(i), CROP, (30, 95)),
    "realesrgan_degrade": lambda i: degradations.realesrgan_degrade(key(i), CROP, SR),
}


def test_every_registered_op_is_exercised():
    assert set(OP_CALLS) == set(data.OPS)
    with pytest.raises(KeyError, match="known ops: .*canny"):
        data.get_op("nope")


@pytest.mark.parametrize("name", sorted(OP_CALLS))
def test_op_eager_equals_tf_data(name):
    eager = OP_CALLS[name](3).numpy()
    ds = tf.data.Dataset.from_tensors(np.int64(3)).map(lambda i: OP_CALLS[name](3))
    mapped = next(iter(ds)).numpy()
    assert np.isfinite(eager).all()
    np.testing.assert_allclose(mapped, eager, atol=1e-5)


def test_kernels_normalised_and_supported():
    for i in range(20):
        k = degradations.random_mixed_kernel(key(i), SR.kernel_prob, SR.blur_sigma, SR.betag_range, SR.betap_range, 0.5).numpy()
        assert k.shape == (21, 21)
        assert abs(k.sum() - 1.0) < 1e-4
        # Centred: the kernel's support is a centred odd square, so it is symmetric under 180° turn
        # only for the isotropic ones, but its support always is.
        assert np.array_equal(k != 0, np.rot90(k != 0, 2))
    small = degradations.sinc_kernel(tf.constant(7), tf.constant(math.pi / 2)).numpy()
    assert np.all(small[:7] == 0) and np.all(small[:, -7:] == 0) and small[10, 10] == small.max()
    iso = degradations.blur_kernel(tf.constant(21), 2.0, 2.0, 0.0, 1.0, tf.constant(0)).numpy()
    np.testing.assert_allclose(iso, iso.T, atol=1e-7)
    aniso = degradations.blur_kernel(tf.constant(21), 4.0, 1.0, 0.0, 1.0, tf.constant(0)).numpy()
    assert aniso[10, 14] > aniso[14, 10]  # wider along x (sigma_x = 4)


def test_filter2d_tiny_images_and_pulse_identity():
    pulse = np.zeros([21, 21], np.float32)
    pulse[10, 10] = 1.0
    for h, w in [(1, 1), (2, 3), (5, 40)]:
        img = tf.random.stateless_uniform([h, w, 3], [1, 2])
        np.testing.assert_allclose(degradations.filter2d(img, pulse).numpy(), img.numpy(), atol=1e-6)
        blurred = degradations.filter2d(img, tf.ones([21, 21]) / 441.0)
        assert blurred.shape == (h, w, 3)


def test_sr_degradation_statistics():
    outs = [degradations.realesrgan_degrade(key(i), CROP, SR).numpy() for i in range(6)]
    again = degradations.realesrgan_degrade(key(0), CROP, SR).numpy()
    np.testing.assert_array_equal(outs[0], again)  # reproducible for a key
    for o in outs:
        assert o.shape == (8, 8, 3)  # scale 4
        assert o.min() >= 0.0 and o.max() <= 1.0
        np.testing.assert_allclose(o * 255.0, np.round(o * 255.0), atol=1e-3)  # 8-bit levels
    # Different keys give different degradations.
    assert all(not np.array_equal(outs[0], o) for o in outs[1:])
    # It changes the image: compare with a clean area downscale.
    clean = tf.image.resize(CROP, [8, 8], method="area").numpy()
    assert np.mean([np.abs(o - clean).mean() for o in outs]) > 0.01


def test_sr_task_condition():
    cfg = data.default_config("sr")
    image, cond = data.get_task("sr").fn(key(1), CROP, tf.zeros([1, 1, 1]), cfg)
    assert image.shape == cond.shape == (32, 32, 3)
    np.testing.assert_allclose(image.numpy(), CROP.numpy() * 2 - 1, atol=1e-6)
    assert cond.numpy().min() >= -1 and cond.numpy().max() <= 1
    assert np.abs(cond.numpy() - image.numpy()).mean() > 0.02


@pytest.mark.parametrize("stroke_prob", [1.0, 0.0])
def test_masks_cover_the_configured_fraction(stroke_prob):
    lo, hi = 0.2, 0.4
    fractions = []
    ds = tf.data.Dataset.range(16).map(lambda i: ops.random_inpaint_mask(ops.example_key(5, i), 32, 32, (lo, hi), stroke_prob, 4, 6, 3))
    for m in ds:
        m = m.numpy()
        assert set(np.unique(m)) <= {0.0, 1.0} and m.shape == (32, 32, 1)
        fractions.append(m.mean())
    tol = 2.0 / (32 * 32)
    assert min(fractions) >= lo - tol and max(fractions) <= hi + tol
    assert np.std(fractions) > 0.01  # drawn per example, not fixed


def test_inpaint_condition_is_masked_image_and_mask():
    cfg = data.default_config("inpaint")
    image, cond = data.get_task("inpaint").fn(key(2), CROP, tf.zeros([1, 1, 1]), cfg)
    cond = cond.numpy()
    mask = cond[..., 3:]
    assert cond.shape == (32, 32, 4) and 0 < mask.mean() < 1
    np.testing.assert_allclose(cond[..., :3], image.numpy() * (1 - mask))


def test_canny_finds_the_square_outline():
    img = np.zeros([32, 32, 3], np.float32)
    img[8:24, 8:24] = 1.0
    edges = ops.canny(tf.constant(img), 100.0, 200.0).numpy()[..., 0]
    assert edges.shape == (32, 32) and set(np.unique(edges)) <= {0.0, 1.0}
    assert edges[12:20, 12:20].sum() == 0 and edges[:4].sum() == 0  # flat areas: no edges
    assert edges[6:10, 12:20].sum() >= 8  # the top side is found
    assert ops.canny(tf.constant(img), 5000.0, 6000.0).numpy().sum() == 0  # thresholds apply
    cfg = data.default_config("canny")
    _, cond = data.get_task("canny").fn(key(0), tf.constant(img), tf.zeros([1, 1, 1]), cfg)
    assert cond.shape == (32, 32, 3) and set(np.unique(cond.numpy())) == {-1.0, 1.0}


def test_normalize_depth():
    d = np.array([[1.0, 2.0], [3.0, np.inf]], np.float32)[..., None]
    out = ops.normalize_depth(tf.constant(d)).numpy()[..., 0]
    np.testing.assert_allclose(out, [[-1.0, 0.0], [1.0, -1.0]])
    assert np.all(ops.normalize_depth(tf.fill([4, 4, 1], 7.0)).numpy() == 0)


def test_noise_and_jpeg_stay_in_range_and_change_the_image():
    gray_img = tf.tile(CROP[..., :1], [1, 1, 3])
    for i in range(6):
        n = degradations.random_noise(key(i), gray_img, 0.5, (20.0, 30.0), (2.0, 3.0), 1.0).numpy()
        assert n.min() >= 0 and n.max() <= 1 and np.abs(n - gray_img.numpy()).mean() > 1e-3
        np.testing.assert_allclose(n[..., 0], n[..., 2], atol=1e-6)  # gray noise: same in all channels
        j = degradations.random_jpeg(key(i), CROP, (30, 40)).numpy()
        assert j.min() >= 0 and j.max() <= 1 and np.abs(j - CROP.numpy()).mean() > 1e-3


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match="known tasks: sr, depth, inpaint, edit, canny"):
        data.default_config("colorize")


def test_filter2d_matches_direct_correlation():
    img = tf.random.stateless_uniform([40, 33, 3], [3, 4])
    k = tf.random.stateless_uniform([21, 21], [5, 6])  # asymmetric: catches a flipped kernel
    padded = tf.pad(img, [[10, 10], [10, 10], [0, 0]], mode="REFLECT")
    direct = tf.nn.depthwise_conv2d(padded[None], tf.tile(k[:, :, None, None], [1, 1, 3, 1]), [1, 1, 1, 1], "VALID")[0]
    np.testing.assert_allclose(degradations.filter2d(img, k).numpy(), direct.numpy(), rtol=1e-5)
