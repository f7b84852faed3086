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
  Measured (``docs/sr_default/``, ``time.txt``): **6 min 39 s** wall on a 2-core CPU, compiles and
  the three evaluations included. On its 64 evaluation crops (16 of each held-out picture;
  bicubic 23.66 dB / SSIM 0.564), PSNR dB raw / colour-fixed: 1 step 22.24 / **23.81**, 2 steps
  21.39 / 23.62, 4 steps 19.43 / 23.07 (gradient energy above bicubic's at 2 steps and more).
  So at 400 steps the model beats bicubic at 1 step only with the wavelet colour fix (+0.15 dB);
  raw it is 1.4 dB below. The same recipe needs about 2000 steps (about 20 minutes) to come within
  0.2 dB of bicubic raw, see the next paragraph: the 10-minute default cannot get there. What a
  10-minute budget can reach (``docs/sr_probes/README.md``, "What ten minutes reach"): the demo's
  recipe below with ``--config.train.batch_size=8 --config.train.num_steps=1400
  --config.train.lr=1e-3 --config.train.lr_schedule=cosine --config.train.warmup_steps=100``
  scores 23.46 / 23.55 raw at 1 step over two seeds (−0.20 / −0.11 dB) and 22.40 / 22.30 at 4
  in 8.3-8.8 minutes with a lighter evaluation;
  batch 4 for 2800 steps ties bicubic (23.66) in 10.4 minutes. Not the default (yet): these
  settings are shared with every other preset's documented runs.
  The same recipe trained 2000 steps (``--config.train.num_steps=2000 --config.eval.every=500
  --config.eval.num_examples=128``, about 19 minutes plus evaluations) scores, on all 128 crops
  (bicubic 23.38 / SSIM 0.575), 1 step 23.20 raw (SSIM 0.592) / 23.49 colour-fixed, 4 steps
  20.71 / 23.07, and stays there at 3000. With stronger colour augmentation
  (``--config.data.augment.color_jitter=0.3 --config.data.augment.channel_permute=True``) and
  3000 steps (about 25 minutes) it reaches bicubic at 1 step: 23.40 raw (SSIM 0.595), 4 steps
  20.72 / 23.08, sharper than bicubic; a second seed 23.47. At 4 steps it loses 2.7 dB raw
  because the model moves the low frequencies of a z_t built from its own 1-step prediction
  (``tools/probe_sr_steps.py``); adding ``--config.distill.rollout_fraction=0.75
  --config.distill.cg_lowpass_pool=1`` (three quarters of each batch trained on such inputs, the
  CG term against the data; about 29 minutes) gives 1 step 23.46 raw, 4 steps 22.45 raw (0.93 dB
  below bicubic, gradient energy 0.22 ×10³ against bicubic's 0.20; a second seed 23.47 / 22.40 /
  0.23). That run is the shipped
  ``embedded:demo_codi_sr``; the curve, the fractions tried
  and per-step numbers are in its README and ``docs/demo_codi_sr/``. With the wavelet colour fix
  of diffusion SR pipelines (``codi_jax/color_fix.py``: low frequencies from the bicubic input,
  the model's own high frequencies) the evaluation reports both. Before the groups-4 autoencoder
  (commit ``db677fe`` and earlier) the same runs were 1.4-1.8 dB below bicubic raw at 1 step: the
  old autoencoder shifted the colours of unseen pictures (its probes are in the mini_sd README);
  the measurements of that period (``--config.model.mu_knots=5``, ``--config.train.lr=5e-4``,
  ``--config.distill.grid=1``, ``procedural_train``, ``channel_permute``; none moved the raw
  gap) are in ``docs/sr_mu_knots/``, ``docs/sr_lr5e-4/`` and ``docs/sr_probes/``.
* ``minimal`` — the same with 30 steps and a small eval at 1 and 4 steps (the end-to-end test;
  about 5 minutes on an idle 2-core CPU, nearly all of it XLA compiling the train step and the two
  samplers).
* ``pe`` — the embedded setup with PE-CoDi (ControlNet adapter, UNet frozen).
* ``finetune`` — the baselines' conditional teacher: the same adapted model trained with the
  standard diffusion loss, evaluated (its evaluation EMA, like every objective) with DDIM and
  DPM-Solver++ at 1-200 steps. Measured on the current mini_sd (``--config.train.num_steps=1000
  --config.eval.every=500 '--config.eval.steps=(1,4)'``, ``docs/sr_finetune_g4/``; μ 0.16), on
  the 64 held-out crops (bicubic 23.66 dB / SSIM 0.564 / gradient energy 0.22 ×10³), DDIM at
  1 / 4 steps: step 500 21.89 / 20.16 raw, 23.78 / 23.33 colour-fixed; step 1000 **22.59** /
  20.68 raw (SSIM 0.566 / 0.395), **23.78** / 23.41 colour-fixed (gradient energy 0.17 / 0.26);
  DPM-Solver++ 22.59 / 20.39 raw. So the conditional teacher's 1-step posterior-mean estimate
  is 1.1 dB below bicubic raw and 0.12 dB above it colour-fixed at this budget, still rising
  (+0.7 dB raw from step 500 to 1000): it does not yet meet the posterior-mean bar raw. Twice
  as long on a cosine schedule (``--config.train.num_steps=2000 --config.train.lr_schedule=cosine
  --config.eval.every=1000 '--config.eval.steps=(1,4)'``, ``docs/sr_finetune_g4_2000/``, 35 min
  wall beside another run): step 1000 22.48 raw, step 2000 **22.91** raw (SSIM 0.570) / 23.78
  colour-fixed at 1 step, 21.18 / 23.46 at 4 (DPM-Solver++ 20.92 raw): still 0.75 dB below
  bicubic raw. Colour-fixed it has been 23.78 since step 500: what the extra steps buy is the
  output's low frequencies (colour, local means) converging toward the input's, slowly; its own
  detail was worth +0.12 dB from the start. On the
  first autoencoder (``docs/sr_finetune/``, 1208 steps) it was 1.5 dB below on all 128 crops.
  With the demo's colour augmentation and 8000 steps it meets the bar:
  ``--config.train.num_steps=8000 --config.eval.every=1000 --config.eval.num_examples=128
  --config.data.augment.color_jitter=0.3 --config.data.augment.channel_permute=True
  '--config.eval.samplers=("ddim",)' '--config.eval.steps=(1,4)'`` (66 minutes wall on an idle
  2-core CPU; ``docs/sr_probes/finetune_color_jitter_8000/``) scores, on all 128 held-out crops,
  DDIM 1 step **23.55** raw (SSIM 0.599) against bicubic's 23.38 (0.575), above it from step
  7000 (23.48) and still rising; 4 steps 21.99.
* ``cm`` / ``gd`` — consistency distillation / progressive distillation (rounds 32 → 16 → 8 → 4
  steps) of that teacher: add ``--config.model.conditional_teacher=<finetune workdir>/export``.
  ``python -m codi_jax.experiments`` runs all of them with CoDi's ablations; see docs/results.md.
* ``flash`` — Flash Diffusion (``codi_jax/distill/flash.py``) of that teacher, all weights
  trained: ``python -m codi_jax.main --config=configs/sr.py:flash --workdir=runs/flash
  --config.model.conditional_teacher=<finetune workdir>/export``. K = 32 grid times, the teacher's
  4-step DDIM solution as target, λ_adv = λ_DMD = 0.1, 400 steps at batch 16, sampled with its
  re-noising sampler at 1, 2, 4 steps. Measured from the 1000-step ``finetune`` export above
  (``docs/sr_flash/``): 14 min 43 s wall on a 2-core CPU shared with another run (about 3.7 fwd+bwd
  per step, ``benchmarks/flash_step.py``); on the 64 held-out crops, PSNR dB raw / colour-fixed
  (gradient energy ×10³ raw; bicubic 23.66 / 0.22, the original 2.83): step 200 1 step 22.08 /
  23.80, 4 steps 19.76 / 23.08; step 400 1 step 21.40 / 23.67 (0.22), 2 steps 19.97 / 23.13
  (0.72), 4 steps 19.36 / 22.87 (0.98). The 1-step output gets sharper and loses PSNR as π moves
  its mass to t = 1, whose target is the teacher's 4-step sample (itself 20.68 raw, 0.46 ×10³).
  At the same 400 steps CoDi (the default above, from the unconditional teacher) scores 22.24 /
  19.43 raw at 1 / 4 steps. The discriminator stays near balance (D ≈ 0.5 on real and fake).
  One seed, one budget: a comparison, not a verdict (that is the reproduction's job).
* ``flash_lora`` — the same with the student frozen and rank-8 LoRA factors trained
  (``model.lora_rank``), the paper's setting: 66,721 trainable parameters (the UNet's and the
  condition encoder's attention projections, μ and the condition's ``conv_in``) of 5.56 M, plus
  the discriminator head. Measured (``docs/sr_flash_lora/``, 13 min wall on a 2-core CPU shared
  with another run) from the 2000-step cosine ``finetune`` export above (itself 22.91 / 21.18 raw
  at 1 / 4 steps): ``python -m codi_jax.main --config=configs/sr.py:flash_lora
  --workdir=runs/flash_lora --config.model.conditional_teacher=<finetune>/export
  --config.eval.every=200``. On the 64 held-out crops, PSNR dB raw / colour-fixed: step 200
  1 step 22.79 / 23.81, 4 steps 20.81 / 23.30; step 400 1 step 22.76 / 23.82 (SSIM 0.579),
  2 steps 21.47 / 23.49, 4 steps 20.61 / 23.27 (gradient energy 0.62 ×10³, the teacher's own
  4-step sample 0.43). With 1 % of the weights it stays near its teacher (−0.15 dB at 1 step,
  −0.57 at 4) and sharpens the 4-step output; the full-weight ``flash`` above, from the weaker
  1000-step teacher, lost 1.2 dB at 1 step by 400 steps. Not the same teacher: not a comparison.
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
