"""Pretrain an embedded teacher (unconditional, v-prediction, SD's ``scaled_linear`` schedule).

* (none) — the latent UNet of the miniature Stable Diffusion: ``python -m codi_jax.main
  --config=configs/pretrain.py --workdir=runs/pretrain`` trains ``config_lib.MINI_UNET`` from
  scratch with the standard diffusion loss on 64x64 crops (16x16x4 latents of the miniature VAE,
  ``--config.model.vae``, default the shipped ``embedded:mini_sd``) of the embedded train pictures
  and procedural pictures, augmented. Every ``eval.every`` steps its EMA draws 50-step DDIM
  samples that are compared with held-out crops by multi-scale SWD (``eval_log.jsonl``): the
  curve that says when it stopped improving. ``runs/pretrain/export`` (UNet, VAE, scheduler) is
  ``codi_jax/assets/mini_sd``; its README has the measured curve and runtime.
* ``pixel`` — the older pixel-space demo teacher (``config_lib.DEMO_UNET`` on 32x32 crops of the
  ``demo`` source), which ships as ``codi_jax/assets/demo_teacher`` (51 minutes on a busy 2-core
  CPU, v-MSE ≈ 0.05-0.08 at the end).
* ``minimal`` — a few steps of the default (tests).

Schedule: SD's ``scaled_linear`` is kept, whose t = 1 still holds signal (α ≈ 0.068) that
sampling from N(0, I) never sees; the CoDi student's 1-step x̂ is conditioned, so it does not rely
on that signal, and ``model.schedule`` takes another schedule for the comparison.
"""

from codi_jax import config_lib


def get_config(arg: str | None = None):
    c = config_lib.base_config("unconditional")
    c.objective = "diffusion"
    c.model.pretrained = ""           # random init from model.unet_config
    c.model.vae = config_lib.MINI_SD
    c.model.adapter = "none"
    c.model.prediction_type = "v_prediction"
    c.train.batch_size = 16
    c.train.num_steps = 1500
    c.train.lr = 5e-4
    c.train.lr_schedule = "cosine"
    c.train.warmup_steps = 200
    c.train.eval_ema_decay = 0.999    # the exported teacher is this EMA
    c.train.checkpoint_every = 500
    c.train.log_every = 100
    c.eval.every = 500
    c.eval.splits = ("eval",)
    c.eval.samplers = ("ddim",)
    c.eval.steps = (50,)
    c.eval.num_examples = 128
    c.eval.batch_size = 64
    c.eval.grid_examples = 16
    if arg not in (None, "", "minimal", "pixel"):
        raise ValueError(f"config: unknown preset {arg!r} of configs/pretrain.py; known: ['minimal', 'pixel']")
    if arg == "pixel":
        c.data = config_lib.data_default_config("sr")
        c.model.unet_config = config_lib.DEMO_UNET
        c.model.vae = ""
        c.train.batch_size = 16
        c.train.num_steps = 3000
        c.train.lr = 1e-3
        c.eval.steps = (8, 32)
        c.eval.splits = ("eval",)
    if arg == "minimal":
        config_lib.make_minimal(c)
        c.eval.steps = (2,)
    return c
