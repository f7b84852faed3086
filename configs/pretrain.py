"""Pretrain the embedded pixel-space teacher (unconditional, v-prediction) on the demo images.

``python -m codi_jax.main --config=configs/pretrain.py --workdir=runs/pretrain`` trains the
~2 M-parameter UNet of ``config_lib.DEMO_UNET`` from scratch with the standard diffusion loss on
32x32 crops; ``runs/pretrain/export`` is then the diffusers-layout pipeline folder that ships as
``codi_jax/assets/demo_teacher``. The shipped teacher is this config's run: 51 minutes on a
(shared, busy) 2-core CPU, v-MSE ≈ 0.05-0.08 over the last 1000 steps (0.078 at step 3000); its
README has the loss curve. Preset ``minimal`` runs a few steps (tests).
"""

from codi_jax import config_lib


def get_config(arg: str | None = None):
    c = config_lib.base_config("sr")
    c.objective = "diffusion"
    c.model.pretrained = ""           # random init from model.unet_config
    c.model.adapter = "none"
    c.model.prediction_type = "v_prediction"
    c.train.batch_size = 16
    c.train.num_steps = 3000
    c.train.lr = 1e-3
    c.train.lr_schedule = "cosine"
    c.train.warmup_steps = 200
    c.train.ema_decay = 0.999         # the exported teacher is the EMA (see train.py)
    c.train.checkpoint_every = 500
    c.train.log_every = 100
    c.eval.samplers = ("ddim",)
    c.eval.steps = (8, 32)
    if arg not in (None, "", "minimal"):
        raise ValueError(f"config: unknown preset {arg!r} of configs/pretrain.py; known: ['minimal']")
    if arg == "minimal":
        c.train.num_steps = 10
        c.train.warmup_steps = 2
        c.train.batch_size = 8
        c.train.checkpoint_every = 5
        c.eval.num_examples = 8
        c.eval.batch_size = 8
        c.eval.steps = (2,)
    return c
