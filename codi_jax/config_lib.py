"""Building blocks of the ``configs/*.py`` files: every trainer option with its default.

The config files under ``configs/`` call these and set what their recipe changes; the docstring of
each says where a default comes from. Kept free of JAX/TensorFlow imports so configs load fast.
"""

from __future__ import annotations

import os

import ml_collections

from codi_jax.data.config import default_config as data_default_config

# The teacher shipped inside the package (trained by configs/pretrain.py on the demo data).
EMBEDDED_TEACHER = "embedded:demo_teacher"

# The pixel-space UNet of the embedded teacher: 3 levels, no attention, ~2 M parameters.
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


def embedded_path(name: str) -> str:
    """Folder of an asset shipped in ``codi_jax/assets`` (``embedded:<name>`` in configs)."""
    return os.path.join(os.path.dirname(__file__), "assets", name)


def base_config(task: str = "sr") -> ml_collections.ConfigDict:
    """Defaults shared by every recipe: the embedded tiny CoDi distillation on the demo data."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.mode = "train"            # train | eval
    # codi (Algorithm 1) | diffusion (pretrain / fine-tune teachers) | cm | gd (the baselines,
    # distilled from a fine-tuned conditional teacher, model.conditional_teacher)
    c.objective = "codi"

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = EMBEDDED_TEACHER  # diffusers pipeline folder, hub id or embedded:<name>
    c.model.unet_config = ml_collections.ConfigDict(DEMO_UNET)  # used when pretrained is ""
    c.model.init = "pretrained"           # pretrained | random (the §5.1 "random init" ablation)
    c.model.adapter = "cond_encoder"      # cond_encoder (full CoDi) | controlnet (PE-CoDi) | none
    c.model.trainable = "all"             # all (CoDi) | adapter (PE-CoDi: UNet frozen)
    c.model.per_level_mu = False
    # How the condition enters a latent model: "latent" (VAE-encoded, same size as z_t) or "pixel"
    # (a learned hint stem downsamples the image, as ControlNet does). Pixel-space models: "latent".
    c.model.cond_input = "latent"
    c.model.hint_channels = (16, 32, 96, 256)  # hint stem of cond_input="pixel" (ControlNet's)
    c.model.prediction_type = ""          # "" = from the teacher's scheduler config
    c.model.schedule = "scaled_linear"    # used when the teacher has no scheduler config
    c.model.dtype = "float32"             # compute dtype; params stay float32 (bfloat16 on TPU)
    c.model.remat = ""                    # "" = off, else a jax.checkpoint_policies name
    c.model.attention = ""                # "" = XLA default, "cudnn" on GPUs
    c.model.prompt = ""                   # text-to-image teachers: prompt for every example
    c.model.text_layer = "last"           # last | penultimate (SD 2.x)
    # cm | gd: the export/ folder of a conditional teacher fine-tuned with objective=diffusion
    # (the `finetune` preset). The student starts from it; model.pretrained is then unused.
    c.model.conditional_teacher = ""

    c.distill = ml_collections.ConfigDict(dict(
        grid=20, timestep_sampling="batch", predictor="prev", consistency_space="eps",
        distance="l2", huber_c=1e-3, snr_weighting="none", snr_gamma=5.0,
        boundary_scalings=False, boundary_sigma_data=0.5, boundary_timestep_scaling=10.0,
        cg_weight=1.0, cg_distance="latent_l2"))

    # Consistency distillation (distill/consistency.py): Song et al. 2023's defaults, CoDi's grid.
    c.cm = ml_collections.ConfigDict(dict(
        grid=20, timestep_sampling="sample", distance="l2", huber_c=1e-3, weighting="uniform",
        boundary_sigma_data=0.5, boundary_timestep_scaling=10.0))
    # Progressive distillation (distill/progressive.py): rounds teacher_steps → /2 → … →
    # target_steps, train.num_steps split evenly over the rounds.
    c.gd = ml_collections.ConfigDict(dict(
        teacher_steps=32, target_steps=4, timestep_sampling="sample", weighting="truncated_snr"))

    c.data = data_default_config(task)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 16               # global batch
    c.train.num_steps = 600
    c.train.lr = 2e-4
    c.train.lr_schedule = "constant"      # constant | cosine (both after linear warmup)
    c.train.warmup_steps = 20
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0               # global-norm clip; 0 = off
    c.train.grad_accum = 1                # micro-batches per step (the batch is split)
    c.train.ema_decay = 0.95              # CoDi's target network θ⁻ (Algorithm 1)
    c.train.mu_lr_scale = 50.0            # step-size multiplier of μ (eq. 10), see train.py
    c.train.log_every = 25
    c.train.checkpoint_every = 200
    c.train.keep_checkpoints = 3
    c.train.sample_every = 0              # 0 = only at the end

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                      # -1 fills the devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.min_shard_size = 2**14         # smaller parameters are replicated

    c.eval = ml_collections.ConfigDict()
    c.eval.steps = (1, 2, 4, 8)
    c.eval.batch_size = 16
    c.eval.num_examples = 64
    c.eval.grid_examples = 8
    c.eval.samplers = ("codi",)           # codi | ddim | dpmpp | cm | stochastic, see evaluate.py
    # Distribution metrics over the whole eval set: multi-scale SWD (no network needed) always;
    # FID / LPIPS only with the user's weight files (see codi_jax/metrics), else "not computed".
    c.eval.swd = True
    c.eval.fid_weights = ""               # Inception-v3 (pt_inception / torchvision) weight file
    c.eval.lpips_weights = ""             # LPIPS backbone + linear-head files, comma-separated
    c.eval.lpips_net = "alex"             # alex | vgg

    c.export = True
    return c


PRESETS = ("minimal", "pe", "finetune", "cm", "gd", "sd15", "sd21")


def task_config(task: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The embedded CoDi setup of ``task``, or one of its ``PRESETS``: ``minimal`` (tens of steps
    and a small eval: the end-to-end test), ``pe`` (PE-CoDi: ControlNet adapter, UNet frozen),
    ``finetune`` (the baselines' conditional teacher: the adapted model trained with the diffusion
    loss, sampled with DDIM / DPM-Solver++ up to 200 steps), ``cm`` / ``gd`` (consistency /
    progressive distillation of that teacher: pass ``--config.model.conditional_teacher=<its
    workdir>/export``), ``sd15`` / ``sd21`` (Stable Diffusion recipes)."""
    c = base_config(task)
    if arg in (None, ""):
        return c
    if arg == "minimal":
        c.train.num_steps = 30
        c.train.warmup_steps = 2
        c.train.batch_size = 8
        c.train.log_every = 10
        c.train.checkpoint_every = 10
        c.eval.num_examples = 8
        c.eval.batch_size = 8
        c.eval.grid_examples = 4
        return c
    if arg == "pe":
        c.model.adapter = "controlnet"
        c.model.trainable = "adapter"
        return c
    if arg == "finetune":
        c.objective = "diffusion"
        # Evaluated with its EMA; 0.99 averages over the last ~100 steps of a short run.
        c.train.ema_decay = 0.99
        c.eval.samplers = ("ddim", "dpmpp")
        c.eval.steps = (1, 2, 4, 8, 50, 200)
        return c
    if arg == "cm":
        c.objective = "cm"
        c.eval.samplers = ("cm",)
        return c
    if arg == "gd":
        c.objective = "gd"
        # The deterministic (DDIM) and the stochastic N-step sampler of Meng et al. §3.3.
        c.eval.samplers = ("ddim", "stochastic")
        return c
    if arg not in PRESETS:
        raise ValueError(f"config: unknown preset {arg!r}; known: {list(PRESETS)}")
    return apply_stable_diffusion(c, arg)


def apply_stable_diffusion(c: ml_collections.ConfigDict, version: str) -> ml_collections.ConfigDict:
    """Switches ``c`` to a Stable Diffusion recipe (``sd15`` or ``sd21``).

    Defaults follow the paper (§5; teacher grid, single t per batch, PREv, latent-l2 CG) and the
    public CoDi recipe: AdamW lr 8e-6, EMA 0.99995, grid N = 20, bf16 compute.
    """
    repos = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
             "sd21": "stabilityai/stable-diffusion-2-1"}
    if version not in repos:
        raise ValueError(f"config: unknown Stable Diffusion preset {version!r}; known: {sorted(repos)}")
    c.model.pretrained = repos[version]
    c.model.dtype = "bfloat16"
    c.model.remat = "nothing_saveable"
    # SD 2.x checkpoints already drop the last OpenCLIP layer: "last" is what the pipeline uses.
    c.model.text_layer = "last"
    c.model.cond_input = "latent"
    c.data.image_size = 512 if version == "sd15" else 768
    c.train.lr = 8e-6
    c.train.ema_decay = 0.99995
    c.train.mu_lr_scale = 1.0
    c.train.batch_size = 64
    c.train.num_steps = 100_000
    c.train.warmup_steps = 1000
    c.train.weight_decay = 1e-2
    c.train.log_every = 100
    c.train.checkpoint_every = 2000
    c.train.sample_every = 5000
    c.eval.batch_size = 8
    c.eval.num_examples = 256
    c.mesh.fsdp = 8
    return c
