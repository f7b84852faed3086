"""diffusers' DDIM and DPM-Solver++ trajectories on an analytic model, the reference for
tests/test_samplers.py.

Run ``python tests/sampler_reference.py`` (needs torch + diffusers) to regenerate
``tests/fixtures/sampler_reference.npz``; the default test run only reads that file.
"""

from __future__ import annotations

import os

import numpy as np

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "sampler_reference.npz")
NUM_STEPS = 10
PREDICTION_TYPES = ("epsilon", "v_prediction")
SCHEDULER_KWARGS = dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                        beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")


def noise_scale(prediction_type: str) -> np.ndarray:
    """Per-step coefficient c_k of the analytic model: σ_k for ε-prediction (the exact ε̂ = σ z of
    standard-normal data), 0 for v-prediction (whose exact v̂ is 0 there). Keeps trajectories O(1)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float32) ** 2
    sigma = np.sqrt(1.0 - np.cumprod(1.0 - betas.astype(np.float64)))
    return (sigma if prediction_type == "epsilon" else 0 * sigma).astype(np.float32)


def analytic_model(z, timestep, prediction_type: str, xp=np):
    """A smooth nonlinear stand-in for a network: c_k z + 0.1 tanh(0.7 z + sin(k/100)).
    ``xp`` is numpy (for diffusers) or jax.numpy (for ours); ``timestep`` is the integer step k."""
    c = xp.asarray(noise_scale(prediction_type))[timestep]
    k = xp.asarray(timestep, xp.float32)
    return c * z + 0.1 * xp.tanh(0.7 * z + xp.sin(k / 100.0))


def initial_noise() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)


def diffusers_trajectory(solver: str, prediction_type: str) -> np.ndarray:
    """z after each of NUM_STEPS steps of diffusers' scheduler, shape (NUM_STEPS, *z.shape)."""
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if solver == "ddim":
        # set_alpha_to_one: the last step lands on clean data (ᾱ = 1), like our t = 0.
        sched = DDIMScheduler(prediction_type=prediction_type, clip_sample=False,
                              set_alpha_to_one=True, **SCHEDULER_KWARGS)
    else:
        sched = DPMSolverMultistepScheduler(prediction_type=prediction_type, solver_order=2,
                                            algorithm_type="dpmsolver++", final_sigmas_type="zero",
                                            **SCHEDULER_KWARGS)
    sched.set_timesteps(NUM_STEPS)
    z = torch.from_numpy(initial_noise()).double()
    out = []
    for k in sched.timesteps:
        pred = torch.from_numpy(analytic_model(z.float().numpy(), int(k), prediction_type)).double()
        z = sched.step(pred, k, z).prev_sample
        out.append(z.float().numpy())
    return np.stack(out)


def main() -> None:
    arrays = {f"{solver}_{ptype}": diffusers_trajectory(solver, ptype)
              for solver in ("ddim", "dpmpp") for ptype in PREDICTION_TYPES}
    np.savez(FIXTURE, initial_noise=initial_noise(), **arrays)
    print("wrote", FIXTURE, sorted(arrays))


if __name__ == "__main__":
    main()
