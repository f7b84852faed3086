"""Variance-preserving noise schedules (paper §2, eq. 1).

Every schedule maps continuous time t ∈ [0, 1] to (α_t, σ_t) with σ² = 1 − α², to the log-SNR
λ_t = log(α²/σ²), and to the *model time*: the timestep input the network was trained with.

Discrete schedules (Stable Diffusion's ``scaled_linear``, DDPM's ``linear``) are defined by their
``T`` betas, exactly as diffusers' ``DDPMScheduler`` builds them. Continuous time relates to the
discrete index k ∈ {0..T-1} by t = (k + 1) / T, so

* t = 1 is the noisiest training step (k = T − 1 = 999),
* t = 0 is clean data (α = 1, σ = 0; "k = −1"),
* a teacher grid of N steps, t = i/N, hits k = i·T/N − 1 — diffusers' ``trailing`` timestep
  spacing (999, 949, …, 49 for N = 20), the spacing that reaches the noisiest step.

Between integer steps log ᾱ is interpolated linearly, so every t has a well-defined α_t and the
model time is the (fractional) index k. The continuous ``cosine`` schedule is defined through its
log-SNR (Nichol & Dhariwal's α_t ∝ cos(π/2·(t+s)/(1+s)), clipped to a finite log-SNR range) and its
model time is 1000·t, which keeps the sinusoidal timestep embedding in SD's numeric range.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
    """A schedule given by the cumulative products ᾱ_k of a DDPM beta sequence."""

    name: str
    alphas_cumprod: np.ndarray  # (T,) float64, the exact values diffusers uses.

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def _position(self, t: Array) -> Array:
        """t·T, snapped to the nearest integer when within float32 rounding of it, so grid times
        such as t = 9/10 (0.89999998 in float32) land exactly on their training step."""
        pos = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0) * self.num_train_timesteps
        nearest = jnp.round(pos)
        return jnp.where(jnp.abs(pos - nearest) < 1e-3, nearest, pos)

    def _log_alpha_bar(self, t: Array) -> Array:
        # Table over k = −1..T−1 (index k + 1); k = −1 is clean data with ᾱ = 1.
        table = jnp.asarray(np.log(np.concatenate([[1.0], self.alphas_cumprod])), jnp.float32)
        pos = self._position(t)
        lo = jnp.floor(pos)
        frac = pos - lo
        lo = lo.astype(jnp.int32)
        hi = jnp.minimum(lo + 1, self.num_train_timesteps)
        return (1.0 - frac) * table[lo] + frac * table[hi]

    def alpha(self, t: Array) -> Array:
        return jnp.exp(0.5 * self._log_alpha_bar(t))

    def sigma(self, t: Array) -> Array:
        # sqrt(1 − ᾱ) through expm1 keeps precision near t = 0.
        return jnp.sqrt(-jnp.expm1(self._log_alpha_bar(t)))

    def logsnr(self, t: Array) -> Array:
        log_ab = self._log_alpha_bar(t)
        return log_ab - jnp.log(-jnp.expm1(log_ab))

    def model_time(self, t: Array) -> Array:
        """The network's timestep input: the (fractional) discrete index k = t·T − 1."""
        return self._position(t) - 1.0


@dataclasses.dataclass(frozen=True)
class CosineSchedule:
    """Continuous cosine schedule, α_t ∝ cos(π/2 · (t + s)/(1 + s)), log-SNR clipped."""

    name: str = "cosine"
    offset: float = 0.008
    logsnr_min: float = -20.0
    logsnr_max: float = 20.0

    def logsnr(self, t: Array) -> Array:
        t = jnp.asarray(t, jnp.float32)
        angle = 0.5 * jnp.pi * (t + self.offset) / (1.0 + self.offset)
        angle0 = 0.5 * jnp.pi * self.offset / (1.0 + self.offset)
        # ᾱ_t = cos²(angle)/cos²(angle0)  ⇒  λ = log(ᾱ/(1 − ᾱ)).
        alpha_bar = jnp.clip(jnp.cos(angle) ** 2 / jnp.cos(angle0) ** 2, 0.0, 1.0)
        lam = jnp.log(alpha_bar) - jnp.log1p(-alpha_bar)
        return jnp.clip(lam, self.logsnr_min, self.logsnr_max)

    def alpha(self, t: Array) -> Array:
        return jnp.sqrt(jnp.asarray(_sigmoid(self.logsnr(t))))

    def sigma(self, t: Array) -> Array:
        return jnp.sqrt(jnp.asarray(_sigmoid(-self.logsnr(t))))

    def model_time(self, t: Array) -> Array:
        return 1000.0 * jnp.asarray(t, jnp.float32)


def _sigmoid(x: Array) -> Array:
    return 1.0 / (1.0 + jnp.exp(-x))


Schedule = DiscreteSchedule | CosineSchedule


def _betas_to_schedule(name: str, betas: np.ndarray) -> DiscreteSchedule:
    return DiscreteSchedule(name=name, alphas_cumprod=np.cumprod(1.0 - betas))


def _scaled_linear(beta_start: float = 0.00085, beta_end: float = 0.012,
                   num_train_timesteps: int = 1000) -> DiscreteSchedule:
    # Stable Diffusion: linear in sqrt(β) (diffusers' "scaled_linear"), computed in float32 as
    # diffusers does, so alphas_cumprod matches it to the last bit that float32 carries.
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    return _betas_to_schedule("scaled_linear", betas.astype(np.float64))


def _linear(beta_start: float = 0.0001, beta_end: float = 0.02,
            num_train_timesteps: int = 1000) -> DiscreteSchedule:
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    return _betas_to_schedule("linear", betas.astype(np.float64))


_REGISTRY: dict[str, Callable[..., Schedule]] = {
    "scaled_linear": _scaled_linear,
    "linear": _linear,
    "cosine": CosineSchedule,
}


def get_schedule(name: str, **kwargs) -> Schedule:
    """Returns the schedule registered under ``name`` (``scaled_linear``, ``linear``, ``cosine``).

    Keyword arguments override the schedule's defaults (e.g. ``beta_start``, ``beta_end`` and
    ``num_train_timesteps`` of a diffusers scheduler config).
    """
    if name not in _REGISTRY:
        raise ValueError(f"schedule: unknown schedule {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def schedule_from_scheduler_config(config: dict) -> Schedule:
    """The schedule of a diffusers ``scheduler/scheduler_config.json`` dict."""
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in ("scaled_linear", "linear"):
        raise ValueError(f"scheduler config: beta_schedule {beta_schedule!r} is not supported; "
                         "known: ['linear', 'scaled_linear']")
    kwargs = {k: config[k] for k in ("beta_start", "beta_end", "num_train_timesteps") if k in config}
    return get_schedule(beta_schedule, **kwargs)
