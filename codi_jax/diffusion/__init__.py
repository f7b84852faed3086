"""Diffusion math: schedules (eq. 1), parametrizations (eq. 7), DDIM (eqs. 6, 8), samplers and
the standard denoising loss. Pure functions over arrays and a model function."""

from codi_jax.diffusion.loss import distance, make_diffusion_loss, sample_time, snr_weight
from codi_jax.diffusion.parametrization import (PREDICTION_TYPES, ddim_update, diffuse, from_x_eps,
                                                to_x_eps)
from codi_jax.diffusion.samplers import (codi_sample, consistency_sample, ddim_sample,
                                         ddim_sample_on_grid, dpm_solver_pp_2m, make_denoiser,
                                         stochastic_sample, timesteps)
from codi_jax.diffusion.schedule import (CosineSchedule, DiscreteSchedule, Schedule, get_schedule,
                                         schedule_from_scheduler_config)

__all__ = [
    "PREDICTION_TYPES", "CosineSchedule", "DiscreteSchedule", "Schedule", "codi_sample",
    "consistency_sample", "ddim_sample", "ddim_sample_on_grid", "ddim_update", "diffuse", "distance", "dpm_solver_pp_2m",
    "from_x_eps", "get_schedule", "make_denoiser", "make_diffusion_loss", "sample_time",
    "schedule_from_scheduler_config", "snr_weight", "stochastic_sample", "timesteps", "to_x_eps",
]
