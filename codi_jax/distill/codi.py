"""The CoDi objective: Algorithm 1, eqs. 11-12 of the paper, with every §5.1 ablation as a switch.

One training example, read next to Algorithm 1 (t on the teacher grid, s = t − 1/N):

    z_t   = α_t x + σ_t ε                              (eq. 1)
    x̂_t, ε̂_t = online model at (z_t, c, t)            (eq. 7)
    ẑ_s   = α_s sg(x̂_t) + σ_s ε                        (eq. 12, the PREv predictor)
    ε̂_s   = sg(target (EMA) model at (ẑ_s, c, s))      (eq. 7)
    L     = d_ε(ε̂_t, ε̂_s) + λ d_x(x, x̂_t)              (eq. 11)

The online forward's x̂_t is reused (under stop-gradient) to build ẑ_s, so a step costs exactly
two network evaluations (three with the ``teacher`` predictor ablation).

Guidance-aware mode (``guidance_max > 0``; the paper calls guidance-aware distillation orthogonal
and applicable, §2): per example w ~ U[w_min, w_max], the model reads w (a w-conditioned model,
``diffusion/guidance.py``) and the CG target is classifier-free guided at that w against the
unconditional model u (the frozen pretrained teacher with the empty prompt), with the data as the
conditional branch:

    L     = d_ε(ε̂_t(z_t, c, w), sg ε̂⁻_s(ẑ_s, c, w)) + λ d_x((1 + w) x − w sg x̂_u(z_t), x̂_t(w))

Its expectation given z_t is the guided posterior mean (1 + w) E[x | z_t, c] − w x̂_u(z_t), so this
is CoDi on "guided data": CG anchors each w's model as it anchors the conditional one, and the
consistency term, at the same w on both sides, makes each few-step. Guiding the consistency target
instead, (1 + w) ε̂⁻(ẑ_s, w = 0) − w ε̂_u(ẑ_s), diverges: the target model is the student itself, so
its w = 0 branch drifts with the guided ones and each update extrapolates from the last (measured on
the 2-D toy of tests/test_guidance.py: samples hundreds of times out within 2000 steps, even for
w ≤ 1). At w = 0 the terms are CoDi's exactly. Three evaluations per step (one of them u's).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from codi_jax.diffusion.guidance import guided_prediction, sample_w, with_w
from codi_jax.diffusion.loss import DISTANCES, ModelFn, SNR_WEIGHTINGS, distance, snr_weight
from codi_jax.diffusion.parametrization import broadcast_to, check_prediction_type, diffuse, \
    ddim_update, to_x_eps
from codi_jax.diffusion.schedule import Schedule
from codi_jax.distill.switches import Switches

Array = jnp.ndarray
# teacher(z_t, model_time, context) -> raw prediction of the frozen unconditional teacher.
TeacherFn = Callable[[Array, Array, Any], Array]

_CHOICES = {
    "timestep_sampling": ("batch", "sample"),
    "predictor": ("prev", "ddim", "teacher"),
    "consistency_space": ("eps", "x"),
    "distance": DISTANCES,
    "snr_weighting": SNR_WEIGHTINGS,
    "cg_distance": ("latent_l2", "pixel_l2", "image_l2", "perceptual"),
}


@dataclasses.dataclass(frozen=True)
class CoDiLossConfig(Switches):
    """Switches of the CoDi objective. Defaults are the paper's choices."""

    CHOICES = _CHOICES

    grid: int = 20                        # teacher grid N: t = i/N, s = t − 1/N.
    timestep_sampling: str = "batch"      # one t for the whole batch (paper) or one per example.
    predictor: str = "prev"               # ẑ_s: prev (eq. 12) | ddim (sg ε̂_t) | teacher (frozen).
    consistency_space: str = "eps"        # d_ε in ε space (paper) or x space.
    distance: str = "l2"
    huber_c: float = 1e-3
    snr_weighting: str = "none"
    snr_gamma: float = 5.0
    boundary_scalings: bool = False       # LCM-style c_skip/c_out so that f(z, 0) = z.
    boundary_sigma_data: float = 0.5
    boundary_timestep_scaling: float = 10.0
    cg_weight: float = 1.0                # λ; 0 is the "no CG" ablation.
    cg_distance: str = "latent_l2"        # paper default: ‖x − x̂‖² in the model's own space;
    # pixel_l2: ‖D(x) − D(x̂)‖²; image_l2: ‖picture − D(x̂)‖², against the picture itself rather
    # than its (lossy) latent, so the student can undo what the autoencoder gets wrong.
    # An extra CG term on the local means, cg_lowpass_weight · ‖pool(x) − pool(x̂)‖² (pool: the mean
    # over cg_lowpass_pool × cg_lowpass_pool cells of the latent; 0 = the whole crop's mean): the
    # low frequencies, which a latent l2 weighs as little as any other, get a weight of their own.
    # 0 = off (the paper's d_x). Latent l2 only.
    cg_lowpass_weight: float = 0.0
    cg_lowpass_pool: int = 0
    # Exposure to the sampler's own inputs: this fraction of the examples (drawn per example) builds
    # z_t from the target model's 1-step prediction sg(x̂⁻(z_1, c, 1)) instead of the data x — the
    # smooth posterior-mean estimate a multistep sampler's second step re-noises — and its CG term
    # is ‖pool(x) − pool(x̂_t)‖² on cg_lowpass_pool cells: with cells > 1 the low band alone (the
    # condition fixes the low frequencies whatever z_t is, while the detail of x is not in such a
    # z_t), with 1 the whole latent (the paper's d_x, whose minimiser there is the posterior mean).
    # One more network evaluation per step. 0 = off (the paper's objective).
    rollout_fraction: float = 0.0
    guidance_min: float = 0.0             # guidance-aware mode when guidance_max > 0: w ~ U[min, max]
    guidance_max: float = 0.0             # (module docstring); 0, 0: off, the paper's objective

    def check(self) -> None:
        if self.cg_lowpass_weight and self.cg_distance != "latent_l2":
            raise ValueError(f"cg_lowpass_weight: defined for cg_distance='latent_l2' only, got "
                             f"{self.cg_distance!r}")
        if not 0 <= self.rollout_fraction <= 1:
            raise ValueError(f"rollout_fraction: must lie in [0, 1], got {self.rollout_fraction}")
        if self.rollout_fraction and (self.cg_distance != "latent_l2" or not self.cg_weight):
            raise ValueError("rollout_fraction: its CG term is on latent cell means; it needs "
                             "cg_distance='latent_l2' and cg_weight > 0")
        if self.rollout_fraction and self.guided:
            raise ValueError("rollout_fraction: not defined with the guidance-aware mode (its CG "
                             "target is guided at the data's z_t)")
        if not 0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"guidance_min/max: need 0 <= min <= max, got [{self.guidance_min}, "
                             f"{self.guidance_max}]")
        if self.guided and not self.cg_weight:
            raise ValueError("guidance_max > 0 guides the CG target: it needs cg_weight > 0")
        if self.guided and self.cg_distance == "image_l2" and self.cg_weight:
            raise ValueError("cg_distance: 'image_l2' has no guided target (the pictures are the "
                             "conditional data only); use latent_l2 or pixel_l2 with guidance")

    @property
    def guided(self) -> bool:
        return self.guidance_max > 0


def ema_update(target_params: Any, online_params: Any, decay: float | Array) -> Any:
    """θ⁻ ← γ θ⁻ + (1 − γ) θ (Algorithm 1, last line)."""
    return optax.incremental_update(online_params, target_params, 1.0 - decay)


def sample_grid_index(rng: Array, batch_size: int, grid: int, mode: str) -> Array:
    """i ∈ {1, …, N}: one draw for the whole batch ("batch") or one per example ("sample")."""
    n = 1 if mode == "batch" else batch_size
    i = jax.random.randint(rng, (n,), 1, grid + 1)
    return jnp.broadcast_to(i, (batch_size,))


def local_means(x: Array, pool: int) -> Array:
    """(B, H, W, C) → the means over pool × pool cells, (B, H/pool, W/pool, C); pool 0: (B, C)."""
    if pool == 0:
        return jnp.mean(x, axis=(1, 2))
    b, h, w, c = x.shape
    if h % pool or w % pool:
        raise ValueError(f"cg_lowpass_pool: {pool} does not divide the {h}x{w} latent")
    return jnp.mean(x.reshape(b, h // pool, pool, w // pool, pool, c), axis=(2, 4))


def boundary_scalings(t: Array, cfg: CoDiLossConfig) -> tuple[Array, Array]:
    # LCM's c_skip, c_out on the scaled time τ = scaling·1000·t: c_skip(0) = 1, c_out(0) = 0.
    tau = cfg.boundary_timestep_scaling * 1000.0 * t
    sd2 = cfg.boundary_sigma_data**2
    return sd2 / (tau**2 + sd2), tau / jnp.sqrt(tau**2 + sd2)


def make_codi_loss(model_fn: ModelFn, schedule: Schedule, prediction_type: str,
                   cfg: CoDiLossConfig = CoDiLossConfig(), *,
                   teacher_fn: TeacherFn | None = None,
                   decode_fn: Callable[[Array], Array] | None = None,
                   perceptual_fn: Callable[[Array, Array], Array] | None = None,
                   uncond_fn: TeacherFn | None = None,
                   ) -> Callable[[Any, Any, Mapping[str, Array], Array], tuple[Array, dict]]:
    """Returns ``loss(online_params, target_params, batch, rng) -> (loss, metrics)``.

    ``model_fn(params, z_t, model_time, cond, context)`` is the adapted conditional model and
    returns its raw prediction of type ``prediction_type`` (the teacher's type). ``batch`` holds
    ``x`` (clean latents or pixels, (B, ...)), ``cond`` and optionally ``context`` (text).
    ``teacher_fn`` is needed by the ``teacher`` predictor; ``decode_fn`` (latent → pixels) by the
    pixel-space CG distances (``image_l2`` also needs the pictures in ``batch["image"]``);
    ``perceptual_fn(images_a, images_b) -> (B,)`` by ``perceptual``. The guidance-aware mode needs
    ``uncond_fn(z_t, model_time, context)``, the unconditional model's raw prediction, and a
    w-conditioned ``model_fn``.
    """
    check_prediction_type(prediction_type)
    if cfg.predictor == "teacher" and teacher_fn is None:
        raise ValueError("predictor: 'teacher' needs teacher_fn (the frozen unconditional teacher)")
    if cfg.cg_distance != "latent_l2" and cfg.cg_weight and decode_fn is None:
        raise ValueError(f"cg_distance: {cfg.cg_distance!r} needs decode_fn (latents → pixels)")
    if cfg.cg_distance == "perceptual" and cfg.cg_weight and perceptual_fn is None:
        raise ValueError("cg_distance: 'perceptual' needs perceptual_fn (e.g. LPIPS)")
    if cfg.guided and uncond_fn is None:
        raise ValueError("guidance_max > 0 needs uncond_fn (the unconditional model of the guidance)")

    def to_pair(pred, z, t):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        x_hat, eps_hat = to_x_eps(pred.astype(jnp.float32), z, alpha, sigma, prediction_type)
        if cfg.boundary_scalings:
            c_skip, c_out = boundary_scalings(t, cfg)
            x_hat = broadcast_to(c_skip, z) * z + broadcast_to(c_out, z) * x_hat
            # ε̂ follows from the scaled x̂ so both spaces describe the same ẑ_s.
            eps_hat = (z - broadcast_to(alpha, z) * x_hat) / broadcast_to(sigma, z)
        return x_hat, eps_hat

    def denoise(params, z, t, cond, context):
        return to_pair(model_fn(params, z, schedule.model_time(t), cond, context), z, t)

    def cg_term(x, x_hat, pictures):
        if cfg.cg_distance == "latent_l2":
            if not cfg.cg_lowpass_weight:
                return distance(x, x_hat, "l2")
            return distance(x, x_hat, "l2") + cfg.cg_lowpass_weight * distance(
                local_means(x, cfg.cg_lowpass_pool), local_means(x_hat, cfg.cg_lowpass_pool), "l2")
        images_hat = decode_fn(x_hat)
        if cfg.cg_distance == "image_l2":
            return distance(pictures.astype(jnp.float32), images_hat.astype(jnp.float32), "l2")
        images = decode_fn(x)
        if cfg.cg_distance == "pixel_l2":
            return distance(images, images_hat, "l2")
        return perceptual_fn(images, images_hat)

    def loss(online_params, target_params, batch, rng):
        x = batch["x"].astype(jnp.float32)
        cond, context = batch.get("cond"), batch.get("context")
        if cond is not None and cond.shape[0] != x.shape[0]:
            raise ValueError(f"batch: cond has batch size {cond.shape[0]} but x has {x.shape[0]}")
        if cfg.cg_distance == "image_l2" and cfg.cg_weight and "image" not in batch:
            raise ValueError("cg_distance: 'image_l2' needs the pictures in batch['image']")
        key_t, key_eps = jax.random.split(rng)
        i = sample_grid_index(key_t, x.shape[0], cfg.grid, cfg.timestep_sampling)
        t = i.astype(jnp.float32) / cfg.grid
        s = (i - 1).astype(jnp.float32) / cfg.grid
        eps = jax.random.normal(key_eps, x.shape, jnp.float32)

        if cfg.guided:   # w from a key of its own: the other draws stay those of the plain objective
            w = sample_w(jax.random.fold_in(rng, 1), x.shape[0], cfg.guidance_min, cfg.guidance_max)
            model_cond = with_w(cond, w)
        else:
            model_cond = cond
        rollout = jnp.zeros(x.shape[:1], bool)
        x_start = x
        if cfg.rollout_fraction:  # keys of their own, as w's
            key_one, key_pick = jax.random.split(jax.random.fold_in(rng, 2))
            one = jnp.ones(x.shape[:1], jnp.float32)
            z_one = diffuse(x, jax.random.normal(key_one, x.shape, jnp.float32), schedule.alpha(one),
                            schedule.sigma(one))
            x_one = jax.lax.stop_gradient(
                denoise(jax.lax.stop_gradient(target_params), z_one, one, model_cond, context)[0])
            rollout = jax.random.bernoulli(key_pick, cfg.rollout_fraction, x.shape[:1])
            x_start = jnp.where(broadcast_to(rollout, x), x_one, x)
        z_t = diffuse(x_start, eps, schedule.alpha(t), schedule.sigma(t))
        x_hat_t, eps_hat_t = denoise(online_params, z_t, t, model_cond, context)  # online, with grad

        alpha_s, sigma_s = schedule.alpha(s), schedule.sigma(s)
        if cfg.predictor == "prev":      # eq. 12: the same ε that made z_t
            z_s = ddim_update(jax.lax.stop_gradient(x_hat_t), eps, alpha_s, sigma_s)
        elif cfg.predictor == "ddim":    # eq. 8 with the online model's own ε̂_t
            z_s = ddim_update(jax.lax.stop_gradient(x_hat_t), jax.lax.stop_gradient(eps_hat_t),
                              alpha_s, sigma_s)
        else:                            # one DDIM step of the frozen unconditional teacher
            teacher_pred = teacher_fn(z_t, schedule.model_time(t), context).astype(jnp.float32)
            x_teacher, eps_teacher = to_x_eps(teacher_pred, z_t, schedule.alpha(t),
                                              schedule.sigma(t), prediction_type)
            z_s = ddim_update(x_teacher, eps_teacher, alpha_s, sigma_s)
        z_s = jax.lax.stop_gradient(z_s)

        x_hat_s, eps_hat_s = jax.lax.stop_gradient(
            denoise(jax.lax.stop_gradient(target_params), z_s, s, model_cond, context))  # EMA target
        x_cg = x
        if cfg.guided:   # CFG with the data as the conditional branch (module docstring)
            x_u, _ = to_pair(uncond_fn(z_t, schedule.model_time(t), context), z_t, t)
            x_cg = guided_prediction(x, jax.lax.stop_gradient(x_u), w)

        online, target = (eps_hat_t, eps_hat_s) if cfg.consistency_space == "eps" else (x_hat_t, x_hat_s)
        # At s = 0 the target sees clean data, where ε̂ is undefined (σ_s = 0) and x̂_s = ẑ_s =
        # sg(x̂_t) carries no gradient: those examples get only the CG term. Their target is
        # replaced by sg(online) (distance exactly 0) rather than masked afterwards, because a
        # non-finite target would turn the masked gradient into 0 · NaN = NaN.
        positive = broadcast_to(s > 0, online)
        target = jnp.where(positive, target, jax.lax.stop_gradient(online))
        consistency = distance(online, target, cfg.distance, cfg.huber_c)
        weight = (s > 0).astype(jnp.float32) * snr_weight(
            schedule.logsnr(t), cfg.consistency_space, cfg.snr_weighting, cfg.snr_gamma)
        consistency_loss = jnp.mean(weight * consistency)
        if not cfg.cg_weight:
            cg_loss = jnp.zeros(())
        elif cfg.rollout_fraction:
            low_band = distance(local_means(x_cg, cfg.cg_lowpass_pool),
                                local_means(x_hat_t, cfg.cg_lowpass_pool), "l2")
            cg_loss = jnp.mean(jnp.where(rollout, low_band, cg_term(x_cg, x_hat_t, batch.get("image"))))
        else:
            cg_loss = jnp.mean(cg_term(x_cg, x_hat_t, batch.get("image")))
        total = consistency_loss + cfg.cg_weight * cg_loss
        metrics = {"loss": total, "consistency": consistency_loss, "cg": cg_loss,
                   "t": jnp.mean(t)}
        if cfg.guided:
            metrics["w"] = jnp.mean(w)
        if cfg.rollout_fraction:
            metrics["rollout"] = jnp.mean(rollout.astype(jnp.float32))
        return total, metrics

    return loss
