"""The console's own lines: the progress line and durations."""

from codi_jax import console


def test_progress_line_and_eta():
    line = console.progress_line(25, 400, 0.12345, {"steps_per_second": 2.5, "images_per_second": 40.0,
                                                    "mfu": 0.412})
    assert line == "step 25/400 (6%): loss 0.1235, 2.50 steps/s, 40.0 images/s, MFU 41.2%, ETA 2m30s"
    assert console.progress_line(1, 4, 1.0, {}) == "step 1/4 (25%): loss 1"
    assert console.duration(11_100) == "3h05m" and console.duration(7.4) == "7s"
