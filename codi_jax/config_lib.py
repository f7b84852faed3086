"""Building blocks of the ``configs/*.py`` files: every trainer option with its default.

The config files under ``configs/`` call these and set what their recipe changes; the docstring of
each says where a default comes from. The objectives' sections are built from their config
dataclasses, so every default is stated once.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from typing import Any, Callable

import ml_collections
from flax import traverse_util

from codi_jax.data.config import default_config as data_default_config
from codi_jax.distill import CMLossConfig, CoDiLossConfig, FlashLossConfig, ProgressiveLossConfig

# The pixel-space teacher shipped inside the package (configs/pretrain.py:pixel on the demo
# crops); kept for tests and as the pixel-space example.
DEMO_TEACHER = "embedded:demo_teacher"
# The miniature Stable Diffusion shipped inside the package: MINI_VAE (configs/pretrain_vae.py)
# and the latent MINI_UNET (configs/pretrain.py) on the embedded pictures. The default teacher.
MINI_SD = "embedded:mini_sd"
EMBEDDED_TEACHER = MINI_SD

# The pixel-space UNet of the demo teacher: 3 levels, no attention, ~2 M parameters.
DEMO_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "mid_block_type": None,
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    # Unused (no attention blocks), but diffusers' PyTorch class needs an int to build the model.
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}

# The miniature SD autoencoder: diffusers AutoencoderKL, 4 latent channels, downsampling 4
# (3 levels), mid-block attention like SD's. scaling_factor is measured after training. GroupNorm
# groups of 4 channels: with 2 per group the decoder cannot make flat saturated colours (the
# mini_sd README's probes).
MINI_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 1.0,
}

# The miniature SD latent UNet: SD's block structure (a ResNet level, then self-attention levels
# and an attention mid block) at 3 levels. Unconditional: no text encoder, so the transformer
# blocks self-attend only (cross_attention_dim None; diffusers' PyTorch class cannot build such a
# UNet, the JAX port can, and every CoDi code path is the SD one otherwise).
MINI_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "cross_attention_dim": None,
    "attention_head_dim": 4,
}


def embedded_path(name: str) -> str:
    """Folder of an asset shipped in ``codi_jax/assets`` (``embedded:<name>`` in configs)."""
    return os.path.join(os.path.dirname(__file__), "assets", name)


def switches_config(switches: Any) -> ml_collections.ConfigDict:
    """A config section holding every field of an objective's config dataclass (``Switches``)."""
    return ml_collections.ConfigDict(dataclasses.asdict(switches))


def model_config() -> ml_collections.ConfigDict:
    """The ``model`` section of every config: which teacher, how it is adapted and computed. Also
    what ``export.load_exported`` builds a saved model from."""
    m = ml_collections.ConfigDict()
    m.pretrained = EMBEDDED_TEACHER  # diffusers pipeline folder, hub id or embedded:<name>
    m.unet_config = ml_collections.ConfigDict(MINI_UNET)  # used when pretrained is ""
    # A VAE (folder or embedded:<name>) for a teacher built from unet_config (pretrained ""):
    # latent pretraining; with objective "autoencoder", the trained VAE to fine-tune. With
    # pretrained set, the pipeline's own vae/ is used.
    m.vae = ""
    m.vae_config = ml_collections.ConfigDict(MINI_VAE)  # objective "autoencoder"
    m.init = "pretrained"           # pretrained | random (the §5.1 "random init" ablation)
    m.adapter = "cond_encoder"      # cond_encoder (full CoDi) | controlnet (PE-CoDi) | none
    m.trainable = "all"             # all (CoDi) | adapter (PE-CoDi: UNet frozen)
    m.per_level_mu = False          # one μ (eq. 10) per blend point instead of one global μ
    # 1: μ is the paper's learned constant; K > 1: μ(t) piecewise linear on K knots over t ∈ [0, 1]
    # (see models/adapters.py: a constant μ must trade low noise against t ≈ 1).
    m.mu_knots = 1
    # How the condition enters a latent model: "latent" (VAE-encoded, same size as z_t) or "pixel"
    # (a learned hint stem downsamples the image, as ControlNet does). Pixel-space models: "latent".
    m.cond_input = "latent"
    m.hint_channels = (16, 32, 96, 256)  # hint stem of cond_input="pixel" (ControlNet's)
    m.prediction_type = ""          # "" = from the teacher's scheduler config
    m.schedule = "scaled_linear"    # used when the teacher has no scheduler config
    m.dtype = "float32"             # compute dtype; params stay float32 (bfloat16 on TPU)
    m.remat = ""                    # "" = off, else a jax.checkpoint_policies name
    m.attention = ""                # "" = XLA default, "cudnn" on GPUs
    m.prompt = ""                   # text-to-image teachers: prompt for every example
    m.text_layer = "last"           # last | penultimate (SD 2.x)
    # cm | gd | flash: the export/ folder of a conditional teacher fine-tuned with objective=diffusion
    # (the `finetune` preset). The student starts from it; model.pretrained is then unused.
    m.conditional_teacher = ""
    # LoRA (models/lora.py): rank r > 0 adds factors A·B beside the attention projections (and,
    # with lora_convs, the convolutions) of lora_modules; only they and the adapter's new weights
    # (μ, zero convs, hint stems) train. 0 = off.
    m.lora_rank = 0
    m.lora_convs = False
    m.lora_modules = ("unet", "adapter")
    # Guidance-aware distillation (preset ``guided``): the student reads the guidance weight w
    # (diffusion/guidance.py), trained on CFG targets at w ~ U[distill | flash.guidance_min, _max];
    # ``guidance`` is the w it is evaluated and exported to sample with (diffusers' scale 1 + w).
    m.guidance_input = False
    m.guidance = 0.0
    return m


def model_grid(cfg: ml_collections.ConfigDict) -> int:
    """The time grid a distilled model samples on: CoDi's teacher grid, or Flash's K."""
    return cfg.flash.num_timesteps if cfg.objective == "flash" else cfg.distill.grid


def base_config(task: str = "sr") -> ml_collections.ConfigDict:
    """Defaults shared by every recipe: the embedded tiny CoDi distillation on the demo data."""
    c = ml_collections.ConfigDict()
    # The training randomness (new parameters' initialisation, t and noise draws); the data order
    # and degradations (data.seed) and the evaluation's noise (eval.seed) have seeds of their own,
    # so that runs with different training seeds see the same batches and are scored alike.
    c.seed = 0
    c.mode = "train"            # train | eval | export (see main.py)
    # codi (Algorithm 1) | diffusion (pretrain / fine-tune teachers) | cm | gd (the baselines,
    # distilled from a fine-tuned conditional teacher, model.conditional_teacher) | autoencoder
    # (pretrain the VAE of model.vae_config, see codi_jax/autoencoder.py)
    c.objective = "codi"

    c.model = model_config()

    # The objectives' switches: the defaults of their config dataclasses (the paper's and the
    # baselines' choices, documented there). The embedded runs draw t per example: a few hundred
    # steps with one t per batch would visit each of the 20 grid levels (t = 1, the 1-step
    # sampler's, included) some 20 times. The SD presets keep the paper's single t per batch;
    # §5.1's ablation compares the two.
    c.distill = switches_config(CoDiLossConfig(timestep_sampling="sample"))
    c.cm = switches_config(CMLossConfig())            # consistency distillation (Song et al. 2023)
    # Progressive distillation: rounds teacher_steps → /2 → … → target_steps, train.num_steps
    # split evenly over the rounds.
    c.gd = switches_config(ProgressiveLossConfig())
    # Flash Diffusion (Chadebec et al. 2024): K-grid timestep mixture, teacher ODE target, LSGAN
    # head on the teacher's encoder, DMD; see distill/flash.py for the choices the paper leaves open.
    c.flash = switches_config(FlashLossConfig())

    c.data = data_default_config(task)
    # The embedded pictures, held out by picture, with the augmentations that keep a small set
    # of pictures from being memorised.
    c.data.source = "embedded"
    c.data.image_size = 64
    c.data.augment.rot90 = True
    c.data.augment.scale_range = (0.5, 1.0)
    c.data.augment.color_jitter = 0.1

    # Objective "autoencoder": LDM's reconstruction terms and KL weight (see autoencoder.py), and
    # what trains: "all", or "decoder" (the encoder frozen, so its latent space, and every model
    # trained in it, stays valid). It starts from model.vae when set, else from random weights
    # drawn as flax does ("flax") or as PyTorch does ("torch", see models/torch_init.py).
    # lowpass_weight: an extra L2 term between 8x8 average-pooled input and reconstruction (the
    # crop's local mean colours; 0 = off).
    c.autoencoder = ml_collections.ConfigDict(dict(l1_weight=1.0, l2_weight=1.0, kl_weight=1e-6,
                                                   lowpass_weight=0.0, init="flax", trainable="all"))

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16               # global batch
    c.train.num_steps = 400
    c.train.lr = 2e-4
    c.train.lr_schedule = "constant"      # constant | cosine (both after linear warmup)
    c.train.warmup_steps = 20
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0               # global-norm clip; 0 = off
    c.train.grad_accum = 1                # micro-batches per step (the batch is split)
    c.train.ema_decay = 0.95              # CoDi's / CM's consistency target θ⁻ (Algorithm 1)
    # The evaluation EMA of every objective: what is evaluated and exported (online weights are
    # reported beside it). Separate from θ⁻, whose decay is the paper's.
    c.train.eval_ema_decay = 0.999
    c.train.mu_lr_scale = 50.0            # step-size multiplier of μ (eq. 10), see train.py
    c.train.log_every = 25                # also the interval of the images/s and MFU figures
    # Peak bf16 FLOP/s of one chip for the logged MFU; 0 = from the device kind
    # (codi_jax/throughput.py's table; a chip not in it, a CPU, gets no MFU).
    c.train.peak_flops_per_chip = 0.0
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                      # -1 fills the devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.min_shard_size = 2**14         # smaller parameters are replicated

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0                      # evaluate during training every this many steps (0 = end only)
    c.eval.seed = 0                       # the initial noise of every sample (same for every sampler)
    # Held-out splits, each reported on its own; () = data.eval_split alone. The embedded source's:
    # its held-out natural pictures, then its held-out procedural ones.
    c.eval.splits = ("eval", "eval_procedural")
    c.eval.online = True                  # also evaluate the online weights at the end (first split)
    c.eval.steps = (1, 2, 4, 8)
    c.eval.batch_size = 16                # global batch, split over the processes as train.batch_size
    c.eval.num_examples = 64
    c.eval.grid_examples = 8
    c.eval.samplers = ("codi",)           # codi | ddim | dpmpp | stochastic | cm | cm_ddim | renoise: sampling.py
    # SR: also score every output after the wavelet colour fix of diffusion SR pipelines (its low
    # frequencies from the bicubic input; color_fix.py), as "<sampler>+colorfix" beside the raw one.
    c.eval.color_fix = True
    # Distribution metrics over the whole eval set: multi-scale SWD (no network needed) always;
    # FID / LPIPS / DISTS only with the user's weight files (see codi_jax/metrics), or "auto" (the
    # standard files, fetched once and cached: codi_jax/metrics/fetch.py), else "not computed".
    c.eval.swd = True
    c.eval.fid_weights = ""               # Inception-v3 (pt_inception / torchvision) weight file
    c.eval.lpips_weights = ""             # LPIPS backbone + linear-head files, comma-separated
    c.eval.lpips_net = "alex"             # alex | vgg
    c.eval.dists_weights = ""             # DISTS: VGG16 + alpha/beta files, comma-separated

    c.export = True
    return c


def make_minimal(c: ml_collections.ConfigDict, num_steps: int = 30) -> ml_collections.ConfigDict:
    """The small-run overrides every ``minimal`` preset shares (end-to-end tests): tens of steps,
    a small batch, a small eval and small embedded splits."""
    c.train.num_steps = num_steps
    c.data.image_size = 32
    c.train.warmup_steps = 2
    c.train.batch_size = 8
    c.train.log_every = 10
    c.train.checkpoint_every = 10
    c.eval.num_examples = 8
    c.eval.batch_size = 8
    c.eval.grid_examples = 4
    # One compile per step count dominates a small run's evaluation: the 1-step and a multi-step
    # sampler are enough to exercise it.
    c.eval.steps = (1, 4)
    c.data.embedded.natural_repeats = 2
    c.data.embedded.procedural_train = 16
    c.data.embedded.eval_crops_per_image = 2
    c.data.embedded.procedural_eval = 8
    return c


def _pe(c: ml_collections.ConfigDict) -> None:
    c.model.adapter = "controlnet"
    c.model.trainable = "adapter"


def _finetune(c: ml_collections.ConfigDict) -> None:
    c.objective = "diffusion"
    c.eval.samplers = ("ddim", "dpmpp")
    c.eval.steps = (1, 2, 4, 8, 50, 200)


def _cm(c: ml_collections.ConfigDict) -> None:
    c.objective = "cm"
    c.eval.samplers = ("cm",)


def _flash(c: ml_collections.ConfigDict) -> None:
    c.objective = "flash"
    # Its multistep sampler (re-noising between steps on the K grid), at the paper's 1, 2, 4 steps.
    c.eval.samplers = ("renoise",)
    c.eval.steps = (1, 2, 4)


def _flash_lora(c: ml_collections.ConfigDict) -> None:
    """The paper's setting: Flash with the student's weights frozen and rank-r LoRA factors
    trained (UNet and adapter attention projections; the paper's SD1.5 LoRA has rank 64)."""
    _flash(c)
    c.model.lora_rank = 8


def _guided(c: ml_collections.ConfigDict) -> None:
    """Guidance-aware CoDi / Flash: CFG targets at w ~ U[0, 8] (diffusers' scale 1-9, the range SD
    is used in), the student reads w and samples at w = 6.5 (diffusers' default scale 7.5) in one
    evaluation per step; ``--config.model.guidance`` picks the evaluation's w, ``predict
    --guidance`` another. CoDi's unconditional branch is the frozen pretrained teacher with the
    empty prompt (a teacher without text: itself, so guidance pushes away from the prior,
    condition and all); Flash's drops the prompt, so it needs a teacher that reads text."""
    c.model.guidance_input = True
    c.model.guidance = 6.5
    for section in (c.distill, c.flash):
        section.guidance_min, section.guidance_max = 0.0, 8.0


def _gd(c: ml_collections.ConfigDict) -> None:
    c.objective = "gd"
    # The deterministic (DDIM) and the stochastic N-step sampler of Meng et al. §3.3.
    c.eval.samplers = ("ddim", "stochastic")


# The method and run-size presets, in the order they are applied whatever the order they are
# named in (after the task config's recipes, e.g. configs/stable_diffusion.py): the method,
# then the run size (so ``minimal`` shrinks whatever came before).
Preset = Callable[[ml_collections.ConfigDict], Any]
PRESETS: dict[str, Preset] = {
    "pe": _pe,
    "finetune": _finetune,
    "cm": _cm,
    "gd": _gd,
    "flash": _flash,
    "flash_lora": _flash_lora,
    "guided": _guided,
    "minimal": make_minimal,
}
# Presets that set the same thing: at most one of each group (and at most one recipe).
EXCLUSIVE_PRESETS = (("finetune", "cm", "gd", "flash", "flash_lora"),)


def config_module(config_file: str, name: str) -> Any:
    """The module ``<name>.py`` beside the config file ``config_file`` (a task config's
    ``__file__``): config files are loaded by path, not imported as a package, so this is how
    they share a recipe (``configs/stable_diffusion.py``)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config: no {name}.py beside {config_file}")
    spec = importlib.util.spec_from_file_location(f"codi_jax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_top_level(text: str) -> list[str]:
    """Splits at the commas outside brackets, so ``eval.steps=(1,4)`` stays one item."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def _known_presets(recipes: dict[str, Preset] | None) -> dict[str, Preset]:
    """The task config's recipes, then ``PRESETS``: every name an arg may use, in the order
    they are applied."""
    return {**(recipes or {}), **PRESETS}


def parse_arg(arg: str | None, recipes: dict[str, Preset] | None = None) -> tuple[list[str], dict[str, Any]]:
    """``"sd15,pe,train.lr=1e-5"`` → (presets in application order, {dotted key: value}).

    ``recipes``: the task config's recipes (e.g. ``sd15``), applied before ``PRESETS``.
    Values are Python literals where they parse as one (numbers, booleans, tuples), else strings.
    """
    known = _known_presets(recipes)
    presets, overrides = [], {}
    for item in filter(None, (part.strip() for part in _split_top_level(arg or ""))):
        if "=" in item:
            key, value = item.split("=", 1)
            try:
                overrides[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                overrides[key.strip()] = value.strip()
        elif item in known:
            presets.append(item)
        else:
            raise ValueError(f"config: unknown preset {item!r}; known: {list(known)} (or key=value)")
    for group in EXCLUSIVE_PRESETS + (tuple(recipes or ()),):
        chosen = [p for p in group if p in presets]
        if len(chosen) > 1:
            raise ValueError(f"config: presets {chosen} exclude each other; pick one of {list(group)}")
    return sorted(set(presets), key=list(known).index), overrides


def task_config(task: str, arg: str | None = None, recipes: dict[str, Preset] | None = None,
                default: Preset | None = None) -> ml_collections.ConfigDict:
    """The embedded CoDi setup of ``task`` with the presets and overrides of ``arg``
    (``configs/<task>.py:<arg>``; comma-separated, e.g. ``sd15,pe`` or ``finetune,minimal``):

    * ``default`` — the task's own run when ``arg`` names no preset (``key=value`` overrides
      aside), e.g. the SR config's ten-minute recipe; any named preset starts from the shared
      ``base_config`` instead, so the methods' presets never inherit one task's tuning;
    * ``recipes`` — the task config's recipes, e.g. ``sd15`` / ``sd21`` of
      ``configs/stable_diffusion.py`` (at most one);
    * ``pe`` — PE-CoDi: ControlNet adapter, UNet frozen;
    * ``finetune`` — the baselines' conditional teacher: the adapted model trained with the
      diffusion loss, sampled with DDIM / DPM-Solver++ up to 200 steps;
    * ``cm`` / ``gd`` — consistency / progressive distillation of that teacher (pass
      ``--config.model.conditional_teacher=<its workdir>/export``);
    * ``flash`` / ``flash_lora`` — Flash Diffusion of that teacher, all weights / rank-8 LoRA;
    * ``minimal`` — tens of steps and a small eval (the end-to-end tests);
    * ``key=value`` — any config field (``train.lr=1e-5``), applied after the presets.
    """
    c = base_config(task)
    presets, overrides = parse_arg(arg, recipes)
    if default is not None and not presets:
        default(c)
    known = _known_presets(recipes)
    for name in presets:
        known[name](c)
    flat = set(traverse_util.flatten_dict(c.to_dict(), sep="."))
    unknown = sorted(k for k in overrides if k not in flat)
    if unknown:
        raise ValueError(f"config: unknown keys {unknown} in {arg!r}")
    c.update_from_flattened_dict(overrides)
    return c
