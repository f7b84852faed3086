"""The baselines in the trainer: CM, GD and Flash distil an exported fine-tuned conditional teacher; GD's
rounds (the round's teacher lives in the checkpointed state) resume bitwise across a boundary;
the reproduction's pipeline runs end to end on a smoke budget."""

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
    cfg.eval.samplers, cfg.eval.steps, cfg.eval.num_examples = ("flash",), (1, 2), 8
    cfg.export = True
    results = train.train_and_evaluate(cfg, whole)
    assert set(results["samplers"]["flash"]) == {"1", "2"}
    # The export records Flash's sampler and grid; predict follows them (the picture is two tiles).
    p = predict.load_predictor(os.path.join(whole, "export"))
    assert (p.sampler, p.grid) == ("flash", 8)
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


def test_reproduction_smoke_runs_the_baselines_and_writes_the_report(tmp_path):
    """The reproduction on its smoke budget, for the variants whose code paths differ from the
    CoDi run of the end-to-end test: the fine-tuned teacher, CM from it, GD's rounds from it."""
    wanted = {"teacher", "cm", "gd"}
    variants = [v for v in experiments.VARIANTS if v.name in wanted]
    summaries = experiments.run_all(str(tmp_path / "runs"), variants, smoke=True)
    assert set(summaries) == wanted
    # SR: each sampler is also scored after the colour fix.
    assert set(summaries["teacher"]["results"]["samplers"]) == {"ddim", "dpmpp", "ddim+colorfix", "dpmpp+colorfix"}
    assert set(summaries["gd"]["results"]["samplers"]) == {"ddim", "stochastic", "ddim+colorfix",
                                                            "stochastic+colorfix"}
    for s in summaries.values():
        for entries in s["results"]["samplers"].values():
            for e in entries.values():
                assert np.isfinite([e["psnr"], e["ssim"], e["swd"]]).all()
        assert "fid" in s["results"]["not_computed"] and "lpips" in s["results"]["not_computed"]
    # Rerunning finds every variant done (summary.json) and trains nothing.
    again = experiments.run_all(str(tmp_path / "runs"), variants, smoke=True)
    assert again == summaries
    path = report.write(summaries, str(tmp_path / "results.md"), command="cmd", commit="abc",
                        wall_time_s=1.0, smoke=True)
    text = open(path).read()
    assert "SMOKE RUN" in text and "| CM |" in text and "| GD, stochastic |" in text
    assert "FID / LPIPS: not computed" in text
    assert os.path.exists(str(tmp_path / "results_methods.png"))
    assert not os.path.exists(str(tmp_path / "results_ablations.png"))  # no ablation was run
    # Regenerating the tables keeps the hand-written discussion.
    with open(path, "a") as f:
        f.write("the analysis\n")
    report.write(summaries, path, command="cmd", commit="def", wall_time_s=1.0, smoke=True)
    text = open(path).read()
    assert "`def`" in text and text.endswith("the analysis\n") and text.count("## Discussion") == 1
