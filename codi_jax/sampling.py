"""The samplers a trained model is run with, by name, as one ``sample(params, aux, batch, rng)``.

``SAMPLERS``: CoDi's few-step sampler on the teacher grid (``codi``), DDIM and DPM-Solver++ on the
teacher's training grid (``ddim``, ``dpmpp``: teachers and GD students), GD's stochastic N-step
sampler (``stochastic``), the consistency model's multistep sampler (``cm``) and its deterministic
counterpart (``cm_ddim``), and the plain denoiser's x̂ re-noised with fresh noise between steps on
the model's grid (``renoise``: Flash Diffusion's sampler, and the stochastic multistep sampler of
any distilled model). The evaluation and anything that runs a model on pictures share this
registry.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from codi_jax import diffusion
from codi_jax.distill import CMLossConfig, make_cm_denoiser
from codi_jax.modeling import Student

SAMPLERS = ("codi", "ddim", "dpmpp", "stochastic", "cm", "cm_ddim", "renoise")


def sampling_grid(sampler_name: str, student: Student, grid: int) -> int | None:
    """The uniform time grid a ``codi`` / ``ddim`` sampler steps on (the teacher grid CoDi
    distilled on; the teacher's training grid), or None for the other samplers."""
    if sampler_name == "codi":
        return grid
    if sampler_name == "ddim":
        return getattr(student.teacher.schedule, "num_train_timesteps", None)
    return None


def sampler(name: str, student: Student, grid: int, cm: CMLossConfig) -> Callable:
    """``run(model_fn, z, num_steps, rng)`` of the sampler ``name``; ``model_fn(z, model_time)``
    is the conditional model with its condition closed over."""
    schedule, prediction_type = student.teacher.schedule, student.teacher.prediction_type
    train_grid = getattr(schedule, "num_train_timesteps", None)

    def deterministic(run):
        return lambda model_fn, z, n, rng: run(
            diffusion.make_denoiser(model_fn, schedule, prediction_type), z, n, rng)

    samplers = {
        # The distilled model only knows the teacher grid.
        "codi": deterministic(lambda d, z, n, rng: diffusion.codi_sample(d, z, schedule, n, grid)),
        # Teachers and GD students: any step count on their own training grid.
        "ddim": deterministic(lambda d, z, n, rng: diffusion.ddim_sample(
            d, z, schedule, diffusion.timesteps(n, train_grid))),
        "dpmpp": deterministic(lambda d, z, n, rng: diffusion.dpm_solver_pp_2m(
            d, z, schedule, diffusion.timesteps(n, train_grid))),
        # GD's stochastic N-step sampler (Meng et al. §3.3).
        "stochastic": deterministic(lambda d, z, n, rng: diffusion.stochastic_sample(
            d, z, schedule, n, rng, train_grid)),
        # CM students: their boundary-parametrized consistency function, multistep sampling on
        # the CM grid, or DDIM steps through it.
        "cm": lambda model_fn, z, n, rng: diffusion.consistency_sample(
            make_cm_denoiser(model_fn, schedule, prediction_type, cm), z, schedule,
            diffusion.timesteps(n, cm.grid), rng),
        "cm_ddim": lambda model_fn, z, n, rng: diffusion.codi_sample(
            make_cm_denoiser(model_fn, schedule, prediction_type, cm), z, schedule, n, cm.grid),
        # The plain denoiser re-noised between steps (as LCM's scheduler does) on the grid the
        # model distilled on (``grid``: Flash's K, CoDi's teacher grid).
        "renoise": lambda model_fn, z, n, rng: diffusion.consistency_sample(
            diffusion.make_denoiser(model_fn, schedule, prediction_type), z, schedule,
            diffusion.timesteps(n, grid), rng),
    }
    if name not in samplers:
        raise ValueError(f"eval.samplers: unknown sampler {name!r}; known: {sorted(samplers)}")
    return samplers[name]


def make_sample_fn(student: Student, sampler_name: str, grid: int, num_steps: int,
                   cm: CMLossConfig = CMLossConfig()) -> Callable:
    """``sample(params, aux, batch, rng) -> images in [−1, 1]`` (jit it). ``grid`` is the teacher
    grid CoDi distilled on; ``cm`` the CM student's boundary scalings and grid."""
    run = sampler(sampler_name, student, grid, cm)
    return _sample_fn(student, lambda model_fn, z, rng: run(model_fn, z, num_steps, rng))


def make_grid_sample_fn(student: Student, sampler_name: str, grid: int) -> Callable:
    """``sample(params, aux, batch, rng, num_steps)`` of a ``codi`` / ``ddim`` sampler with the
    step count an argument: one compilation for every step count (the evaluation's). Equal to
    ``make_sample_fn(…, num_steps)``."""
    schedule, prediction_type = student.teacher.schedule, student.teacher.prediction_type
    size = sampling_grid(sampler_name, student, grid)
    if size is None:
        raise ValueError(f"make_grid_sample_fn: sampler {sampler_name!r} has no uniform time grid")

    def sample(params, aux, batch, rng, num_steps):
        def run(model_fn, z, _):
            denoise = diffusion.make_denoiser(model_fn, schedule, prediction_type)
            return diffusion.ddim_sample_on_grid(denoise, z, schedule, num_steps, size)

        return _sample_fn(student, run)(params, aux, batch, rng)

    return sample


def make_tile_fns(student: Student) -> tuple[Callable, Callable]:
    """``(condition, denoise)`` for sampling a picture tile by tile (jit each; ``codi_jax.predict``).

    ``condition(aux, cond, text) -> (c, context)`` encodes a batch of tiles' conditions (pixels)
    and the prompt once; ``denoise(params, c, context, z, t) -> x̂`` is one network evaluation at
    time ``t`` (a traced scalar: one compilation serves every step of every step count). The
    caller blends the tiles' x̂ over the whole picture and takes the DDIM step there, so tiles
    agree at every step (MultiDiffusion), not only at the end."""
    schedule, prediction_type = student.teacher.schedule, student.teacher.prediction_type

    def condition(aux, cond, text):
        return student.encode_cond(aux, cond), student.context(aux, text)

    def denoise(params, c, context, z, t):
        model_fn = lambda z, model_time: student.model_fn(params, z, model_time, c, context)
        return diffusion.make_denoiser(model_fn, schedule, prediction_type)(z, t)[0]

    return condition, denoise


def _sample_fn(student: Student, run: Callable) -> Callable:
    """The shared frame of a sampler: VAE/text preparation, the initial noise, decoding."""

    def sample(params, aux, batch, rng):
        data = student.prepare(aux, batch, None)
        k_init, k_sample = jax.random.split(rng)
        z = jax.random.normal(k_init, data["x"].shape, jnp.float32)
        model_fn = lambda z, t: student.model_fn(params, z, t, data["cond"], data["context"])
        return jnp.clip(student.decode(aux, run(model_fn, z, k_sample)), -1.0, 1.0)

    return sample


class JittedSamplers:
    """The jitted samplers of one student, built on first use and kept: every evaluation of a run
    (each split, EMA and online weights, each ``eval.every``) shares their compilations. ``codi``
    and ``ddim`` compile once for all step counts (``make_grid_sample_fn``), the others once per
    step count."""

    def __init__(self, student: Student):
        self.student = student
        self._fns: dict[Any, Callable] = {}

    def get(self, sampler_name: str, grid: int, num_steps: int, cm: CMLossConfig) -> Callable:
        """``sample(params, aux, batch, rng)`` of ``num_steps`` steps."""
        size = sampling_grid(sampler_name, self.student, grid)
        if size is not None:
            diffusion.timesteps(num_steps, size)  # the step count must fit the grid
            key = (sampler_name, size)
            if key not in self._fns:
                self._fns[key] = jax.jit(make_grid_sample_fn(self.student, sampler_name, grid))
            fn, steps = self._fns[key], jnp.int32(num_steps)
            return lambda params, aux, batch, rng: fn(params, aux, batch, rng, steps)
        key = (sampler_name, grid, num_steps, cm)
        if key not in self._fns:
            self._fns[key] = jax.jit(make_sample_fn(self.student, sampler_name, grid, num_steps, cm))
        return self._fns[key]
