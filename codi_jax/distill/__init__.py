"""Distillation objectives: CoDi (Algorithm 1) and, with later work, the baselines."""

from codi_jax.distill.codi import CoDiLossConfig, ema_update, make_codi_loss, sample_grid_index

__all__ = ["CoDiLossConfig", "ema_update", "make_codi_loss", "sample_grid_index"]
