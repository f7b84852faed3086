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
  Rerun on an otherwise idle 2-core CPU (this commit, ``docs/sr_default/``): 703 s wall, i.e.
  11.7 minutes with compiles and the three evaluations, not yet the 10 asked for; on its 64
  evaluation crops (16 of each held-out picture) 1 step 21.62 raw, 23.75 colour-fixed, 4 steps
  19.48 raw, 23.15 colour-fixed (gradient energy 0.34 ×10³ against 0.22), bicubic 23.66; the
  same as the shipped model below within 0.1 dB.
  The same recipe trained 2000 steps (``--config.train.num_steps=2000``, about 27 minutes on one
  core) is the shipped ``embedded:demo_codi_sr`` since this commit: 1 step 21.96 raw / 23.49
  colour-fixed, 4 steps 20.15 / 23.07 (gradient energy 0.30 ×10³), flat from step 1500; the
  numbers and curve are in its README and ``docs/demo_codi_sr/``. The previous shipped model was
  this command's (400 steps, commit 31f4030). On all 128 crops of the four held-out pictures, evaluated with
  ``--config.eval.num_examples=128`` (PSNR dB / SSIM / gradient energy ×10³, the original's
  2.83). The evaluation used to read only the first 64 crops, which were chelsea and coffee;
  the crops are now interleaved by picture, so the default 64 cover all four:

  | | 1 step | 2 | 4 | 8 |
  |---|---|---|---|---|
  | ``codi`` (raw) | 21.54 / 0.546 / 0.14 | 21.10 | 19.36 / 0.323 / 0.73 | 17.68 / 0.215 / 1.69 |
  | ``codi+colorfix`` | 23.47 / 0.578 / 0.17 | 23.37 | 22.92 / 0.492 / 0.35 | 22.10 / 0.392 / 0.73 |
  | bicubic | 23.38 / 0.575 / 0.20 | | | |

  With the wavelet colour fix of diffusion SR pipelines (``codi_jax/color_fix.py``: low
  frequencies from the bicubic input, the model's own high frequencies), the model beats bicubic
  at 1 step (+0.09 dB) and at 4 steps is sharper than bicubic and 0.46 dB below it. Raw, it is
  1.8 dB below bicubic at 1 step, and nearly all of that is low-frequency colour: the autoencoder
  shifts the colours of pictures unlike its training set (decoding the condition's own latent
  gives 22.34 dB; per picture in the mini_sd README), and the 1-step output leans toward the
  training pictures' colours. Nor is CoDi's consistency term the limit: plain regression at t = T
  through the same adapted model (``--config.distill.grid=1``, 400 steps) reaches 21.76 dB raw.
  Training on natural pictures mostly (``--config.data.embedded.procedural_train=96``) gives
  21.63 / 19.63 raw at 1 / 4 steps, and random RGB permutations of the training crops
  (``--config.data.augment.channel_permute=True``, against the pull toward the training colours)
  21.53 / 19.31: neither moves the raw colour error at this budget. On the held-out procedural pictures: 1 step 16.21 raw, 17.19
  colour-fixed (4 steps 17.00), bicubic 17.19.
  Earlier measurements (first 64 crops: chelsea and coffee; bicubic 22.75): a time-dependent gate
  (``--config.model.mu_knots=5``: μ(t) piecewise linear on 5 knots, ``docs/sr_mu_knots/``) learns
  the shape one would expect (μ = 0.02, 0.10, 0.20, 0.24, 0.25 at t = 0, ¼, ½, ¾, 1) but not a
  larger gate at t = 1, and scores the same within one seed's noise as the constant gate (1 step
  20.96 against 20.86, 4 steps 19.06 against 19.18); it stays an option, the default is the
  paper's constant μ. Nor is the learning rate the limit: ``--config.train.lr=5e-4``
  (``docs/sr_lr5e-4/``) gives 1 step 20.86, 4 steps 19.39 (μ 0.23).
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
  VAE latent of the bicubic input itself (x̂ = the condition's latent) gives 22.40 dB. Those
  were the first 64 crops (chelsea and coffee); its step-1208 checkpoint on all 128 crops of the
  four pictures, DDIM 1 / 4 steps: raw 21.87 / 20.48, colour-fixed (``ddim+colorfix``) 23.45 /
  23.22 with gradient energy 0.17 / 0.24 ×10³; bicubic 23.38 / 0.20 (procedural, 1 step: 16.36
  raw, 17.20 colour-fixed, bicubic 17.19). So with the colour fix the conditional teacher's
  1-step posterior-mean estimate is 0.07 dB above bicubic, and CoDi's 400-step student (23.47) is
  level with it.
* ``cm`` / ``gd`` — consistency distillation / progressive distillation (rounds 32 → 16 → 8 → 4
  steps) of that teacher: add ``--config.model.conditional_teacher=<finetune workdir>/export``.
  ``python -m codi_jax.experiments`` runs all of them with CoDi's ablations; see docs/results.md.
* ``sd15`` / ``sd21`` — Stable Diffusion 1.5 / 2.1 (diffusers layout; ``--config.model.pretrained``
  takes a hub id or a local folder), full CoDi; ``sd15,pe`` / ``sd21,pe`` for PE-CoDi. Data: ``--config.data.source=tfds:<name>`` or
  ``folder:<path>``. The recipe is ``configs/stable_diffusion.py`` (paper §5 and the public CoDi
  recipe: AdamW lr 8e-6, EMA 0.99995, grid N = 20, bf16). Runtime: days on a TPU v4-32; see
  docs/scaling.md for sizing.
"""

from codi_jax import config_lib

stable_diffusion = config_lib.config_module(__file__, "stable_diffusion")


def get_config(arg: str | None = None):
    return config_lib.task_config("sr", arg, stable_diffusion.RECIPES)
