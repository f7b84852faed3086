"""CoDi for inpainting (free-form strokes and boxes).

Condition: masked image + mask (4 channels): free-form strokes and boxes covering 10-50% of the crop.

Presets compose (``--config=configs/inpaint.py:<preset>[,<preset>...][,key=value...]``, e.g.
``sd15,pe`` or ``finetune,minimal``; see ``config_lib.task_config``):

* (none) — the embedded setup: the shipped miniature Stable Diffusion (``codi_jax/assets/mini_sd``,
  latent UNet + KL autoencoder) distilled with full CoDi on 64x64 crops of the embedded pictures
  (``codi_jax.data.embedded``). ``python -m codi_jax.main --config=configs/inpaint.py
  --workdir=runs/inpaint`` runs as long as ``configs/sr.py:base`` and writes the same files (checkpoints,
  TensorBoard, eval.json / eval_procedural.json / eval_online.json, samples, export/).
  Measured on the current mini_sd (400 steps, 7 min 56 s wall on a 2-core CPU shared with
  another run; ``docs/inpaint_g4/``; μ 0.10), PSNR dB / SSIM on the 64 held-out crops (all four
  pictures): 1 step 19.87 / 0.546, 2 steps 18.83 / 0.410, 4 steps 17.19 / 0.260, 8 steps 15.99 /
  0.192; the masked input 19.84 / 0.715. Procedural: 1 step 15.65, masked input 18.92. So 1 step
  is level with the masked input in PSNR (+0.03 dB) and still far below it in SSIM: as before,
  the model redraws the whole crop blurrily instead of keeping the unmasked pixels.
  On the first mini_sd (400 steps, 18 minutes on one core of a busy 2-core machine; ``docs/inpaint/``), PSNR
  dB / SSIM on the first 64 crops of the held-out pictures (then chelsea and coffee only; the
  crops are now interleaved so that 64 cover all four): 1 step 19.11 / 0.429, 2 steps 18.37 /
  0.376, 4 steps 17.03 / 0.260, 8 steps 15.62 / 0.175; the trivial baseline, the masked input with
  its holes mid-grey, 18.80 / 0.699. On the held-out procedural pictures: 1 step 15.54, masked
  input 18.92. So 1 step is 0.3 dB above the masked input on natural pictures but far below it in
  SSIM: the model redraws the whole crop blurrily instead of keeping the unmasked pixels; this
  budget does not inpaint usefully yet (the same limit as SR, see configs/sr.py).
* ``pe`` — the same with PE-CoDi (ControlNet adapter, UNet frozen); ``minimal`` — tens of steps (tests).
* ``sd15`` / ``sd21`` — Stable Diffusion 1.5 / 2.1 recipes (configs/stable_diffusion.py:
  the defaults and where they come from); bring data with ``--config.data.source=folder:<path>`` or
  ``tfds:<name>``.
"""

from codi_jax import config_lib

stable_diffusion = config_lib.config_module(__file__, "stable_diffusion")


def get_config(arg: str | None = None):
    return config_lib.task_config("inpaint", arg, stable_diffusion.RECIPES)
