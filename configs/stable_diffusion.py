"""The Stable Diffusion recipes: the ``sd15`` / ``sd21`` presets of every task config
(``--config=configs/<task>.py:sd15``, composable with ``pe``, ``finetune``, ``key=value``...).

Not a config of its own: the task configs load it (``config_lib.config_module``) and pass
``RECIPES`` to ``config_lib.task_config``. Defaults follow the paper ("Conditional Diffusion
Distillation", arXiv:2310.01407, §5: teacher grid N = 20, one t per batch, PREv predictor,
latent-l2 CG) and the public CoDi recipe (AdamW lr 8e-6, EMA 0.99995, bf16 compute).
Runtime: days on a TPU v4-32 (docs/scaling.md sizes it with ``python -m codi_jax.plan``).
"""

import ml_collections

from codi_jax.data.config import default_config as data_default_config

HUB_IDS = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
           "sd21": "stabilityai/stable-diffusion-2-1"}


def apply(c: ml_collections.ConfigDict, version: str) -> ml_collections.ConfigDict:
    """Switches ``c`` (a task config) to the Stable Diffusion ``version`` recipe (``HUB_IDS``)."""
    if version not in HUB_IDS:
        raise ValueError(f"config: unknown Stable Diffusion recipe {version!r}; known: {sorted(HUB_IDS)}")
    c.model.pretrained = HUB_IDS[version]  # or a local diffusers folder (--config.model.pretrained)
    c.model.dtype = "bfloat16"
    c.model.remat = "nothing_saveable"
    # SD 2.x checkpoints already drop the last OpenCLIP layer: "last" is what the pipeline uses.
    c.model.text_layer = "last"
    c.model.cond_input = "latent"
    c.data.image_size = 512 if version == "sd15" else 768
    # The embedded set's augmentations are for a handful of pictures; a real dataset
    # (--config.data.source=tfds:<name> or folder:<path>) gets the usual random crop and flip only.
    c.data.augment = data_default_config(c.data.task).augment
    c.eval.splits = ()
    c.distill.timestep_sampling = "batch"
    c.train.lr = 8e-6
    c.train.ema_decay = 0.99995
    c.train.mu_lr_scale = 1.0
    c.train.batch_size = 64
    c.train.num_steps = 100_000
    c.train.warmup_steps = 1000
    c.train.weight_decay = 1e-2
    c.train.log_every = 100
    c.train.checkpoint_every = 2000
    c.eval.every = 5000
    c.eval.batch_size = 8
    c.eval.num_examples = 256
    c.mesh.fsdp = 8
    return c


RECIPES = {version: (lambda c, v=version: apply(c, v)) for version in HUB_IDS}
