"""CoDi for instructed image editing (paper §5.2, Fig. 8; InstructPix2Pix layout).

Condition: (input, edited, instruction) triples: on the embedded data six fixed edits (flip, grayscale, invert, ...).

Presets compose (``--config=configs/edit.py:<preset>[,<preset>...][,key=value...]``, e.g.
``sd15,pe`` or ``finetune,minimal``; see ``config_lib.task_config``):

* (none) — the embedded setup: the shipped miniature Stable Diffusion (``codi_jax/assets/mini_sd``,
  latent UNet + KL autoencoder) distilled with full CoDi on 64x64 crops of the embedded pictures
  (``codi_jax.data.embedded``). ``python -m codi_jax.main --config=configs/edit.py
  --workdir=runs/edit`` runs as long as ``configs/sr.py`` and writes the same files (checkpoints,
  TensorBoard, eval.json / eval_procedural.json / eval_online.json, samples, export/).
  Not yet measured on this teacher.
* ``pe`` — the same with PE-CoDi (ControlNet adapter, UNet frozen); ``minimal`` — tens of steps (tests).
* ``sd15`` / ``sd21`` — Stable Diffusion 1.5 / 2.1 recipes (configs/stable_diffusion.py:
  the defaults and where they come from); bring data with ``--config.data.source=folder:<path>`` or
  ``tfds:<name>``.
"""

from codi_jax import config_lib

stable_diffusion = config_lib.config_module(__file__, "stable_diffusion")


def get_config(arg: str | None = None):
    return config_lib.task_config("edit", arg, stable_diffusion.RECIPES)
