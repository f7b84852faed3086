"""``python -m codi_jax.evaluate`` on a paired HR/LR folder: every promised file, the SR protocol's
numbers for bicubic, a missing pair named."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data

from safetensors.numpy import save_file
from test_dists import _random_dists
from test_metrics import _random_lpips, _to_torch_state

from codi_jax import paired_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_command_on_a_paired_folder(tmp_path):
    hr_dir, lr_dir = tmp_path / "set" / "HR", tmp_path / "set" / "LR"
    hr_dir.mkdir(parents=True)
    lr_dir.mkdir()
    pictures = {"astronaut": data.astronaut()[100:166:1, 150:218], "coffee": data.coffee()[50:114, 200:264]}
    for name, hr in pictures.items():  # 66x68: cropped to 64x68, the LR's size x4
        Image.fromarray(hr).save(hr_dir / f"{name}.png")
        Image.fromarray(hr[:64]).resize((hr.shape[1] // 4, 16), Image.BICUBIC).save(lr_dir / f"{name}.png")
    out = tmp_path / "out"
    # LPIPS and DISTS from weight files (random AlexNet + heads in the torchvision / LPIPS layout,
    # random VGG16 + α, β); no FID weights.
    metric = _random_lpips("alex")
    save_file(_to_torch_state(metric.params), str(tmp_path / "lpips_alex.safetensors"))
    dists_metric = _random_dists()
    save_file(_to_torch_state(dists_metric.params), str(tmp_path / "dists.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "codi_jax.evaluate", "--model=embedded:demo_codi_sr",
                           f"--dataset=folder:{tmp_path / 'set'}", "--steps=1", f"--output={out}",
                           f"--lpips_weights={tmp_path / 'lpips_alex.safetensors'}",
                           f"--dists_weights={tmp_path / 'dists.safetensors'}"],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, XLA_FLAGS=""), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "eval.json").read_text())
    assert results["num_pictures"] == 2 and results["protocol"]["crop_border"] == 4
    assert set(results["steps"]) == {"1"} and results["fid"]["1"].startswith("not computed: FID: no weight")
    assert "lpips" not in results and "dists" not in results  # both computed:
    hr0 = np.asarray(Image.open(hr_dir / "astronaut.png"))[:64]
    out0 = np.asarray(Image.open(out / "steps_1" / "astronaut.png"))
    signed = lambda x: x.astype(np.float32)[None] / 127.5 - 1.0
    first = next(r for r in csv.DictReader(open(out / "eval.csv")) if r["method"] != "bicubic")
    assert float(first["lpips"]) == pytest.approx(float(metric(signed(out0), signed(hr0))[0]), rel=1e-4)
    assert float(first["dists"]) == pytest.approx(float(dists_metric(signed(out0), signed(hr0))[0]), rel=1e-4)
    assert results["steps"]["1"]["lpips"] > 0 and results["bicubic"]["lpips"] > 0
    assert results["steps"]["1"]["dists"] > 0 and results["bicubic"]["dists"] > 0
    assert "DISTS" in proc.stdout
    assert {"eval.csv", "psnr_vs_steps.png", "steps_1"} <= set(os.listdir(out))
    assert sorted(os.listdir(out / "steps_1")) == ["astronaut.png", "coffee.png"]
    assert Image.open(out / "steps_1" / "astronaut.png").size == (68, 64)
    rows = list(csv.DictReader(open(out / "eval.csv")))
    assert [(r["picture"], r["method"]) for r in rows] == [
        ("astronaut", "bicubic"), ("astronaut", "codi+colorfix"), ("coffee", "bicubic"), ("coffee", "codi+colorfix")]
    # The bicubic row is the protocol applied to the bicubic upsampling of the LR file.
    for r in rows[::2]:
        assert 15 < float(r["psnr"]) < 40 and 0 < float(r["ssim"]) <= 1
    assert results["bicubic"]["psnr"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows[::2]]))

    (lr_dir / "coffee.png").unlink()
    with pytest.raises(FileNotFoundError, match="coffee"):
        paired_eval.paired_files(str(tmp_path / "set"))
