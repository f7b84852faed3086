"""CoDi for depth-to-image (paper §5.2, Fig. 7).

Condition: (image, depth) pairs: on the embedded data the exact depth order of procedural dead-leaves
pictures and the motorcycle stereo pair with its disparity map (its right quarter held out).

Presets compose (``--config=configs/depth.py:<preset>[,<preset>...][,key=value...]``, e.g.
``sd15,pe`` or ``finetune,minimal``; see ``config_lib.task_config``):

* (none) — the embedded setup: the shipped miniature Stable Diffusion (``codi_jax/assets/mini_sd``,
  latent UNet + KL autoencoder) distilled with full CoDi on 64x64 crops of the embedded pictures
  (``codi_jax.data.embedded``). ``python -m codi_jax.main --config=configs/depth.py
  --workdir=runs/depth`` runs as long as ``configs/sr.py:base`` and writes the same files (checkpoints,
  TensorBoard, eval.json / eval_procedural.json / eval_online.json, samples, export/).
  Measured on the current mini_sd (the groups-4 autoencoder and the teacher in its space; 400
  steps, 7 min 40 s wall on a 2-core CPU shared with another run; ``docs/depth_g4/``), PSNR dB /
  SSIM / gradient energy ×10³ against the original picture: on the 32 held-out motorcycle crops 1
  step 11.16 / 0.283 / 0.01, 4 steps 10.38 / 0.105 / 1.29; on the 64 held-out procedural pictures
  1 step 13.21 / 0.221, 4 steps 11.26 / 0.094, SWD 0.149 → 0.061; μ −0.004 at the end. Against
  the trivial baseline below (11.09 / 13.35 dB) that is level: the new teacher changed nothing
  here. On the first mini_sd (``docs/depth/``): 1 step 10.74 / 0.281 / 0.02, 4 steps 10.06 / 0.108
  / 1.33 (the original's 4.38) on the motorcycle crops; procedural 1 step 13.21 / 0.222, 4 steps
  11.63 / 0.098, SWD 0.152 → 0.064. This does
  not work yet: μ never opens (it stays within ±0.05 of 0, −0.02 at the end), so the model
  ignores the depth map (the 1-step output is the flat mean colour, more steps add the prior's
  texture with no depth layout). The depth map reaches the condition encoder as the VAE latent of
  a grey picture, which the autoencoder represents poorly (it never saw depth maps); the pixel
  hint stem tried next does not change that: ``--config.model.cond_input=pixel
  '--config.model.hint_channels=(16,32,96)'`` (the depth map's pixels through a learned 4x
  ControlNet stem; 400 steps on a shared core, ``docs/depth_pixel/``) gives on the motorcycle
  crops 1 step 10.76 / 0.281 / 0.02, 4 steps 10.10 / 0.109 / 1.32, on the procedural pictures 1
  step 13.20, 4 steps 11.61, with μ at −0.01 at the end: the same as the latent condition. On
  these data a depth map says where the leaves' edges are but nothing about their colours, so
  the posterior mean the 1-step output estimates is close to flat whatever the encoder sees;
  PSNR against the original cannot show whether the layout is followed. The trivial baseline,
  a flat picture of the training crops' mean colour (0.50, 0.50, 0.49; 40 batches of 16), scores
  11.09 dB on the motorcycle crops and 13.35 on the procedural ones: both depth models' 1-step
  outputs are a little below it.
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
    return config_lib.task_config("depth", arg, stable_diffusion.RECIPES)
