"""From a config to the conditional model the trainer distils: load the teacher (a diffusers
pipeline folder, hub id or the embedded demo teacher), adapt it (paper §4.1 / §4.4), and provide
the pure functions the train step needs (model call, VAE encode/decode, text encoding).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections

from codi_jax import diffusion, models
from codi_jax.diffusion import guidance
from codi_jax.config_lib import embedded_path
from codi_jax.models import adapters, lora
from codi_jax.models.unet import UNet2DConditionModel, UNetArch, has_cross_attention

Array = jax.Array


def resolve_pipeline(pretrained: str) -> str:
    """A local folder for ``pretrained``: ``embedded:<name>``, a folder, or a hub id (whose small
    files — model_index, scheduler, tokenizer — are fetched here; weights by ``models.load``)."""
    if pretrained.startswith("embedded:"):
        return embedded_path(pretrained.split(":", 1)[1])
    if os.path.isdir(pretrained):
        return pretrained
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(
            pretrained, allow_patterns=["model_index.json", "scheduler/*", "tokenizer/*"])
    except Exception as err:  # noqa: BLE001 — any hub failure means "pass a local folder".
        raise FileNotFoundError(
            f"model.pretrained: {pretrained!r} is not a local folder and could not be fetched from the "
            f"Hugging Face Hub ({type(err).__name__}); download it where there is network access and "
            "pass the local folder") from None


def _read_json(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass
class Teacher:
    """The pretrained pieces: UNet config/params, schedule, and the frozen VAE / text encoder."""

    unet_config: dict
    unet_params: Any
    schedule: diffusion.Schedule
    prediction_type: str
    root: Optional[str] = None
    vae: Any = None
    vae_params: Any = None
    text_encoder: Any = None
    text_params: Any = None
    tokenizer: Any = None

    @property
    def latent(self) -> bool:
        return self.vae is not None


def load_vae(path: str) -> tuple[Any, dict]:
    """The ``AutoencoderKL`` of ``path``: a pipeline folder (its ``vae/``), ``embedded:<name>``, or
    the VAE's own folder."""
    root = resolve_pipeline(path)
    folder = os.path.join(root, "vae") if os.path.isdir(os.path.join(root, "vae")) else root
    return models.load(folder, "vae")


def load_teacher(m: ml_collections.ConfigDict, rng: Array) -> Teacher:
    """Loads (or, with ``pretrained=""``, randomly initialises) the teacher of the model config
    ``m`` (a config's ``model`` section, ``config_lib.model_config``)."""
    if not m.pretrained:
        unet_config = m.unet_config.to_dict()
        unet = UNet2DConditionModel.from_config(unet_config)
        params = jax.jit(unet.init)(rng, *UNet2DConditionModel.dummy_inputs(unet_config))["params"]
        teacher = Teacher(unet_config, params, diffusion.get_schedule(m.schedule),
                          m.prediction_type or "v_prediction")
        if m.vae:  # a latent model trained from scratch in a pretrained VAE's space
            teacher.vae, teacher.vae_params = load_vae(m.vae)
        return teacher
    root = resolve_pipeline(m.pretrained)
    source = root if os.path.isdir(root) and os.path.exists(os.path.join(root, "unet")) else m.pretrained
    unet, unet_params = models.load(source, "unet")
    unet_config = models.module_config(unet, "unet")
    scheduler = _read_json(os.path.join(root, "scheduler", "scheduler_config.json"))
    schedule = (diffusion.schedule_from_scheduler_config(scheduler) if scheduler
                else diffusion.get_schedule(m.schedule))
    prediction_type = m.prediction_type or (scheduler or {}).get("prediction_type", "epsilon")
    teacher = Teacher(unet_config, unet_params, schedule, prediction_type, root=root)
    if os.path.isdir(os.path.join(root, "vae")):
        teacher.vae, teacher.vae_params = models.load(root, "vae")
    if has_cross_attention(UNetArch.from_config(unet_config)):
        from codi_jax.models import clip

        teacher.text_encoder, teacher.text_params = models.load(root, "text_encoder")
        teacher.tokenizer = clip.load_tokenizer(os.path.join(root, "tokenizer"))
    if m.init == "random":  # §5.1 ablation: same architecture, no pretrained weights.
        unet = UNet2DConditionModel.from_config(unet_config)
        teacher.unet_params = jax.jit(unet.init)(rng, *UNet2DConditionModel.dummy_inputs(unet_config))["params"]
    elif m.init != "pretrained":
        raise ValueError(f"model.init: unknown value {m.init!r}; known: ['pretrained', 'random']")
    return teacher


def adapted_config(m: ml_collections.ConfigDict, teacher: Teacher, cond_channels: int) -> dict:
    """The ``ConditionedUNet`` config for the data's condition and the model config's switches."""
    if m.cond_input not in ("latent", "pixel"):
        raise ValueError(f"model.cond_input: unknown value {m.cond_input!r}; known: ['latent', 'pixel']")
    latent_cond = teacher.latent and m.cond_input == "latent"
    if latent_cond:
        # The image part of c goes through the VAE; extra channels (an inpainting mask) are resized.
        latent_channels = teacher.unet_config.get("in_channels", 4)
        cond_channels = latent_channels + max(cond_channels - 3, 0)
    return {
        "unet": teacher.unet_config,
        "adapter": m.adapter,
        "cond_channels": cond_channels,
        "cond_embedding_channels": (tuple(m.hint_channels) if teacher.latent and not latent_cond
                                    else None),
        "per_level_mu": m.per_level_mu,
        "mu_knots": m.mu_knots,
    }


def module_options(m: ml_collections.ConfigDict) -> dict:
    return {"remat": m.remat or None, "attention_implementation": m.attention or None}


@dataclasses.dataclass
class Student:
    """The adapted conditional model and the pure functions around it."""

    module: adapters.ConditionedUNet
    config: dict
    teacher: Teacher
    text_layer: str = "last"
    prompt: str = ""  # text-to-image teachers: the prompt of every example without its own text
    # Guidance-aware (distilled with CFG targets): the model reads the guidance weight w through
    # ``params["w_embed"]`` (diffusion/guidance.py); ``guidance`` is the w it samples with when the
    # condition carries none.
    guidance_input: bool = False
    guidance: float = 0.0

    def model_fn(self, params: Any, z: Array, model_time: Array, cond: Any, context: Any) -> Array:
        """The model as every loss and sampler calls it; a guidance-aware one takes
        ``cond = {"cond": c, "w": w}``, or a plain c, sampled at its own ``guidance``."""
        if not self.guidance_input:
            return self.conditional_fn(params, z, model_time, cond, context)
        if not isinstance(cond, Mapping):
            cond = guidance.with_w(cond, jnp.full(z.shape[:1], self.guidance, jnp.float32))
        return guidance.w_conditioned(self.conditional_fn)(params, z, model_time, cond, context)

    def conditional_fn(self, params: Any, z: Array, model_time: Array, cond: Any, context: Any) -> Array:
        """The adapted model without the guidance input (the conditional teacher's function)."""
        # LoRA factors, if any, are folded into their kernels here (inside the differentiated
        # function, so their gradients flow through W + A·B).
        return self.module.apply({"params": lora.merge(params)}, z, model_time, cond, context)

    def encode_images(self, aux: dict, images: Array, rng: Optional[Array]) -> Array:
        """Pixels in [−1, 1] → the model's data space (scaled VAE latents, or pixels as they are)."""
        if not self.teacher.latent:
            return images
        vae = self.teacher.vae
        dist = vae.apply({"params": aux["vae"]}, images, method=vae.encode)
        z = dist.mode() if rng is None else dist.sample(rng)
        return z * vae.scaling_factor

    def decode(self, aux: dict, x: Array) -> Array:
        if not self.teacher.latent:
            return x
        vae = self.teacher.vae
        return vae.apply({"params": aux["vae"]}, x / vae.scaling_factor, method=vae.decode)

    def encode_cond(self, aux: dict, cond: Array) -> Array:
        """The condition (pixels in [−1, 1], extra channels after RGB) as the model reads it."""
        if not self.teacher.latent:
            return cond
        if self.config["cond_embedding_channels"] is not None:
            # A hint stem reads [0, 1] pixels, as diffusers' ControlNet pipelines pass the control
            # image: a PE-CoDi export then runs in StableDiffusionControlNetPipeline unchanged.
            return (cond + 1.0) / 2.0
        latent = self.encode_images(aux, cond[..., :3], None)
        if cond.shape[-1] == 3:
            return latent
        extra = jax.image.resize(cond[..., 3:], latent.shape[:3] + (cond.shape[-1] - 3,), "linear")
        return jnp.concatenate([latent, extra.astype(latent.dtype)], axis=-1)

    def context(self, aux: dict, tokens: Optional[Array]) -> Optional[Array]:
        if self.teacher.text_encoder is None:
            return None
        enc = self.teacher.text_encoder
        layer = 1 if self.text_layer == "penultimate" else 0
        return enc.apply({"params": aux["text"]}, tokens, None, layer, method=enc.encode_prompt)

    def aux_params(self) -> dict:
        """Frozen parameters the step needs besides the student's (VAE, text encoder)."""
        aux = {}
        if self.teacher.latent:
            aux["vae"] = self.teacher.vae_params
        if self.teacher.text_encoder is not None:
            aux["text"] = self.teacher.text_params
        return aux

    def prepare(self, aux: dict, batch: dict, rng: Array) -> dict:
        """A data batch → the loss's batch ``{x, cond, context, image}`` (all frozen, no gradient;
        ``image``, the pictures themselves, for the CG term against them, ``cg_distance=image_l2``)."""
        # An unadapted model (teacher pretraining) reads no condition: skip its VAE encoding.
        cond = None if self.config["adapter"] == "none" else self.encode_cond(aux, batch["cond"])
        out = {"x": self.encode_images(aux, batch["image"], rng),
               "cond": cond,
               "context": self.context(aux, batch.get("text")),
               "image": batch["image"]}
        return jax.lax.stop_gradient(out)

    def with_prompt(self, batch: dict) -> dict:
        """A data batch with ``prompt``'s tokens as ``text`` when the teacher reads text and the
        batch has none of its own (the edit task's instructions are tokenized by the data)."""
        if self.teacher.tokenizer is None or "text" in batch:
            return batch
        from codi_jax.models import clip

        ids, _ = clip.tokenize(self.teacher.tokenizer, [self.prompt] * len(batch["image"]))
        return dict(batch, text=ids)

    def teacher_fn(self, params: Any) -> Callable[[Array, Array, Any], Array]:
        """The frozen unconditional teacher (the online params' UNet at init) as ``teacher(z, t, ctx)``."""
        unet = self.module.unet
        return lambda z, model_time, context: unet.apply({"params": params}, z, model_time, context)


def make_student(m: ml_collections.ConfigDict, teacher: Teacher, config: dict) -> Student:
    """The ``Student`` of the model config ``m`` for an adapted-model ``config`` (see
    ``adapted_config``)."""
    module = adapters.ConditionedUNet.from_config(config, jnp.dtype(m.dtype), **module_options(m))
    return Student(module, config, teacher, text_layer=m.text_layer, prompt=m.prompt,
                   guidance_input=bool(m.guidance_input), guidance=float(m.guidance))


def with_guidance_input(student: Student, params: dict, w: float) -> tuple[Student, dict]:
    """``student`` made guidance-aware (sampling at ``w``), its params given the zero-initialised w
    embedding: it computes what it did, for every w, until the embedding learns."""
    if guidance.W_EMBED not in params:
        params = guidance.init_w_conditioned(params, int(student.config["cond_channels"]))
    return dataclasses.replace(student, guidance_input=True, guidance=float(w)), params


def build_student(m: ml_collections.ConfigDict, teacher: Teacher, cond_channels: int,
                  rng: Array) -> tuple[Student, dict]:
    """The adapted model and its initial params (the teacher's function at μ = 0 / zero convs)."""
    config = adapted_config(m, teacher, cond_channels)
    params = adapters.init_adapted_params(config, teacher.unet_params, rng)
    return make_student(m, teacher, config), params
