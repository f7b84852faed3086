"""Pretrain the miniature Stable Diffusion's autoencoder (diffusers ``AutoencoderKL`` layout).

The shipped ``vae/`` of ``codi_jax/assets/mini_sd`` is two runs (``tools/build_mini_sd.sh``):

* (none) — ``python -m codi_jax.main --config=configs/pretrain_vae.py --workdir=runs/vae`` trains
  ``config_lib.MINI_VAE`` (4 latent channels, downsampling 4, GroupNorm groups of 4 channels) for
  2500 steps on 32 px random crops of the embedded train pictures, the procedural dead-leaves
  pictures and 1024 smooth colour fields (augmented), with the reconstruction objective of
  ``codi_jax/autoencoder.py``; evaluates the reconstruction PSNR of its EMA on the held-out
  pictures (``eval``) and the held-out procedural ones (``eval_procedural``) every ``eval.every``
  steps (``eval_log.jsonl``), and writes ``runs/vae/export/vae`` with the measured
  ``scaling_factor``. About 16 minutes on an idle 2-core CPU: 31.36 dB on held-out 32 px crops.
* ``finetune64`` — ``--config=configs/pretrain_vae.py:finetune64 --workdir=runs/vae64
  --config.model.vae=runs/vae/export/vae``: 1000 more steps at lr 3e-4 on 64 px crops, the size
  the SR model works at (GroupNorm statistics depend on the picture size: trained at 32 px only,
  it shifts colours at 64). About 20 minutes: 31.38 dB on held-out 64 px crops, no colour
  shift, and the bicubic SR input decodes at bicubic's PSNR (the mini_sd README's probes).

``--config.model.vae=<VAE or pipeline folder, or embedded:mini_sd>`` fine-tunes a trained
autoencoder instead of a fresh one, and ``--config.autoencoder.trainable=decoder`` its decoder
only (the encoder, and so the latent space the teacher was trained in, frozen). Presets:
``minimal`` (a few steps; tests); ``wide`` (64/128/128 channels, 3.8 M parameters against
0.95 M). The mini_sd README has every autoencoder tried and what it gave: the earlier 16-group
one, ``wide``, random RGB permutations (``--config.data.augment.channel_permute=True``),
PyTorch's initialisation (``--config.autoencoder.init=torch``), a block-mean colour term
(``--config.autoencoder.lowpass_weight=10``) and the decoder-reach probes that led to groups of 4.
"""

from codi_jax import config_lib


def get_config(arg: str | None = None):
    c = config_lib.base_config("unconditional")
    c.objective = "autoencoder"
    c.model.adapter = "none"
    # The autoencoder is fully convolutional (its attention is at the latent resolution): 32 px
    # crops train it at a quarter of the cost of 64 px ones.
    c.data.image_size = 32
    # Smooth colour fields teach the decoder flat, saturated colours the natural crops rarely hold.
    c.data.embedded.procedural_smooth = 1024
    c.train.batch_size = 16
    c.train.num_steps = 2500
    c.train.lr = 1e-3
    c.train.lr_schedule = "cosine"
    c.train.warmup_steps = 100
    c.train.eval_ema_decay = 0.999
    c.train.checkpoint_every = 500
    c.train.log_every = 100
    c.eval.every = 500
    c.eval.batch_size = 32
    c.eval.num_examples = 128
    c.export = True
    presets = [p for p in (arg or "").split(",") if p]
    known = ["finetune64", "minimal", "wide"]
    unknown = sorted(set(presets) - set(known))
    if unknown:
        raise ValueError(f"config: unknown preset(s) {unknown} of configs/pretrain_vae.py; known: {known}")
    if "wide" in presets:
        c.model.vae_config.block_out_channels = [64, 128, 128]
        c.model.vae_config.norm_num_groups = 32
    if "finetune64" in presets:
        c.data.image_size = 64
        c.train.num_steps = 1000
        c.train.lr = 3e-4
        c.train.warmup_steps = 50
        c.train.checkpoint_every = 250
        c.eval.every = 250
    if "minimal" in presets:
        config_lib.make_minimal(c, num_steps=6)
        c.train.checkpoint_every = 3
        c.eval.every = 3
    return c
