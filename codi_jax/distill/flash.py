"""Flash Diffusion (Chadebec et al. 2024, "Flash Diffusion: Accelerating Any Conditional Diffusion
Model for Few Steps Image Generation", §"Proposed Method"), eqs. 2-6.

The student f_θ (initialised from the fine-tuned conditional teacher, as CM and GD are) learns
to jump from z_t to the teacher's ODE solution in one evaluation. One training example reads

    t     ~ π(t | training progress)           K grid times, eq. 3 (``timestep_pmf``)
    z_t   = α_t x + σ_t ε
    z̃₀    = sg(Ψ_teacher(z_t, t → 0))            ``teacher_steps`` solver steps, CFG at ω ~ U[ω_min, ω_max]
    x̂     = f_θ(z_t, t)                          the student's one-step x̂
    L_distil = ‖x̂ − z̃₀‖²                                                          (eq. 2)
    L_adv    = ½ (D(E(α_t' x̂ + σ_t' ε')) − 1)²     t' ∈ {0.01, .25, .5, .75}       (eq. 4)
    L_DMD    : ∇_x̂ = (x̂_student − x̂_teacher)(α x̂ + σ ε'', t'')   t'' ~ U[t_min, 1]  (eq. 5)
    L        = L_distil + λ_adv L_adv + λ_DMD L_DMD                                 (eq. 6)

and the discriminator (a small CNN head D on the *frozen* teacher UNet's encoder E) takes
L_dis = ½ [(D(E(z_t'^real)) − 1)² + D(E(z_t'^fake))²] (eq. 4, LSGAN). The trainer alternates:
each step updates the student on the generator loss, then the head on the discriminator loss with
the updated student's samples; each has its own optimizer state.

Choices the paper leaves open, made here: the β phases of π (warm-up on t = ¼, ½, then the mass
moving toward t = 1 in ``phase_betas`` over ``phase_ends`` of training); the DMD gradient in x
space with DMD's normalisation 1/mean|x̂ − x̂_teacher| (Yin et al. 2023), t'' kept above ``dmd_t_min``
where the score is defined; the discriminator reads the latent only (the condition is enforced by
L_distil); guidance ω follows this codebase's w convention x̂^w = (1 + w) x̂_c − w x̂_∅ (diffusers'
guidance scale is 1 + w), and a guided student takes w as an input (guidance-aware: one evaluation
per step at sampling instead of two), the DMD "fake" score included.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from codi_jax.diffusion.loss import ModelFn, distance
from codi_jax.diffusion.guidance import guided_prediction, sample_w, with_w
from codi_jax.diffusion.parametrization import broadcast_to, check_prediction_type, diffuse, to_x_eps
from codi_jax.diffusion.samplers import ddim_sample, dpm_solver_pp_2m
from codi_jax.diffusion.schedule import Schedule
from codi_jax.distill.switches import Switches

Array = jnp.ndarray
# teacher(z_t, model_time, cond, context) -> raw prediction of the frozen conditional teacher.
ConditionalTeacherFn = Callable[[Array, Array, Any, Any], Array]
# features(z_t, model_time, context) -> the frozen teacher UNet encoder's output (B, h, w, C).
FeaturesFn = Callable[[Array, Array, Any], Array]
# disc(disc_params, features) -> per-example real/fake score (B,) (or any (B, ...) map).
DiscriminatorFn = Callable[[Any, Array], Array]

DISTRIBUTIONS = ("mixture", "uniform", "gaussian", "sharp")
_CHOICES = {"distribution": DISTRIBUTIONS, "teacher_solver": ("ddim", "dpmpp")}


@dataclasses.dataclass(frozen=True)
class FlashLossConfig(Switches):
    """Switches of the Flash objective; defaults follow the paper where it gives a value."""

    CHOICES = _CHOICES

    num_timesteps: int = 32               # K grid times t = i/K (the paper: 16 or 32).
    distribution: str = "mixture"         # π: eq. 3 | uniform | gaussian (t = ½) | sharp (4 times only)
    # β of the four modes t = ¼, ½, ¾, 1 in each phase; phase p lasts until phase_ends[p] of training.
    phase_betas: tuple = ((0.5, 0.5, 0.0, 0.0), (0.25, 0.25, 0.25, 0.25), (0.1, 0.2, 0.3, 0.4),
                          (0.05, 0.1, 0.25, 0.6))
    phase_ends: tuple = (0.25, 0.5, 0.75, 1.0)
    gaussian_std: float = 0.25            # of the ``gaussian`` ablation's normal around t = ½
    teacher_steps: int = 4                # solver steps of the teacher from z_t to 0 (eq. 2)
    teacher_solver: str = "ddim"
    guidance_min: float = 0.0             # w ~ U[w_min, w_max] for a teacher whose condition can
    guidance_max: float = 0.0             # be dropped; 0, 0 is no guidance (e.g. the SR teacher)
    adv_weight: float = 0.1               # λ_adv; 0 switches the GAN off (the loss ablation)
    adv_times: tuple = (0.01, 0.25, 0.5, 0.75)
    dmd_weight: float = 0.1               # λ_DMD; 0 switches it off
    dmd_t_min: float = 0.02
    disc_lr: float = 1e-4

    def check(self) -> None:
        if self.num_timesteps < 4 or self.num_timesteps % 4:
            raise ValueError(f"num_timesteps: K must be a positive multiple of 4 (its modes are K/4, "
                             f"K/2, 3K/4, K), got {self.num_timesteps}")
        if len(self.phase_betas) != len(self.phase_ends) or not self.phase_ends:
            raise ValueError(f"phase_betas/phase_ends: one β 4-tuple per phase end, got "
                             f"{len(self.phase_betas)} and {len(self.phase_ends)}")
        for betas in self.phase_betas:
            if len(betas) != 4 or min(betas) < 0 or sum(betas) <= 0:
                raise ValueError(f"phase_betas: each phase needs four non-negative β, not all 0; got {betas}")
        if list(self.phase_ends) != sorted(self.phase_ends) or self.phase_ends[-1] < 1.0:
            raise ValueError(f"phase_ends: increasing fractions of training ending at 1, got {self.phase_ends}")
        if self.teacher_steps < 1:
            raise ValueError(f"teacher_steps: at least 1, got {self.teacher_steps}")
        if not 0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"guidance_min/max: need 0 <= min <= max, got [{self.guidance_min}, "
                             f"{self.guidance_max}]")
        if not 0 < self.dmd_t_min < 1:
            raise ValueError(f"dmd_t_min: must lie in (0, 1), got {self.dmd_t_min}")

    @property
    def guided(self) -> bool:
        return self.guidance_max > 0


# ------------------------------------------------------------------------ timesteps (eq. 3)


def phase_betas(cfg: FlashLossConfig, progress: Array) -> Array:
    """β of the four modes (t = ¼, ½, ¾, 1) at ``progress`` ∈ [0, 1] of training: the phase whose
    end is the first above ``progress`` (the last phase from then on)."""
    ends = jnp.asarray(cfg.phase_ends, jnp.float32)
    phase = jnp.minimum(jnp.sum(jnp.asarray(progress, jnp.float32) >= ends), len(cfg.phase_ends) - 1)
    return jnp.asarray(cfg.phase_betas, jnp.float32)[phase]


def timestep_pmf(cfg: FlashLossConfig, progress: Array) -> Array:
    """π over the K grid times t_j = j/K (j = 1..K) at ``progress`` ∈ [0, 1] of training; sums to 1.

    ``mixture`` is eq. 3: Gaussians of σ = √(0.5/K²) at μ_i = i/K weighted by β_i, non-zero only at
    the four inference times i ∈ {K/4, K/2, 3K/4, K}, evaluated on the grid and normalised.
    ``sharp`` puts the same β on the four times alone; ``uniform`` and ``gaussian`` (a normal
    around t = ½) are the paper's ablations and do not change over training.
    """
    k = cfg.num_timesteps
    t = jnp.arange(1, k + 1, dtype=jnp.float32) / k
    if cfg.distribution == "uniform":
        return jnp.full((k,), 1.0 / k)
    if cfg.distribution == "gaussian":
        p = jnp.exp(-0.5 * ((t - 0.5) / cfg.gaussian_std) ** 2)
        return p / jnp.sum(p)
    betas = phase_betas(cfg, progress)
    modes = jnp.asarray([0.25, 0.5, 0.75, 1.0], jnp.float32)
    if cfg.distribution == "sharp":
        p = jnp.zeros((k,)).at[jnp.asarray([k // 4, k // 2, 3 * k // 4, k]) - 1].set(betas)
        return p / jnp.sum(p)
    var = 0.5 / k**2
    p = jnp.sum(betas[:, None] * jnp.exp(-((t[None] - modes[:, None]) ** 2) / (2 * var)), axis=0)
    return p / jnp.sum(p)


def sample_timesteps(rng: Array, batch_size: int, cfg: FlashLossConfig, progress: Array) -> Array:
    """t = j/K per example, j ~ π(· | progress)."""
    pmf = timestep_pmf(cfg, progress)
    j = jax.random.categorical(rng, jnp.log(pmf), shape=(batch_size,)) + 1
    return j.astype(jnp.float32) / cfg.num_timesteps


# ------------------------------------------------------------------ the teacher target (eq. 2)


def guided_denoiser(teacher_fn: ConditionalTeacherFn, schedule: Schedule, prediction_type: str,
                    cond: Any, context: Any, w: Array | None = None,
                    uncond_fn: Callable[[Any, Any], tuple[Any, Any]] | None = None
                    ) -> Callable[[Array, Array], tuple[Array, Array]]:
    """``denoise(z, t) -> (x̂, ε̂)`` of the frozen conditional teacher; with a per-example guidance
    weight ``w``, classifier-free guided: x̂^w = (1 + w) x̂(c) − w x̂(∅), the dropped condition from
    ``uncond_fn(cond, context)``, and ε̂ consistent with x̂^w (two teacher evaluations per call)."""

    def denoise(z: Array, t: Array) -> tuple[Array, Array]:
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)

        def x_hat(c, ctx):
            pred = teacher_fn(z, schedule.model_time(t), c, ctx).astype(jnp.float32)
            return to_x_eps(pred, z, alpha, sigma, prediction_type)[0]

        x = x_hat(cond, context)
        if w is not None:
            x = guided_prediction(x, x_hat(*uncond_fn(cond, context)), w)
        return x, (z - broadcast_to(alpha, z) * x) / broadcast_to(sigma, z)

    return denoise


def teacher_solution(denoise: Callable[[Array, Array], tuple[Array, Array]], z_t: Array, t: Array,
                     schedule: Schedule, cfg: FlashLossConfig) -> Array:
    """z̃₀: ``cfg.teacher_steps`` steps of the teacher's ODE solver from each example's own t to 0
    (times t·(1 − k/n), k = 0..n), all in one ``lax.scan``; ``denoise(z, t) -> (x̂, ε̂)``."""
    n = cfg.teacher_steps
    fractions = 1.0 - jnp.arange(n + 1, dtype=jnp.float32) / n
    ts = fractions[:, None] * jnp.broadcast_to(t, z_t.shape[:1])[None]       # (n + 1, B)
    solve = ddim_sample if cfg.teacher_solver == "ddim" else dpm_solver_pp_2m
    return solve(denoise, z_t, schedule, ts)


# ------------------------------------------------------------------------- the loss terms


def lsgan_generator(scores: Array) -> Array:
    """½ (D(fake) − 1)² per example (eq. 4, L_adv)."""
    return 0.5 * jnp.mean(jnp.reshape((scores - 1.0) ** 2, (scores.shape[0], -1)), axis=1)


def lsgan_discriminator(real_scores: Array, fake_scores: Array) -> Array:
    """½ [(D(real) − 1)² + D(fake)²] per example (eq. 4, L_dis)."""
    flat = lambda a: jnp.reshape(a, (a.shape[0], -1))
    return 0.5 * (jnp.mean(flat(real_scores - 1.0) ** 2, axis=1) + jnp.mean(flat(fake_scores) ** 2, axis=1))


def dmd_surrogate(x_hat: Array, x_fake: Array, x_real: Array) -> Array:
    """Per-example surrogate whose gradient w.r.t. ``x_hat`` is DMD's (eq. 5):
    (x̂_fake − x̂_real) / mean|x̂ − x̂_real| per element (Yin et al.'s normalisation; the score
    difference s_student − s_teacher is (α/σ²)(x̂_student − x̂_teacher) at the re-noised point, and
    the normalisation absorbs the time's scale). Its value is ½ ‖grad‖², not a divergence."""
    axes = tuple(range(1, x_hat.ndim))
    norm = jnp.mean(jnp.abs(x_hat - x_real), axis=axes, keepdims=True)
    grad = jax.lax.stop_gradient((x_fake - x_real) / jnp.maximum(norm, 1e-6))
    target = jax.lax.stop_gradient(x_hat - grad)
    return 0.5 * jnp.sum((x_hat - target) ** 2, axis=axes) / (x_hat[0].size)


def renoise(x: Array, times: Array, rng: Array, schedule: Schedule) -> Array:
    eps = jax.random.normal(rng, x.shape, jnp.float32)
    return diffuse(x, eps, schedule.alpha(times), schedule.sigma(times))


def sample_adv_times(rng: Array, batch_size: int, cfg: FlashLossConfig) -> Array:
    """t' per example, uniform over ``adv_times``."""
    return jnp.asarray(cfg.adv_times, jnp.float32)[
        jax.random.randint(rng, (batch_size,), 0, len(cfg.adv_times))]


@dataclasses.dataclass(frozen=True)
class FlashLosses:
    """``generator(params, disc_params, batch, rng, progress) -> (loss, metrics)`` and
    ``discriminator(disc_params, params, batch, rng) -> (loss, metrics)``; pass both the same
    ``rng`` within a training step so the discriminator sees the student's sample of that step."""

    generator: Callable[..., tuple[Array, dict]]
    discriminator: Callable[..., tuple[Array, dict]]


def make_flash_losses(model_fn: ModelFn, teacher_fn: ConditionalTeacherFn, features_fn: FeaturesFn,
                      disc_fn: DiscriminatorFn, schedule: Schedule, prediction_type: str,
                      cfg: FlashLossConfig = FlashLossConfig(), *,
                      uncond_fn: Callable[[Any, Any], tuple[Any, Any]] | None = None) -> FlashLosses:
    """The Flash losses of a student ``model_fn(params, z, model_time, cond, context)`` (raw
    predictions of ``prediction_type``) and the frozen ``teacher_fn``. ``batch`` holds ``x`` and
    optionally ``cond`` and ``context``; ``uncond_fn(cond, context)`` gives the teacher's dropped
    condition, needed with guidance (``guidance_max > 0``). Guided, the student is guidance-aware:
    ``model_fn`` is w-conditioned (``diffusion.guidance.w_conditioned``) and reads
    ``{"cond": c, "w": w}`` with the w its targets were guided at."""
    check_prediction_type(prediction_type)
    if cfg.guided and uncond_fn is None:
        raise ValueError("guidance_max > 0 needs uncond_fn (the teacher's dropped condition)")

    def x_of(pred, z, t):
        return to_x_eps(pred.astype(jnp.float32), z, schedule.alpha(t), schedule.sigma(t), prediction_type)

    def teacher_denoiser(cond, context, w):
        return guided_denoiser(teacher_fn, schedule, prediction_type, cond, context,
                               w if cfg.guided else None, uncond_fn)

    def student_sample(params, x, cond, context, rng, progress):
        """(t, z_t, x̂ with gradient, w, the student's condition, the keys left for the losses).
        Guided, the student reads w (guidance-aware) and the targets are guided at the same w."""
        key_t, key_eps, key_rest = jax.random.split(rng, 3)
        key_w, *keys = jax.random.split(key_rest, 4)
        t = sample_timesteps(key_t, x.shape[0], cfg, progress)
        z_t = renoise(x, t, key_eps, schedule)
        w = sample_w(key_w, x.shape[0], cfg.guidance_min, cfg.guidance_max)
        student_cond = with_w(cond, w) if cfg.guided else cond
        x_hat, _ = x_of(model_fn(params, z_t, schedule.model_time(t), student_cond, context), z_t, t)
        return t, z_t, x_hat, w, student_cond, keys

    def disc_scores(disc_params, x0, key, context):
        key_t, key_eps = jax.random.split(key)
        t_adv = sample_adv_times(key_t, x0.shape[0], cfg)
        z = renoise(x0, t_adv, key_eps, schedule)
        return disc_fn(disc_params, features_fn(z, schedule.model_time(t_adv), context))

    def generator(params, disc_params, batch, rng, progress=0.0):
        x = batch["x"].astype(jnp.float32)
        cond, context = batch.get("cond"), batch.get("context")
        t, z_t, x_hat, w, student_cond, (key_adv, key_dmd_t, key_dmd_eps) = student_sample(
            params, x, cond, context, rng, progress)
        target = jax.lax.stop_gradient(teacher_solution(teacher_denoiser(cond, context, w), z_t, t,
                                                        schedule, cfg))
        distil = jnp.mean(distance(x_hat, target, "l2"))
        total, metrics = distil, {"distil": distil, "t": jnp.mean(t)}
        if cfg.adv_weight:
            # The discriminator's parameters are constants here: its own step updates them.
            adv = jnp.mean(lsgan_generator(disc_scores(jax.lax.stop_gradient(disc_params), x_hat,
                                                       key_adv, context)))
            total, metrics["adv"] = total + cfg.adv_weight * adv, adv
        if cfg.dmd_weight:
            t2 = jax.random.uniform(key_dmd_t, x.shape[:1], jnp.float32, cfg.dmd_t_min, 1.0)
            z2 = jax.lax.stop_gradient(renoise(x_hat, t2, key_dmd_eps, schedule))
            x_real, _ = teacher_denoiser(cond, context, w)(z2, t2)
            x_fake, _ = x_of(model_fn(jax.lax.stop_gradient(params), z2, schedule.model_time(t2),
                                      student_cond, context), z2, t2)
            dmd = jnp.mean(dmd_surrogate(x_hat, jax.lax.stop_gradient(x_fake), jax.lax.stop_gradient(x_real)))
            total, metrics["dmd"] = total + cfg.dmd_weight * dmd, dmd
        metrics["loss"] = total
        return total, metrics

    def discriminator(disc_params, params, batch, rng, progress=0.0):
        x = batch["x"].astype(jnp.float32)
        cond, context = batch.get("cond"), batch.get("context")
        _, _, x_hat, _, _, (key_adv, _, _) = student_sample(jax.lax.stop_gradient(params), x, cond,
                                                             context, rng, progress)
        key_real, key_fake = jax.random.split(key_adv)
        fake = disc_scores(disc_params, jax.lax.stop_gradient(x_hat), key_fake, context)
        real = disc_scores(disc_params, x, key_real, context)
        value = jnp.mean(lsgan_discriminator(real, fake))
        return value, {"disc_loss": value, "disc_real": jnp.mean(real), "disc_fake": jnp.mean(fake)}

    return FlashLosses(generator, discriminator)
