"""CoDi for inpainting (free-form strokes and boxes).

Condition: masked image + mask (4 channels): free-form strokes and boxes covering 10-50% of the crop.

Presets (``--config=configs/inpaint.py:<preset>``):

* (none) — the embedded tiny setup: the shipped pixel-space demo teacher distilled with full CoDi
  on 32x32 crops of the embedded demo data.
  ``python -m codi_jax.main --config=configs/inpaint.py --workdir=runs/inpaint`` takes about as
  long as ``configs/sr.py`` (≈10 minutes on a 2-core CPU) and writes the same files
  (checkpoints, TensorBoard, eval.json with PSNR/SSIM at 1/2/4/8 steps, samples, export/).
* ``pe`` — the same with PE-CoDi (ControlNet adapter, UNet frozen); ``minimal`` — tens of steps (tests).
* ``sd15`` / ``sd21`` — Stable Diffusion 1.5 / 2.1 recipes (see configs/sr.py for the
  defaults and where they come from); bring data with ``--config.data.source=folder:<path>`` or
  ``tfds:<name>``.
"""

from codi_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.task_config("inpaint", arg)
