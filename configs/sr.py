"""CoDi: distil a teacher into a 4x super-resolution model (Real-ESRGAN degradations).

Presets compose (``--config=configs/sr.py:<preset>[,<preset>...][,key=value...]``, e.g.
``sd15,pe`` or ``finetune,minimal``; see ``config_lib.task_config``):

* (none) — the embedded setup: the miniature Stable Diffusion shipped in the package
  (``codi_jax/assets/mini_sd``: KL autoencoder + latent UNet, see its README) distilled with full
  CoDi on 64x64 crops (16x16x4 latents; the condition is the VAE latent of the bicubic-upsampled
  Real-ESRGAN-degraded input) of the embedded pictures, 400 steps at batch 16, one t per example.
  ``python -m codi_jax.main --config=configs/sr.py --workdir=runs/sr`` writes checkpoints,
  TensorBoard events, ``train_log.jsonl`` (μ's trajectory included), ``eval.json`` (the held-out
  pictures), ``eval_procedural.json``, ``eval_online.json``, the sample grids and ``export/``.
  Measured (commit 31f4030, a 2-core CPU shared with test runs: 0.5 steps/s, about 20 minutes
  with the evaluation, so not yet the 10 minutes asked for; an idle machine is faster), on 64
  crops of the four held-out pictures, PSNR dB / SSIM / gradient energy ×10³ (the original's 4.20):
  1 step 20.86 / 0.471 / 0.17, 2 steps 20.66 / 0.434 / 0.25, 4 steps 19.18 / 0.318 / 0.65,
  8 steps 17.59 / 0.219 / 1.54; bicubic upsampling of the same inputs 22.75 / 0.518 / 0.17. On
  the held-out procedural pictures: 1 step 16.21, bicubic 17.19. μ rises to 0.21 (0.12 by step
  50, flat from step 300). So this budget does not beat bicubic yet: the 1-step output follows
  the input's colours and coarse layout but is blurrier than it, and 4-8 steps add the prior's
  dead-leaves texture (sharper than bicubic, 3.6 dB below it). A time-dependent gate
  (``--config.model.mu_knots=5``: μ(t) piecewise linear on 5 knots, ``docs/sr_mu_knots/``) learns
  the shape one would expect (μ = 0.02, 0.10, 0.20, 0.24, 0.25 at t = 0, ¼, ½, ¾, 1) but not a
  larger gate at t = 1, and scores the same within one seed's noise: 1 step 20.96, 4 steps 19.06,
  procedural 1 step 16.26. It stays an option; the default is the paper's constant μ. Nor is
  the learning rate the limit: ``--config.train.lr=5e-4`` (``docs/sr_lr5e-4/``) gives 1 step
  20.86, 4 steps 19.39 (μ 0.23); the same run took 18 minutes on one core of a busy machine.
* ``minimal`` — the same with 30 steps and a small eval at 1 and 4 steps (the end-to-end test;
  about 5 minutes on an idle 2-core CPU, nearly all of it XLA compiling the train step and the two
  samplers).
* ``pe`` — the embedded setup with PE-CoDi (ControlNet adapter, UNet frozen).
* ``finetune`` — the baselines' conditional teacher: the same adapted model trained with the
  standard diffusion loss, evaluated (its evaluation EMA, like every objective) with DDIM and
  DPM-Solver++ at 1-200 steps. Measured (``--config.train.num_steps=1500 --config.eval.every=250``,
  stopped at 1208 steps; ``docs/sr_finetune/``), DDIM on the 64 held-out natural crops, PSNR dB
  at 1 / 4 steps: step 250 20.67 / 19.26, 500 21.06 / 19.67, 750 21.42 / 19.89, 1000 21.42 /
  20.06; bicubic 22.75. So the conditional teacher flattens 1.3 dB below bicubic at this size
  and budget (μ ≈ 0.145 from step 100 on), and does not meet the posterior-mean bar either: the
  gap is the adapted architecture's and the budget's, not CoDi's loss. For scale: decoding the
  VAE latent of the bicubic input itself (x̂ = the condition's latent) gives 22.40 dB.
* ``cm`` / ``gd`` — consistency distillation / progressive distillation (rounds 32 → 16 → 8 → 4
  steps) of that teacher: add ``--config.model.conditional_teacher=<finetune workdir>/export``.
  ``python -m codi_jax.experiments`` runs all of them with CoDi's ablations; see docs/results.md.
* ``sd15`` / ``sd21`` — Stable Diffusion 1.5 / 2.1 (diffusers layout; ``--config.model.pretrained``
  takes a hub id or a local folder), full CoDi; ``sd15,pe`` / ``sd21,pe`` for PE-CoDi. Data: ``--config.data.source=tfds:<name>`` or
  ``folder:<path>``. Recipe defaults: paper §5 and the public CoDi recipe (AdamW lr 8e-6, EMA
  0.99995, grid N = 20, bf16). Runtime: days on a TPU v4-32; see docs/scaling.md for sizing.
"""

from codi_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.task_config("sr", arg)
