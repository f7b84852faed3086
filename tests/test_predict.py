"""``python -m codi_jax.predict``: tiles that cover and blend exactly, no seam on a smooth picture
larger than a tile, 4x outputs of any size, folders with a bad file, inputs never overwritten."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codi_jax import predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo():
    return predict.load_predictor("embedded:demo_codi_sr")


def test_tiles_cover_the_picture_and_blend_back_exactly():
    assert predict.tile_starts(40, 16, 4) == [0, 12, 24]
    assert predict.tile_starts(16, 16, 4) == [0]
    assert predict.tile_starts(17, 16, 0) == [0, 1]
    canvas = np.random.default_rng(0).normal(size=(40, 52, 3)).astype(np.float32)
    starts = predict._grid(40, 52, 16, 4)
    tiles = [canvas[y:y + 16, x:x + 16] for y, x in starts]
    # The weights are normalised: tiles that agree where they overlap give the canvas back.
    np.testing.assert_allclose(predict.blend_tiles(tiles, starts, (40, 52), 4), canvas, rtol=1e-6, atol=1e-6)


def _border_and_inner(out, edges):
    dx = np.abs(np.diff(out, axis=1)).mean(axis=(0, 2))  # dx[c]: between columns c and c + 1
    border = np.array([dx[e - 1] for e in edges])
    inner = dx[[c for c in range(len(dx)) if all(abs(c + 1 - e) > 2 for e in edges)]]
    return border, inner


@pytest.mark.parametrize("steps", [1, 4])
def test_no_seam_on_a_smooth_picture_larger_than_a_tile(demo, steps):
    y, x = np.mgrid[0:160, 0:160] / 159.0
    smooth = (np.stack([0.2 + 0.5 * x, 0.3 + 0.4 * y, 0.6 - 0.3 * x * y], -1) * 2 - 1).astype(np.float32)
    stats = {}
    for overlap in (16, 0):  # 0: tiles butt against each other, the control that shows seams
        out = predict.predict(demo, smooth, steps, 0, 64, overlap, 4)
        assert out.shape == (160, 160, 3) and np.isfinite(out).all()
        starts = sorted({s * demo.factor for s in predict.tile_starts(160 // demo.factor, 16, overlap // 4)})
        edges = sorted({e for s in starts for e in (s, s + 64)} - {0, 160})
        stats[overlap] = _border_and_inner(out, edges)
    border, inner = stats[16]
    assert border.mean() <= 1.5 * inner.mean() and border.max() <= inner.max()
    border0, inner0 = stats[0]
    assert border0.mean() > 2 * inner0.mean()  # without blending the tile edges do show


@pytest.mark.parametrize("steps", [1, 4])
def test_one_tile_is_the_evaluation_sampler(demo, steps):
    """A picture of one tile: the per-step tiled loop is CoDi's sampler (``diffusion.codi_sample``,
    what the evaluation runs) from the same initial noise, then the decoder."""
    import jax.numpy as jnp

    from codi_jax import diffusion

    cond = np.asarray(np.random.default_rng(1).uniform(-1, 1, (64, 64, 3)), np.float32)
    out = predict.predict(demo, cond, steps, 3, 64, 16, 1)
    student, teacher = demo.student, demo.student.teacher
    c = student.encode_cond(demo.aux, jnp.asarray(cond[None]))
    denoise = diffusion.make_denoiser(lambda z, t: student.model_fn(demo.params, z, t, c, None),
                                      teacher.schedule, teacher.prediction_type)
    noise = predict.initial_noise(3, (16, 16, 4))[None]
    z = diffusion.codi_sample(denoise, jnp.asarray(noise), teacher.schedule, steps, demo.grid)
    expected = np.clip(np.asarray(student.decode(demo.aux, z))[0], -1, 1)
    np.testing.assert_allclose(out, expected, atol=2e-4)


def test_a_folder_with_a_bad_file_and_nested_pictures(demo, tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(src / "sub" / "a.png")
    (src / "broken.png").write_bytes(b"not a picture")
    written, skipped = predict.run("embedded:demo_codi_sr", str(src), str(tmp_path / "out"), steps=1,
                                   tile=64, overlap=16, progress=False)
    assert written == [str(tmp_path / "out" / "sub" / "a.png")]
    assert Image.open(written[0]).size == (112, 80)  # 4x, any size (not a multiple of the tile)
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    one = np.asarray(Image.open(written[0]), np.float32)
    predict.run("embedded:demo_codi_sr", str(src / "sub" / "a.png"), str(tmp_path / "out4"), steps=4,
                tile=64, overlap=16, progress=False)
    four = np.asarray(Image.open(tmp_path / "out4" / "a.png"), np.float32)
    assert four.shape == one.shape and np.abs(four - one).mean() > 1.0  # 4 steps is another sample
    with pytest.raises(ValueError, match="must differ"):
        predict.run("embedded:demo_codi_sr", str(src), str(src))
    with pytest.raises(ValueError, match="overwrite an input"):
        predict.run("embedded:demo_codi_sr", str(src / "sub" / "a.png"), str(src / "sub"))
    with pytest.raises(ValueError, match="not inpainting"):
        predict.run("embedded:demo_codi_sr", str(src), str(tmp_path / "o"), mask=str(src / "sub" / "a.png"))
    with pytest.raises(ValueError, match="--tile"):
        predict.run("embedded:demo_codi_sr", str(src), str(tmp_path / "o"), tile=40)


def test_command_line_with_the_embedded_model(tmp_path):
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    env = dict(os.environ, XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-m", "codi_jax.predict", "--model=embedded:demo_codi_sr",
                           f"--input={tmp_path / 'grey.png'}", f"--output={tmp_path / 'out'}", "--steps=1"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 1 picture(s)" in proc.stdout
    assert Image.open(tmp_path / "out" / "grey.png").size == (64, 64)
    bad = subprocess.run([sys.executable, "-m", "codi_jax.predict", "--model=embedded:demo_codi_sr",
                          f"--input={tmp_path / 'missing'}", f"--output={tmp_path / 'o'}"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert bad.returncode != 0 and "neither a file nor a folder" in bad.stderr


@pytest.mark.parametrize("task", ["depth", "inpaint", "canny", "edit"])
def test_every_task_of_codi_json(task, tmp_path):
    """A tiny untrained model of each task, exported as training exports it, runs on its kind of
    input at the input's size; inpainting keeps the known pixels and names a mask of the wrong size."""
    from codi_jax import sharding, train
    from codi_jax.export import export
    from tiny import tiny_config

    import jax

    cfg = tiny_config()
    cfg.data.task = task
    parts = train.setup(cfg, sharding.make_mesh(1, 1, jax.devices()[:1]))
    model = export(parts.student, train.final_params(parts.state, parts.frozen), str(tmp_path / "export"), cfg)
    rng = np.random.default_rng(2)
    picture = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
    src = tmp_path / "in"
    src.mkdir()
    kwargs = {}
    if task == "depth":
        np.save(src / "d.npy", rng.uniform(1, 10, (24, 20)).astype(np.float32))
    else:
        Image.fromarray(picture).save(src / "d.png")
    if task == "inpaint":
        masks = tmp_path / "masks"
        masks.mkdir()
        hole = np.zeros((24, 20), np.uint8)
        hole[6:14, 4:12] = 255
        Image.fromarray(hole).save(masks / "d.png")
        Image.fromarray(picture).save(src / "e.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "e.png")  # the wrong size
        kwargs["mask"] = str(masks)
    written, skipped = predict.run(model, str(src), str(tmp_path / "out"), steps=1, progress=False,
                                   prompt="make it blue" if task == "edit" else "", **kwargs)
    out = np.asarray(Image.open(tmp_path / "out" / "d.png"))
    assert out.shape == (24, 20, 3)
    if task == "inpaint":
        keep = hole == 0
        np.testing.assert_array_equal(out[keep], picture[keep])
        assert len(skipped) == 1 and "e.png" in skipped[0] and "8x8" in skipped[0]
    else:
        assert not skipped
