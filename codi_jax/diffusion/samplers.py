"""Samplers: DDIM (eq. 6), CoDi's few-step sampler, the stochastic N-step sampler of guided
distillation (Meng et al. 2023, eqs. 4-7), consistency-model multistep sampling and DPM-Solver++(2M).

Every sampler takes a *denoiser* ``denoise(z, t) -> (x̂, ε̂)`` (see ``make_denoiser``), runs one
``lax.scan`` over its steps (``ddim_sample_on_grid``: one loop whose length is a traced step count)
and calls the denoiser exactly once per step, so an N-step sampler costs N network evaluations. Conditions and text are closed over by the denoiser, not threaded through here.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from codi_jax.diffusion.parametrization import broadcast_to, check_prediction_type, ddim_update, to_x_eps
from codi_jax.diffusion.schedule import Schedule

Array = jnp.ndarray
Denoiser = Callable[[Array, Array], tuple[Array, Array]]


def make_denoiser(model_fn: Callable[[Array, Array], Array], schedule: Schedule,
                  prediction_type: str) -> Denoiser:
    """Wraps ``model_fn(z, model_time) -> raw prediction`` into ``denoise(z, t) -> (x̂, ε̂)``."""
    check_prediction_type(prediction_type)

    def denoise(z: Array, t: Array) -> tuple[Array, Array]:
        t_batch = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
        pred = model_fn(z, schedule.model_time(t_batch))
        return to_x_eps(pred, z, schedule.alpha(t_batch), schedule.sigma(t_batch), prediction_type)

    return denoise


def timesteps(num_steps: int, grid_size: int | None = None) -> np.ndarray:
    """Descending times t_0 = 1 > … > t_num_steps = 0 for a ``num_steps`` sampler.

    With a teacher grid of ``grid_size`` steps, every time is a multiple of 1/grid_size (the
    distilled model was only trained there): e.g. 4 steps on a 20-grid are 1, .75, .5, .25, 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps: must be at least 1, got {num_steps}")
    if grid_size is None:
        return np.linspace(1.0, 0.0, num_steps + 1)
    if num_steps > grid_size:
        raise ValueError(f"num_steps: {num_steps} steps do not fit a teacher grid of {grid_size} steps")
    idx = np.round(np.linspace(grid_size, 0, num_steps + 1)).astype(np.int64)
    return idx / grid_size


def _pairs(ts: np.ndarray | Array) -> tuple[Array, Array]:
    ts = jnp.asarray(ts, jnp.float32)
    return ts[:-1], ts[1:]


def ddim_sample(denoise: Denoiser, z_init: Array, schedule: Schedule, ts: np.ndarray | Array) -> Array:
    """Deterministic DDIM (eq. 6) along ``ts``, (steps + 1,) or one time path per example
    (steps + 1, B); returns z at the last time (x̂ when it is 0)."""

    def step(z, t_s):
        t, s = t_s
        x_hat, eps_hat = denoise(z, t)
        return ddim_update(x_hat, eps_hat, schedule.alpha(s), schedule.sigma(s)), None

    z, _ = jax.lax.scan(step, z_init, _pairs(ts))
    return z


def ddim_sample_on_grid(denoise: Denoiser, z_init: Array, schedule: Schedule, num_steps: Array,
                        grid_size: int) -> Array:
    """``ddim_sample`` along ``timesteps(num_steps, grid_size)`` with the step count a traced
    integer: one compiled program serves every step count (a ``while`` loop, for sampling only —
    it has no reverse-mode gradient). The times are computed in the loop exactly as
    ``timesteps`` rounds them (half to even)."""
    n = jnp.asarray(num_steps, jnp.int32)

    def time(i):
        return jnp.round(grid_size * (n - i).astype(jnp.float32) / n.astype(jnp.float32)) / grid_size

    def step(i, z):
        x_hat, eps_hat = denoise(z, time(i))
        s = time(i + 1)
        return ddim_update(x_hat, eps_hat, schedule.alpha(s), schedule.sigma(s))

    return jax.lax.fori_loop(0, n, step, z_init)


def codi_sample(denoise: Denoiser, z_init: Array, schedule: Schedule, num_steps: int,
                grid_size: int) -> Array:
    """CoDi's few-step sampler (1, 2, 4, 8 … steps on the teacher grid): DDIM steps through the
    distilled model, returning the last signal prediction x̂ (the z reached at t = 0)."""
    return ddim_sample(denoise, z_init, schedule, timesteps(num_steps, grid_size))


def consistency_sample(denoise: Denoiser, z_init: Array, schedule: Schedule, ts: np.ndarray,
                       rng: Array) -> Array:
    """Multistep consistency sampling (Song et al. 2023): x̂ = f(z_t), then re-noise to the next
    time with fresh noise, z_s = α_s x̂ + σ_s ε. The last step returns x̂."""
    keys = jax.random.split(rng, len(ts) - 1)

    def step(z, inputs):
        (t, s), key = inputs
        x_hat, _ = denoise(z, t)
        noise = jax.random.normal(key, z.shape, z.dtype)
        return ddim_update(x_hat, noise, schedule.alpha(s), schedule.sigma(s)), None

    z, _ = jax.lax.scan(step, z_init, (_pairs(ts), keys))
    return z


def stochastic_sample(denoise: Denoiser, z_init: Array, schedule: Schedule, num_steps: int,
                      rng: Array, grid_size: int | None = None) -> Array:
    """Guided distillation's stochastic N-step sampler (Meng et al. 2023, §3.3, eqs. 4-7).

    At each time t > 1/N: one deterministic DDIM step of twice the step length to k = t − 2/N
    (eqs. 4, 6), then a forward (noising) step back to s = t − 1/N (eqs. 5, 7):
    z_s = (α_s/α_k) z_k + σ_{s|k} ε with σ²_{s|k} = (1 − e^{λ_s − λ_k}) σ_s². At t = 1/N the last
    step is deterministic to 0. N model evaluations in all.
    """
    ts = timesteps(num_steps, grid_size)
    # Evaluation times t_i, the next times s_i and the two-steps-ahead times k_i (0 at the end).
    t_eval, t_next = ts[:-1], ts[1:]
    t_jump = np.concatenate([ts[2:], [0.0]])
    keys = jax.random.split(rng, num_steps)

    def step(z, inputs):
        t, k, s, key = inputs
        x_hat, eps_hat = denoise(z, t)
        a_k, a_s = schedule.alpha(k), schedule.alpha(s)
        sig_k, sig_s = schedule.sigma(k), schedule.sigma(s)
        z_k = ddim_update(x_hat, eps_hat, a_k, sig_k)
        # σ²_{s|k} = (1 − e^{λ_s−λ_k}) σ_s² = σ_s² − (α_s σ_k / α_k)²: the second form stays finite
        # when k = 0 (λ_k = ∞).
        var = jnp.maximum(sig_s**2 - (a_s * sig_k / a_k) ** 2, 0.0)
        noise = jax.random.normal(key, z.shape, z.dtype)
        z_s = (a_s / a_k) * z_k + jnp.sqrt(var) * noise
        # The final step (s = 0) is the plain deterministic one of eq. 2 / 6.
        z_last = ddim_update(x_hat, eps_hat, a_s, sig_s)
        return jnp.where(s > 0, z_s, z_last), None

    inputs = (jnp.asarray(t_eval, jnp.float32), jnp.asarray(t_jump, jnp.float32),
              jnp.asarray(t_next, jnp.float32), keys)
    z, _ = jax.lax.scan(step, z_init, inputs)
    return z


def dpm_solver_pp_2m(denoise: Denoiser, z_init: Array, schedule: Schedule, ts: np.ndarray | Array) -> Array:
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in data-prediction form along ``ts``.

    Step t → s with h = λ_s − λ_t (λ = log α/σ here, the half log-SNR):
    z_s = (σ_s/σ_t) z_t − α_s (e^{−h} − 1) D, where D = x̂_t on the first step and
    D = (1 + 1/(2r)) x̂_t − 1/(2r) x̂_prev with r = h_prev/h afterwards. The step that lands on
    σ = 0 is first order (D = x̂_t), as diffusers does with ``final_sigmas_type="zero"``.
    ``ts`` is (steps + 1,) or, one time path per example, (steps + 1, B).
    """

    def half_logsnr(t):
        return 0.5 * schedule.logsnr(t)

    def step(carry, inputs):
        z, x_prev, h_prev = carry
        (t, s), is_first = inputs
        x_hat, _ = denoise(z, t)
        a_s, sig_t, sig_s = schedule.alpha(s), schedule.sigma(t), schedule.sigma(s)
        final = sig_s == 0
        # On the final step h = ∞; guard it so the unused branch stays finite.
        h = jnp.where(final, 1.0, half_logsnr(s) - half_logsnr(t))
        r = broadcast_to(h_prev / h, z)
        second = (1.0 + 0.5 / r) * x_hat - (0.5 / r) * x_prev
        d = jnp.where(broadcast_to(is_first | final, z), x_hat, second)
        z_s = broadcast_to(sig_s / sig_t, z) * z - broadcast_to(a_s * jnp.expm1(-h), z) * d
        z_s = jnp.where(broadcast_to(final, z), x_hat, z_s)
        return (z_s, x_hat, h), None

    pairs = _pairs(ts)
    is_first = jnp.arange(len(ts) - 1) == 0
    init = (z_init, jnp.zeros_like(z_init), jnp.ones(pairs[0].shape[1:], jnp.float32))
    (z, _, _), _ = jax.lax.scan(step, init, (pairs, is_first))
    return z
