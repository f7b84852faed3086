"""CoDi: distil a teacher into a 4x super-resolution model (Real-ESRGAN degradations).

Presets (``--config=configs/sr.py:<preset>``):

* (none) — the embedded tiny setup: the pixel-space demo teacher shipped in the package
  (``codi_jax/assets/demo_teacher``) distilled with full CoDi on 32x32 crops of the embedded demo
  images. ``python -m codi_jax.main --config=configs/sr.py --workdir=runs/sr`` (600 steps,
  batch 16) took 15 minutes on a 2-core CPU shared with other jobs (load average ≈ 10; 0.6-1.1
  steps/s), so expect well under 10 on an idle one. It writes checkpoints, TensorBoard events,
  ``eval.json``, ``eval_samples.png`` and ``export/``. Measured on the 64 held-out crops
  (PSNR dB / SSIM): 1 step 21.0 / 0.43, 2 steps 19.8 / 0.36, 4 steps 18.5 / 0.23, 8 steps
  17.3 / 0.16; the bicubic-upsampled input itself scores 22.1 / 0.46. μ reaches 0.12: in this
  short run the student follows the condition's colours and layout at 1 step and adds texture
  (and noise) with more steps — a ten-minute CPU run, not the paper's result.
* ``minimal`` — the same with tens of steps and a small eval (the end-to-end test; ~1 minute).
* ``pe`` — the embedded setup with PE-CoDi (ControlNet adapter, UNet frozen).
* ``finetune`` — the baselines' conditional teacher: the same adapted model trained with the
  standard diffusion loss (EMA 0.99), evaluated with DDIM and DPM-Solver++ at 1-200 steps.
* ``cm`` / ``gd`` — consistency distillation / progressive distillation (rounds 32 → 16 → 8 → 4
  steps) of that teacher: add ``--config.model.conditional_teacher=<finetune workdir>/export``.
  ``python -m codi_jax.experiments`` runs all of them with CoDi's ablations; see docs/results.md.
* ``sd15`` / ``sd21`` — Stable Diffusion 1.5 / 2.1 (diffusers layout; ``--config.model.pretrained``
  takes a hub id or a local folder), full CoDi; add ``--config.model.adapter=controlnet
  --config.model.trainable=adapter`` for PE-CoDi. Data: ``--config.data.source=tfds:<name>`` or
  ``folder:<path>``. Recipe defaults: paper §5 and the public CoDi recipe (AdamW lr 8e-6, EMA
  0.99995, grid N = 20, bf16). Runtime: days on a TPU v4-32; see docs/scaling.md for sizing.
"""

from codi_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.task_config("sr", arg)
