"""Data pipelines (codi_jax.data): demo builder, resumable train stream, eval split, sources, robustness."""
import json

import numpy as np
import pytest
from PIL import Image

from codi_jax import data
from codi_jax.data import demo, sources
from tiny import write_tiny_tokenizer


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def demo_cfg(task, demo_dir, **overrides):
    cfg = data.default_config(task)
    cfg.data_dir = demo_dir
    cfg.demo.train_crops_per_image = 8
    cfg.demo.eval_crops_per_image = 2
    cfg.demo.depth_crop_multiplier = 4
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def take(it, n):
    return [next(it) for _ in range(n)]


def test_demo_held_out_split_never_overlaps_training(demo_dir):
    cfg = demo_cfg("sr", demo_dir)
    builder = demo.build_demo(demo.demo_config(32, 8, 2, 0.25, 4), demo_dir)
    s = 32
    train = list(builder.as_data_source("train"))
    evals = list(builder.as_data_source("eval"))
    assert len(train) == 16 * 8 and len(evals) == 16 * 2  # 15 images + the motorcycle
    for e in evals:
        for t in train:
            if t["source"] == e["source"]:
                overlap_x = t["x"] < e["x"] + s and e["x"] < t["x"] + s
                overlap_y = t["y"] < e["y"] + s and e["y"] < t["y"] + s
                assert not (overlap_x and overlap_y), (e["source"], e["x"], t["x"])
    train_pixels = {t["image"].tobytes() for t in train}
    assert not any(e["image"].tobytes() in train_pixels for e in evals)
    depth = builder.as_data_source("train_depth")
    assert len(depth) == 8 * 4 and all(d["has_depth"] and d["depth"].shape == (s, s, 1) for d in depth)
    assert cfg.eval_split == "eval"


@pytest.mark.parametrize("task,channels", [("sr", 3), ("depth", 3), ("inpaint", 4), ("edit", 3), ("canny", 3)])
def test_every_task_yields_trainer_batches(demo_dir, task, channels):
    it = data.make_train_iterator(demo_cfg(task, demo_dir), global_batch_size=4, seed=1, process_index=0, process_count=1)
    b = next(it)
    assert set(b) == {"image", "cond"}  # no tokenizer configured: no text
    assert b["image"].shape == (4, 32, 32, 3) and b["cond"].shape == (4, 32, 32, channels)
    assert b["image"].dtype == b["cond"].dtype == np.float32
    assert b["cond"].min() >= -1 and b["cond"].max() <= 1 and b["cond"].std() > 0.05
    assert data.cond_channels(demo_cfg(task, demo_dir)) == channels


def test_resume_reproduces_the_uninterrupted_stream(demo_dir):
    # depth split: 32 records, 16 per process, 4 per step -> an epoch every 4 steps.
    cfg = demo_cfg("depth", demo_dir)
    kw = dict(global_batch_size=8, seed=3, process_index=1, process_count=2)
    full = take(data.make_train_iterator(cfg, **kw), 7)
    resumed = take(data.make_train_iterator(cfg, start_step=5, **kw), 2)
    for a, b in zip(full[5:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["cond"], b["cond"])
    # SR: the degradation is keyed by the example index too.
    sr = demo_cfg("sr", demo_dir)
    full = take(data.make_train_iterator(sr, global_batch_size=4, seed=0, process_index=0, process_count=1), 3)
    resumed = next(data.make_train_iterator(sr, global_batch_size=4, seed=0, start_step=2, process_index=0, process_count=1))
    np.testing.assert_array_equal(full[2]["cond"], resumed["cond"])
    other_seed = next(data.make_train_iterator(sr, global_batch_size=4, seed=1, process_index=0, process_count=1))
    assert not np.array_equal(full[0]["image"], other_seed["image"])


def test_each_epoch_is_a_permutation_of_the_process_shard(demo_dir):
    # No flip and crop == record size: batch images are the records themselves.
    cfg = demo_cfg("depth", demo_dir, random_flip=False)

    def epochs(p):
        it = data.make_train_iterator(cfg, global_batch_size=8, seed=0, process_index=p, process_count=2)
        batches = take(it, 8)
        keys = [[x.tobytes() for b in batches[e * 4 : e * 4 + 4] for x in b["image"]] for e in range(2)]
        return keys

    p0, p1 = epochs(0), epochs(1)
    for keys in (p0, p1):
        assert len(set(keys[0])) == 16 and set(keys[0]) == set(keys[1])  # every record once per epoch
        assert keys[0] != keys[1]  # reshuffled each epoch
    assert not set(p0[0]) & set(p1[0])  # processes read disjoint shards


def test_batch_must_divide_over_processes(demo_dir):
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        data.make_train_iterator(demo_cfg("sr", demo_dir), global_batch_size=8, seed=0, process_index=0, process_count=3)


def test_eval_split_padded_deterministic_and_sharded(demo_dir):
    cfg = demo_cfg("inpaint", demo_dir)
    shards = [data.make_eval_dataset(cfg, global_batch_size=12, process_index=p, process_count=2) for p in range(2)]
    runs = [list(ev) for ev in shards]
    assert len(runs[0]) == len(runs[1]) == len(shards[0]) == 3  # ceil(32 / 12)
    assert sum(int(b["mask"].sum()) for r in runs for b in r) == 32
    # The last global batch holds records 24..35: process 1's slice is 30..35, 32..35 padding.
    assert runs[0][-1]["mask"].all() and runs[1][-1]["mask"].tolist() == [True] * 2 + [False] * 4
    again = list(shards[0])
    for a, b in zip(runs[0], again):
        np.testing.assert_array_equal(a["cond"], b["cond"])
    # A global batch is the same records (and degradations) whatever the process count.
    single = list(data.make_eval_dataset(cfg, global_batch_size=12, process_index=0, process_count=1))
    np.testing.assert_array_equal(single[0]["cond"][:6], runs[0][0]["cond"])
    np.testing.assert_array_equal(single[0]["cond"][6:], runs[1][0]["cond"])
    np.testing.assert_array_equal(single[1]["image"][6:], runs[1][1]["image"])


def test_unknown_source_and_tfds_errors(demo_dir):
    cfg = demo_cfg("sr", demo_dir, source="s3:bucket")
    with pytest.raises(ValueError, match="known sources: embedded, demo, tfds:<name>, folder:<path>"):
        data.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
    cfg = demo_cfg("sr", demo_dir, source="tfds:mnistt")
    with pytest.raises(ValueError, match="did you mean: .*mnist"):
        data.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_tfds_source_by_name(demo_dir):
    config = demo.demo_config(32, 8, 2, 0.25, 4)
    demo.build_demo(config, demo_dir)  # a prepared dataset in data_dir, like any TFDS dataset
    name = "tfds:codi_demo/" + config.name
    cfg = demo_cfg("sr", demo_dir, source=name)
    cfg.tfds.text_key = "text"
    b = next(data.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1))
    assert b["cond"].shape == (2, 32, 32, 3)
    # The train split has depth only for the motorcycle crops: the others are skipped and counted.
    depth = demo_cfg("depth", demo_dir, source=name)
    it = data.make_train_iterator(depth, global_batch_size=4, seed=0, process_index=0, process_count=1)
    b = next(it)
    assert it.skipped["missing_condition"] > 0 and b["cond"].min() == -1 and b["cond"].max() == 1
    edit = demo_cfg("edit", demo_dir, source=name)
    with pytest.raises(ValueError, match="no condition feature 'input_image'; its features: .*depth"):
        data.make_train_iterator(edit, global_batch_size=2, seed=0, process_index=0, process_count=1)


def _save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


@pytest.fixture()
def messy_folder(tmp_path):
    rng = np.random.default_rng(0)
    img = tmp_path / "images"
    _save(img / "good.png", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    _save(img / "sub" / "gray.png", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    _save(img / "rgba.png", rng.integers(0, 255, (40, 40, 4), dtype=np.uint8))
    _save(img / "deep.png", rng.integers(0, 65535, (40, 40), dtype=np.uint16))
    _save(img / "small.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    _save(img / "trunc.jpg", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    full = (img / "trunc.jpg").read_bytes()
    (img / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (img / "empty.png").write_bytes(b"")
    (img / "notes.txt").write_text("not an image")
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "good.png", "text": "a cat"}) + "\n")
    return tmp_path


def test_folder_skips_and_counts_bad_files(messy_folder):
    cfg = data.default_config("sr")
    cfg.source = f"folder:{messy_folder}"
    it = data.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
    batches = take(it, 6)  # 24 examples over 7 listed images: every bad one is hit
    assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
    assert it.skipped["unreadable"] >= 2 and it.skipped["too_small"] >= 1
    assert it.skipped["converted"] >= 3  # gray, RGBA and 16-bit are converted, not dropped
    assert it.source.scan_counts["not_an_image"] == 1
    cfg.convert_modes = False
    it = data.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
    take(it, 6)
    assert it.skipped["mode"] >= 3 and it.skipped["converted"] == 0
    cfg.strict = True
    with pytest.raises(ValueError, match="notes.txt: not an image file"):
        data.make_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)


def test_image_conversions():
    rgba = np.zeros((2, 2, 4), np.uint8)  # fully transparent black -> white
    out, kind = sources.array_to_rgb(rgba, "x")
    assert kind == "alpha" and (out == 255).all()
    deep, kind = sources.array_to_rgb(np.full((2, 2), 65535, np.uint16), "x")
    assert kind == "16bit" and (deep == 255).all() and deep.shape == (2, 2, 3)
    with pytest.raises(sources.BadExample):
        sources.array_to_rgb(np.zeros((2, 2), np.float32), "x")


def test_folder_depth_requires_depth_maps(tmp_path):
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        _save(tmp_path / "images" / f"{stem}.png", rng.integers(0, 255, (36, 36, 3), dtype=np.uint8))
    np.save(tmp_path / "depth" / "a.npy" if (tmp_path / "depth").mkdir() is None else None, rng.random((18, 18)).astype(np.float32))
    cfg = data.default_config("depth")
    cfg.source = f"folder:{tmp_path}"
    it = data.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
    b = next(it)
    assert b["cond"].shape == (2, 32, 32, 3) and b["cond"].min() == -1 and b["cond"].max() == 1
    assert it.source.scan_counts["missing_depth"] == 1
    cfg.strict = True
    with pytest.raises(ValueError, match="b.png: no depth/b.* .*no depth estimator is bundled"):
        data.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_instructpix2pix_folder_with_tokenizer(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ip2p"
    for i, instruction in enumerate(["make it red", "add a hat"]):
        d = root / f"{i:07d}"
        _save(d / "11_0.jpg", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
        _save(d / "11_1.jpg", np.zeros((40, 40, 3), np.uint8))  # the edited image: black
        (d / "prompt.json").write_text(json.dumps({"input": "x", "edit": instruction, "output": "y"}))
    vocab = write_tiny_tokenizer(tmp_path / "tok")
    cfg = data.default_config("edit")
    cfg.source = f"folder:{root}"
    cfg.tokenizer = str(tmp_path / "tok")
    cfg.max_text_length = 8
    b = next(data.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1))
    assert b["text"].shape == (2, 8) and b["text"].dtype == np.int32
    assert (b["text"][:, 0] == vocab["<|startoftext|>"]).all() and (b["text"][:, 1] != vocab["<|endoftext|>"]).all()
    assert (b["image"] == -1).all() and b["cond"].std() > 0.1  # target = edited, cond = input


def test_check_batch_rejects_wrong_tensors():
    cfg = data.default_config("sr")
    good = {"image": np.zeros((2, 32, 32, 3), np.float32), "cond": np.zeros((2, 32, 32, 3), np.float32)}
    from codi_jax.data.pipeline import check_batch

    check_batch(good, 2, cfg)
    with pytest.raises(RuntimeError, match="outside"):
        check_batch({**good, "cond": good["cond"] + 2}, 2, cfg)
    with pytest.raises(RuntimeError, match="float64"):
        check_batch({**good, "image": good["image"].astype(np.float64)}, 2, cfg)


def test_folder_eval_resizes_short_side_and_center_crops(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    _save(tmp_path / "val" / "big.png", big)
    cfg = data.default_config("canny")
    cfg.source = f"folder:{tmp_path / 'val'}"
    cfg.eval_split = str(tmp_path / "val")
    cfg.resize_short_side = 32
    (batch,) = list(data.make_eval_dataset(cfg, global_batch_size=2, process_index=0, process_count=1))
    assert batch["mask"].tolist() == [True, False]
    expected = np.asarray(Image.fromarray(big).resize((48, 32), Image.BICUBIC, reducing_gap=3.0))[:, 8:40]
    np.testing.assert_allclose(batch["image"][0], expected / 127.5 - 1.0, atol=1e-5)
    cfg.eval_split = "eval"
    with pytest.raises(ValueError, match="must be a folder path"):
        data.make_eval_dataset(cfg, global_batch_size=2, process_index=0, process_count=1)


def test_strict_bad_file_at_load_is_a_clear_error(tmp_path):
    _save(tmp_path / "small.png", np.zeros((8, 8, 3), np.uint8))
    cfg = data.default_config("sr")
    cfg.source = f"folder:{tmp_path}"
    cfg.strict = True
    it = data.make_train_iterator(cfg, global_batch_size=1, seed=0, process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="small.png.*8x8 < crop 32.*data.strict=True"):
        next(it)
