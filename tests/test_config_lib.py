"""Presets compose (comma-separated, any order, key=value last) and every objective's section is its
config dataclass's defaults."""

import dataclasses
import os

import pytest

from codi_jax import config_lib
from codi_jax.distill import CMLossConfig, CoDiLossConfig, ProgressiveLossConfig

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def task_config(arg, task="sr"):
    """What ``--config=configs/<task>.py:<arg>`` builds."""
    return config_lib.config_module(os.path.join(CONFIGS, f"{task}.py"), task).get_config(arg)


def test_presets_compose_in_a_fixed_order():
    a = task_config("sd15,pe")
    b = task_config("pe,sd15")
    assert a.to_dict() == b.to_dict()
    assert a.model.pretrained.endswith("stable-diffusion-v1-5") and a.model.adapter == "controlnet"
    assert a.model.trainable == "adapter" and a.train.lr == 8e-6
    # minimal shrinks whatever recipe came before it; key=value comes after every preset.
    c = task_config("finetune,minimal,train.num_steps=5,eval.steps=(1,4)")
    assert c.objective == "diffusion" and c.data.image_size == 32
    assert c.train.num_steps == 5 and tuple(c.eval.steps) == (1, 4)
    # Every task config has the Stable Diffusion recipes.
    for task in ("depth", "inpaint", "edit"):
        assert task_config("sd21,pe", task).model.pretrained == "stabilityai/stable-diffusion-2-1"


def test_the_sr_default_is_its_own_run_and_named_presets_start_from_the_shared_base():
    shared = config_lib.task_config("sr")
    default = task_config(None)
    assert (default.train.batch_size, default.train.lr_schedule) == (4, "cosine")
    assert default.distill.rollout_fraction == 0.75
    # key=value overrides keep the default; a named preset starts from the shared settings, so the
    # methods' presets (and the reproduction's recorded runs) never inherit the SR tuning.
    assert task_config("train.num_steps=5").train.batch_size == 4
    assert task_config("base").to_dict() == shared.to_dict()
    assert task_config("pe").train.to_dict() == shared.train.to_dict()
    assert task_config("finetune").data.augment.to_dict() == shared.data.augment.to_dict()
    demo = task_config("demo")
    assert demo.train.to_dict() == {**shared.train.to_dict(), "num_steps": 3000}
    assert (demo.data.augment.channel_permute, demo.distill.rollout_fraction) == (True, 0.75)
    # Other tasks have no default of their own.
    assert task_config(None, "depth").to_dict() == config_lib.task_config("depth").to_dict()


@pytest.mark.parametrize("arg, message", [
    ("sd15,sd21", "exclude each other"), ("finetune,gd", "exclude each other"),
    ("nonsense", "unknown preset"), ("train.no_such_key=1", "unknown keys"),
])
def test_bad_presets_are_named(arg, message):
    with pytest.raises(ValueError, match=message):
        task_config(arg)


def test_objective_sections_are_the_dataclass_defaults():
    c = config_lib.base_config()
    assert c.distill.to_dict() == dataclasses.asdict(CoDiLossConfig(timestep_sampling="sample"))
    assert c.cm.to_dict() == dataclasses.asdict(CMLossConfig())
    assert ProgressiveLossConfig.from_mapping(c.gd.to_dict()) == ProgressiveLossConfig()
