"""Distillation objectives: CoDi (Algorithm 1) and the baselines it is compared with —
consistency distillation (CM), guided / progressive distillation (GD) and Flash Diffusion."""

from codi_jax.distill.codi import CoDiLossConfig, ema_update, make_codi_loss, sample_grid_index
from codi_jax.distill.consistency import CMLossConfig, make_cm_denoiser, make_cm_loss
from codi_jax.distill.flash import FlashLossConfig, make_flash_losses
from codi_jax.distill.progressive import (ProgressiveLossConfig, make_guided_stage_one_loss,
                                          make_progressive_loss, progressive_distillation)

__all__ = ["CMLossConfig", "CoDiLossConfig", "FlashLossConfig", "make_flash_losses", "ProgressiveLossConfig", "ema_update", "make_cm_denoiser",
           "make_cm_loss", "make_codi_loss", "make_guided_stage_one_loss", "make_progressive_loss",
           "progressive_distillation", "sample_grid_index"]
