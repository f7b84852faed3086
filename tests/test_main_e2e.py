"""The README's main command, end to end, on the minimal preset: every promised file appears, and
the exported model loads back as a working few-step sampler."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def _main(*args, cwd):
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's laptop run would have
    proc = subprocess.run([sys.executable, "-m", "codi_jax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_main_command_writes_every_output(tmp_path):
    workdir = tmp_path / "sr"
    _main(f"--config={REPO}/configs/sr.py:minimal", f"--workdir={workdir}", cwd=tmp_path)
    names = set(os.listdir(workdir))
    assert {"checkpoints", "eval.json", "eval_samples.png", "export"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert "30" in os.listdir(workdir / "checkpoints")
    results = json.loads((workdir / "eval.json").read_text())
    assert set(results["samplers"]) == {"codi", "codi+colorfix"}
    assert set(results["samplers"]["codi"]) == set(results["samplers"]["codi+colorfix"]) == {"1", "4"}
    for metrics in results["samplers"]["codi"].values():
        assert np.isfinite(metrics["psnr"]) and -1 <= metrics["ssim"] <= 1
    export = workdir / "export"
    assert {"unet", "cond_encoder", "scheduler", "codi.json", "model_index.json"} <= set(os.listdir(export))

    from codi_jax.distill import CMLossConfig
    from codi_jax.export import load_exported
    from codi_jax.sampling import JittedSamplers, make_sample_fn

    student, params, aux, grid = load_exported(str(export))
    assert grid == 20 and student.config["adapter"] == "cond_encoder" and student.teacher.latent
    batch = {"image": np.zeros((2, 32, 32, 3), np.float32),
             "cond": np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1))}
    out = jax.jit(make_sample_fn(student, "codi", grid, 1))(params, aux, batch, jax.random.PRNGKey(0))
    assert out.shape == (2, 32, 32, 3) and bool(np.all(np.isfinite(out)))
    # The evaluation's sampler (one compilation for every step count) is the same function.
    same = JittedSamplers(student).get("codi", grid, 1, CMLossConfig())(params, aux, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(same, out, atol=1e-5)
    # μ moved away from 0: the exported encoder is the trained one, not the initial copy.
    assert abs(float(params["adapter"]["mu"])) > 0
