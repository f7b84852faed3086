"""Per-chip peaks and the images/s and MFU arithmetic between two log points."""

import pytest

from codi_jax import throughput


def test_peaks_by_device_kind_and_override():
    assert throughput.peak_flops("TPU v5 lite") == 197e12      # v5e, not v5p
    assert throughput.peak_flops("TPU v5") == 459e12
    assert throughput.peak_flops("TPU v4") == 275e12
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("NVIDIA H200") == 989e12
    assert throughput.peak_flops("cpu") is None               # no MFU without a known peak
    assert throughput.peak_flops("cpu", override=2e12) == 2e12


def test_images_per_second_and_mfu_between_records():
    now = [0.0]
    meter = throughput.Throughput(global_batch=16, flops_per_device=3e12, peak=100e12, clock=lambda: now[0])
    assert meter.record(5) == {}          # nothing to measure from yet
    meter.restart(10)
    now[0] = 2.0
    got = meter.record(20)                # 10 steps in 2 s
    assert got["steps_per_second"] == pytest.approx(5.0)
    assert got["images_per_second"] == pytest.approx(80.0)
    assert got["mfu"] == pytest.approx(3e12 * 5 / 100e12)
    now[0] = 3.0
    assert meter.record(20) == {}         # no step done since
    assert "mfu" not in throughput.Throughput(16, 3e12, None, clock=lambda: now[0]).record(1)
