"""The SR literature's PSNR / SSIM (Y channel, border crop) against scikit-image's independent
implementations of the same formulas, to 1e-4."""

import numpy as np
import pytest
from skimage import color, data, metrics as skm

from codi_jax.metrics import sr


@pytest.fixture(scope="module")
def pair():
    hr = data.astronaut()[::4, ::4]  # 128x128x3 uint8
    noise = np.random.default_rng(0).normal(0, 12, hr.shape)
    return hr, np.clip(np.round(hr + noise), 0, 255).astype(np.uint8)


def test_y_channel_is_bt601_studio_range(pair):
    hr, _ = pair
    np.testing.assert_allclose(sr.y_channel(hr)[..., 0], color.rgb2ycbcr(hr)[..., 0], atol=1e-6)


def test_psnr_and_ssim_match_scikit_image(pair):
    hr, sr_img = pair
    for y in (True, False):
        for border in (0, 4):
            def crop(x):
                x = sr.y_channel(x) if y else x.astype(np.float64)
                return x[border:x.shape[0] - border, border:x.shape[1] - border]

            a, b = crop(hr), crop(sr_img)
            ref_psnr = skm.peak_signal_noise_ratio(a, b, data_range=255)
            ref_ssim = skm.structural_similarity(a, b, data_range=255, channel_axis=-1, gaussian_weights=True,
                                                 sigma=1.5, use_sample_covariance=False)
            assert sr.psnr(hr, sr_img, border, y) == pytest.approx(ref_psnr, abs=1e-4)
            assert sr.ssim(hr, sr_img, border, y) == pytest.approx(ref_ssim, abs=1e-4)
    assert sr.psnr(hr, hr) == float("inf") and sr.ssim(hr, hr) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="uint8"):
        sr.psnr(hr, hr[:64])
