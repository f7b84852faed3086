"""CoDi for instructed image editing (paper §5.2, Fig. 8; InstructPix2Pix layout).

Condition: (input, edited, instruction) triples: on the embedded data six fixed edits (flip, grayscale, invert, ...).

Presets compose (``--config=configs/edit.py:<preset>[,<preset>...][,key=value...]``, e.g.
``sd15,pe`` or ``finetune,minimal``; see ``config_lib.task_config``):

* (none) — the embedded setup: the shipped miniature Stable Diffusion (``codi_jax/assets/mini_sd``,
  latent UNet + KL autoencoder) distilled with full CoDi on 64x64 crops of the embedded pictures
  (``codi_jax.data.embedded``). ``python -m codi_jax.main --config=configs/edit.py
  --workdir=runs/edit`` runs as long as ``configs/sr.py:base`` and writes the same files (checkpoints,
  TensorBoard, eval.json / eval_procedural.json / eval_online.json, samples, export/).
  Measured on the current mini_sd (400 steps, 6 min 54 s wall on a 2-core CPU;
  ``docs/edit_g4/``), PSNR dB / SSIM against the edited picture on 64 crops of the four held-out
  pictures: 1 step 14.63 / 0.476, 4 steps 12.38 / 0.177; the trivial baseline, the unedited
  input, 19.60 / 0.613 (procedural: 1 step 13.18, input 15.83; μ 0.04). On the first mini_sd
  (``docs/edit/``): 1 step 14.14 / 0.472, 4 steps 12.38 / 0.187, procedural 1 step 13.13. It
  does not work, and on this teacher it cannot: the miniature
  Stable Diffusion has no text encoder, so the instruction never reaches the model, and the six
  edits (two flips, grey, inversion, warmer, more contrast) are then indistinguishable; their
  posterior mean is near grey, which is what the 1-step output shows (μ stays at 0.02-0.04). A
  teacher that reads text, or one fixed edit per run, is needed for this task to mean anything
  on the embedded data.
* ``pe`` — the same with PE-CoDi (ControlNet adapter, UNet frozen); ``minimal`` — tens of steps (tests).
* ``sd15`` / ``sd21`` — Stable Diffusion 1.5 / 2.1 recipes (configs/stable_diffusion.py:
  the defaults and where they come from); bring data with ``--config.data.source=folder:<path>`` or
  ``tfds:<name>``.
* ``guided`` (with ``sd15`` / ``sd21``) — guidance-aware CoDi: the student reads the guidance
  weight and samples in one evaluation per step (``config_lib._guided``, ``distill/codi.py``); not
  measured on Stable Diffusion or the embedded setup yet.
"""

from codi_jax import config_lib

stable_diffusion = config_lib.config_module(__file__, "stable_diffusion")


def get_config(arg: str | None = None):
    return config_lib.task_config("edit", arg, stable_diffusion.RECIPES)
