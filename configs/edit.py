"""CoDi for instructed image editing (paper §5.2, Fig. 8; InstructPix2Pix layout).

Condition: (input, edited, instruction) triples: on the demo data six fixed edits (flip, grayscale, invert, ...).

Presets (``--config=configs/edit.py:<preset>``):

* (none) — the embedded tiny setup: the shipped pixel-space demo teacher distilled with full CoDi
  on 32x32 crops of the embedded demo data.
  ``python -m codi_jax.main --config=configs/edit.py --workdir=runs/edit`` takes about as
  long as ``configs/sr.py`` (≈10 minutes on a 2-core CPU) and writes the same files
  (checkpoints, TensorBoard, eval.json with PSNR/SSIM at 1/2/4/8 steps, samples, export/).
* ``pe`` — the same with PE-CoDi (ControlNet adapter, UNet frozen); ``minimal`` — tens of steps (tests).
* ``sd15`` / ``sd21`` — Stable Diffusion 1.5 / 2.1 recipes (see configs/sr.py for the
  defaults and where they come from); bring data with ``--config.data.source=folder:<path>`` or
  ``tfds:<name>``.
"""

from codi_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.task_config("edit", arg)
