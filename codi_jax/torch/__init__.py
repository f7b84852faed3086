"""Run a codi_jax export in PyTorch, with diffusers' modules (optional; needs torch and diffusers).

Nothing in the JAX code imports this package. A PE-CoDi export is a plain diffusers pipeline
folder with a ``controlnet/`` (a ``ControlNetModel``); a full-CoDi export adds a ``cond_encoder/``
(the μ-blended conditional encoder of the CoDi paper, eq. 10), which diffusers has no class for:

* :class:`CoDiUNet` — diffusers' ``UNet2DConditionModel`` with the conditional encoder: its
  features are blended into the UNet's skip points and mid output by forward hooks, so the UNet's
  own forward runs unchanged;
* :class:`CoDiPipeline` — CoDi's few-step sampler (DDIM steps on the teacher grid, as
  ``codi_jax.diffusion.codi_sample``) for either adapter: ``CoDiPipeline.from_export(folder)``.

A PE-CoDi model trained with ``model.cond_input=pixel`` also runs in diffusers'
``StableDiffusionControlNetPipeline`` (the export's README says how).
"""

from codi_jax.torch.codi import CoDiPipeline, CoDiUNet, grid_timesteps

__all__ = ["CoDiPipeline", "CoDiUNet", "grid_timesteps"]
