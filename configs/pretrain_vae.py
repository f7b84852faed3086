"""Pretrain the miniature Stable Diffusion's autoencoder (diffusers ``AutoencoderKL`` layout).

``python -m codi_jax.main --config=configs/pretrain_vae.py --workdir=runs/vae`` trains
``config_lib.MINI_VAE`` (4 latent channels, downsampling 4) on random crops of the embedded train
pictures and procedural pictures (augmented), with the reconstruction objective of
``codi_jax/autoencoder.py``; evaluates the reconstruction PSNR of its EMA on the held-out pictures
(``eval``) and the held-out procedural ones (``eval_procedural``) every ``eval.every`` steps
(``eval_log.jsonl``); and writes ``runs/vae/export/vae`` with the measured ``scaling_factor``.
That folder is the ``vae/`` of ``codi_jax/assets/mini_sd`` (its README has the numbers and the
curve). Presets: ``minimal`` (a few steps; tests). ``--config.model.vae=<VAE or pipeline folder,
or embedded:mini_sd>`` fine-tunes a trained autoencoder instead, and
``--config.autoencoder.trainable=decoder`` its decoder only (the encoder, and so the latent space
the teacher was trained in, frozen); the mini_sd README says what those gave. ``wide``: the
candidate for the next autoencoder (64/128/128 channels, 3.8 M parameters against 0.95 M); its
measured curve, and what random RGB permutations of the training crops
(``--config.data.augment.channel_permute=True``) did to it, are in the mini_sd README. So are
the runs with ``--config.autoencoder.init=torch`` (PyTorch's default initialisation) and
``--config.autoencoder.lowpass_weight=10`` (a block-mean colour term), neither of which fixed the
saturated colours this autoencoder gets wrong.
"""

from codi_jax import config_lib


def get_config(arg: str | None = None):
    c = config_lib.base_config("unconditional")
    c.objective = "autoencoder"
    c.model.adapter = "none"
    # The autoencoder is fully convolutional (its attention is at the latent resolution): 32 px
    # crops train it at a quarter of the cost of 64 px ones.
    c.data.image_size = 32
    c.train.batch_size = 16
    c.train.num_steps = 4000
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
    known = ["minimal", "wide"]
    unknown = sorted(set(presets) - set(known))
    if unknown:
        raise ValueError(f"config: unknown preset(s) {unknown} of configs/pretrain_vae.py; known: {known}")
    if "wide" in presets:
        c.model.vae_config.block_out_channels = [64, 128, 128]
        c.model.vae_config.norm_num_groups = 32
    if "minimal" in presets:
        config_lib.make_minimal(c, num_steps=6)
        c.train.checkpoint_every = 3
        c.eval.every = 3
    return c
