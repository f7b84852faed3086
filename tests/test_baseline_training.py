"""The baselines in the trainer: CM, GD and Flash distil an exported fine-tuned conditional teacher; GD's
rounds (the round's teacher lives in the checkpointed state) resume bitwise across a boundary;
the reproduction's pipeline runs end to end on a smoke budget."""

import dataclasses
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from codi_jax import experiments, predict, report, sharding, train
from test_train import _checkpoint
from tiny import tiny_config


@pytest.fixture(scope="module")
def conditional_teacher(tmp_path_factory):
    """A tiny adapted model fine-tuned for two steps with the diffusion loss, exported."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    cfg = tiny_config(num_steps=2)
    cfg.objective = "diffusion"
    cfg.export = True
    train.train_and_evaluate(cfg, workdir)
    return os.path.join(workdir, "export")


def _baseline_config(objective, teacher, **train_overrides):
    cfg = tiny_config(**train_overrides)
    cfg.objective = objective
    cfg.model.conditional_teacher = teacher
    cfg.gd.teacher_steps, cfg.gd.target_steps = 4, 1   # two rounds: 4 → 2 → 1 steps
    return cfg


def test_baselines_need_a_conditional_teacher():
    for objective in ("cm", "gd", "flash"):
        cfg = tiny_config()
        cfg.objective = objective
        with pytest.raises(ValueError, match="conditional_teacher"):
            train.setup(cfg, sharding.make_mesh(1, 1, jax.devices()[:1]))


def test_cm_student_starts_as_the_frozen_teacher(conditional_teacher):
    cfg = _baseline_config("cm", conditional_teacher)
    s = train.setup(cfg, sharding.make_mesh(1, 1, jax.devices()[:1]))
    for a, b in zip(jax.tree.leaves(s.state["params"]), jax.tree.leaves(s.aux["teacher"])):
        np.testing.assert_array_equal(a, b)


def test_gd_rounds_chain_and_resume_bitwise_at_a_round_boundary(conditional_teacher, tmp_path):
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    train.train_and_evaluate(_baseline_config("gd", conditional_teacher), whole)   # 2 rounds × 2 steps
    step2, step4 = _checkpoint(whole, 2), _checkpoint(whole, 4)
    # Round 1's frozen teacher is round 0's final student.
    for a, b in zip(jax.tree.leaves(step4["round_teacher"]), jax.tree.leaves(step2["params"])):
        np.testing.assert_array_equal(a, b)
    # Round 0's teacher is the exported fine-tuned model, unchanged by round 0's training.
    _, exported = train.load_conditional_teacher(_baseline_config("gd", conditional_teacher))
    for a, b in zip(jax.tree.leaves(step2["round_teacher"]), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(a, b)
    # "Preempted" right after round 0: only the step-2 checkpoint survives; resuming starts round 1.
    shutil.copytree(whole, halves)
    shutil.rmtree(os.path.join(halves, "checkpoints", "4"))
    train.train_and_evaluate(_baseline_config("gd", conditional_teacher), halves)
    for a, b in zip(jax.tree.leaves(step4), jax.tree.leaves(_checkpoint(halves, 4))):
        np.testing.assert_array_equal(a, b)


def test_flash_trains_student_and_discriminator_and_resumes_bitwise(conditional_teacher, tmp_path):
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    cfg = _baseline_config("flash", conditional_teacher)
    cfg.flash.num_timesteps, cfg.flash.teacher_steps = 8, 2
    cfg.eval.samplers, cfg.eval.steps, cfg.eval.num_examples = ("renoise",), (1, 2), 8
    cfg.export = True
    results = train.train_and_evaluate(cfg, whole)
    assert set(results["samplers"]["renoise"]) == {"1", "2"}
    # The export records Flash's sampler and grid; predict follows them (the picture is two tiles).
    p = predict.load_predictor(os.path.join(whole, "export"))
    assert (p.sampler, p.grid) == ("renoise", 8)
    out = predict.predict(p, np.zeros((16, 24, 3), np.float32), steps=2, seed=0, tile=16, overlap=8, batch=2)
    assert out.shape == (16, 24, 3) and np.all(np.isfinite(out))
    cfg.export = False
    step0 = train.setup(cfg, sharding.make_mesh(1, 1, jax.devices()[:1])).state
    step4 = _checkpoint(whole, 4)
    # Both players moved: the student away from the teacher, the head away from its init.
    for name in ("params", "disc"):
        assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0
                   for a, b in zip(jax.tree.leaves(step4[name]), jax.tree.leaves(step0[name]))), name
    # Each has its own optimizer state in the checkpoint, and a resumed run is bitwise the same.
    assert jax.tree.leaves(step4["disc_opt_state"])
    # The timestep distribution follows train.num_steps: a shorter run is not the first half of a
    # longer one, so the halves run is "killed" by removing its later checkpoint instead.
    shutil.copytree(whole, halves)
    shutil.rmtree(os.path.join(halves, "checkpoints", "4"))
    cfg.eval.num_examples = 0
    train.train_and_evaluate(cfg, halves)
    for a, b in zip(jax.tree.leaves(step4), jax.tree.leaves(_checkpoint(halves, 4))):
        np.testing.assert_array_equal(a, b)


def test_gd_rounds_split_the_steps_as_evenly_as_integers_allow():
    cfg = tiny_config(num_steps=5)
    cfg.objective = "gd"
    cfg.gd.teacher_steps, cfg.gd.target_steps = 8, 1          # three rounds: 8 → 4 → 2 → 1 steps
    rounds = train.training_rounds(cfg)
    assert [(r.student_steps, r.start) for r in rounds] == [(4, 0), (2, 1), (1, 3)]
    assert [train.current_round(rounds, step).student_steps for step in range(5)] == [4, 2, 2, 1, 1]
    cfg.train.num_steps = 2
    with pytest.raises(ValueError, match="fewer than the 3 GD rounds"):
        train.train_and_evaluate(cfg, "/nonexistent-never-written")


def test_reproduction_smoke_curves_budgets_seeds_files_and_report(tmp_path):
    """The reproduction's protocol on its smoke budget, for the variants whose code paths differ
    from the CoDi run of the end-to-end test: the fine-tuned teacher (two seeds: seed 0 from its
    curve's checkpoint, seed 1 trained to the budget), CM from it, GD (the cap)."""
    by = experiments.BY_NAME
    variants = [dataclasses.replace(by["teacher"], seeds=2), dataclasses.replace(by["cm"], seeds=1),
                dataclasses.replace(by["gd"], seeds=1)]
    results = str(tmp_path / "results")
    repro = experiments.Reproduction(str(tmp_path / "runs"), results, smoke=True)
    repro.run(variants)
    runs, curves = report.load(results)
    assert set(curves) == {"teacher", "cm", "gd"} and set(runs) == {"teacher", "cm", "gd"}
    cap, every = experiments.SMOKE["cap"], experiments.SMOKE["every"]
    for c in curves.values():
        assert [p["step"] for p in c["points"]] == list(range(every, cap + 1, every))
        assert c["budget"] == experiments.flat_budget([(p["step"], p["psnr@4"]) for p in c["points"]])[0]
    assert [r["seed"] for r in runs["teacher"]] == [0, 1]
    budget = curves["teacher"]["budget"]
    for r in runs["teacher"]:
        assert r["train_steps"] == budget and r["results"]["step"] == budget
        assert set(r["results"]["samplers"]) == {"ddim", "dpmpp", "stochastic", "ddim+colorfix",
                                                  "dpmpp+colorfix", "stochastic+colorfix"}
    # The two seeds share data and evaluation noise but not the training randomness.
    assert runs["teacher"][0]["config_hash"] != runs["teacher"][1]["config_hash"]
    assert set(report.samplers_of(runs["cm"])) == {"cm", "cm_ddim"}
    assert runs["gd"][0]["train_steps"] == cap and runs["gd"][0]["budget_rule"].startswith("the cap")
    for records in runs.values():
        for r in records:
            assert r["results"]["trainable_params"] > 0
            for entries in r["results"]["samplers"].values():
                for e in entries.values():
                    assert np.isfinite([e["psnr"], e["ssim"], e["swd"]]).all()
            assert "fid" in r["results"]["not_computed"] and "lpips" in r["results"]["not_computed"]
    assert os.path.exists(os.path.join(results, "teacher", "samples.jpg"))
    # Rerunning finds every file with its config hash and trains nothing, even without the
    # checkpoints (another machine): only the files are kept.
    shutil.rmtree(str(tmp_path / "runs" / "gd"))
    stamps = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(results, "*", "*.json"))}
    repro.run(variants)
    assert {p: os.path.getmtime(p) for p in glob.glob(os.path.join(results, "*", "*.json"))} == stamps
    assert "codi curve" in repro.missing() and "teacher seed 2" in repro.missing()
    # A machine with the files but not the checkpoints or exports: CM's seed 0 is missing, so it
    # is trained to its budget from the curve file, from its teacher's export trained again.
    cm0 = json.load(open(os.path.join(results, "cm", "seed0.json")))
    os.remove(os.path.join(results, "cm", "seed0.json"))
    shutil.rmtree(str(tmp_path / "runs"))
    repro.run(variants)
    again = json.load(open(os.path.join(results, "cm", "seed0.json")))
    assert (again["config_hash"], again["train_steps"]) == (cm0["config_hash"], cm0["train_steps"])
    assert os.path.isdir(str(tmp_path / "runs" / "teacher" / "seed0" / "export"))
    assert not os.path.exists(str(tmp_path / "runs" / "teacher" / "curve"))  # no curve was rerun
    path = report.write(results, str(tmp_path / "results.md"), command="cmd", commit="abc", smoke=True,
                        missing=repro.missing(), protocol=experiments.protocol(smoke=True))
    text = open(path).read()
    assert "SMOKE RUN" in text and "| CM |" in text and "| Fine-tuned teacher | " in text
    assert "codi curve" in text and "FID / LPIPS: not computed" in text
    # A two-seed teacher against a one-seed CM: the claim rows that need CoDi are "not run".
    assert "| CoDi beats CM | — | — | not run | not run |" in text
    assert os.path.exists(str(tmp_path / "results_curves.png"))
    assert os.path.exists(str(tmp_path / "results_methods.png"))
    assert not os.path.exists(str(tmp_path / "results_ablations.png"))  # no ablation was run
    # Regenerating the tables keeps the hand-written discussion.
    with open(path, "a") as f:
        f.write("the analysis\n")
    report.write(results, path, command="cmd", commit="def", smoke=True)
    text = open(path).read()
    assert "`def`" in text and text.endswith("the analysis\n") and text.count("## Discussion") == 1


def test_verdicts_follow_two_standard_errors():
    def runs(name, values):
        return [{"name": name, "label": name, "seed": k, "train_steps": 1,
                 "results": {"samplers": {"codi": {"4": {"psnr": v, "swd": 0.1}}}}} for k, v in enumerate(values)]

    r = {"codi": runs("codi", [20.0, 20.2, 20.4]), "cm": runs("cm", [19.0, 19.2, 19.4]),
         "pe_codi": runs("pe_codi", [20.1, 20.3, 20.5]), "no_cg": runs("no_cg", [21.5])}
    assert report.judge(r, "codi", "cm", 4, 4)["psnr"]["verdict"] == "holds"            # 1.0 vs SE 0.16
    assert report.judge(r, "codi", "pe_codi", 4, 4)["psnr"]["verdict"] == "inconclusive"
    one = report.judge(r, "codi", "no_cg", 4, 4)["psnr"]   # one seed: borrows CoDi's spread
    assert one["borrowed"] and one["verdict"] == "does not hold"
    np.testing.assert_allclose(one["se"], 0.2 * np.sqrt(1 / 3 + 1), rtol=1e-9)
    assert report.judge(r, "codi", "cm", 4, 4)["swd"]["verdict"].startswith("inconclusive")  # equal SWDs
    assert experiments.flat_budget([(500, 20.0), (1000, 20.5), (1500, 20.6), (2000, 20.7)]) == (1500, True)
    assert experiments.flat_budget([(500, 20.0), (1000, 20.5), (1500, 21.0)]) == (1500, False)


def test_config_hash_ignores_a_later_switch_left_off():
    """A switch added after results were recorded does not change the hash of a run that leaves it
    off (those results stay valid), and does change it when set."""
    cfg = tiny_config(num_steps=2)
    digest = experiments.config_hash(cfg, teacher_hash="t")
    for key, off in experiments.HASHED_WHEN_SET.items():
        section, name = key.split(".")
        assert cfg[section][name] == off
        del cfg[section][name]
        assert experiments.config_hash(cfg, teacher_hash="t") == digest
        cfg[section][name] = off
        cfg[section][name] = 0.5
        assert experiments.config_hash(cfg, teacher_hash="t") != digest
