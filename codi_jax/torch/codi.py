"""A codi_jax export in PyTorch: the full-CoDi UNet (:class:`CoDiUNet`) and CoDi's few-step
sampler for either adapter (:class:`CoDiPipeline`), built from diffusers' modules.

The arithmetic follows the JAX code it ports: the blend of eq. 10 in ``codi_jax/models/unet.py``,
the conditional encoder of ``codi_jax/models/adapters.py``, the condition encoding of
``modeling.Student.encode_cond`` and the sampler of ``diffusion.codi_sample`` (DDIM on the
teacher grid; t = i/N is diffusers' timestep i·T/N − 1, the trailing spacing). The parity tests
(``tests/test_torch_interop.py``) hold the two to 1e-3 on tiny random models.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from codi_jax.models import convert

Tensor = torch.Tensor
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def grid_timesteps(num_steps: int, grid: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' timesteps of CoDi's ``num_steps``-step sampler on a teacher grid of ``grid``
    steps (as ``codi_jax.diffusion.timesteps``): e.g. 4 steps on a 20-grid are [999, 749, 499,
    249], then clean data. When ``num_steps`` divides ``grid`` these are exactly the timesteps of
    diffusers' ``DDIMScheduler(timestep_spacing="trailing")``."""
    if not 1 <= num_steps <= grid:
        raise ValueError(f"num_steps: {num_steps} steps do not fit a teacher grid of {grid} steps")
    if num_train_timesteps % grid:
        raise ValueError(f"grid: {grid} does not divide the {num_train_timesteps} training timesteps")
    idx = np.round(np.linspace(grid, 0, num_steps + 1)).astype(np.int64)[:-1]
    return [int(i) * (num_train_timesteps // grid) - 1 for i in idx]


def _has_cross_attention(block: nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def skip_point_modules(unet: nn.Module) -> list[nn.Module]:
    """The modules of a diffusers UNet whose outputs are its skip features, in order: ``conv_in``,
    then per down block each resnet (or the attention after it) and the downsampler, then the mid
    block. CoDi blends one conditional feature into each (eq. 10)."""
    points = [unet.conv_in]
    for block in unet.down_blocks:
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            points.append(attentions[j] if attentions is not None else resnet)
        points.extend(block.downsamplers or [])
    if unet.mid_block is not None:
        points.append(unet.mid_block)
    return points


def _blend(h: Tensor, feature: Tensor, mu: Tensor) -> Tensor:
    """Eq. 10, ``(1 − μ) h + μ f`` in float32; ``μ`` a scalar or one per example."""
    mu = mu.float().reshape(mu.shape + (1,) * (h.ndim - mu.ndim))
    return ((1.0 - mu) * h.float() + mu * feature.float()).to(h.dtype)


class CondEncoder(nn.Module):
    """The conditional encoder h_η (``cond_encoder/`` of an export): the UNet's ``conv_in`` (or a
    hint stem, ``cond_embedding``), down blocks and mid block reading the condition, and the gate
    μ (a constant, one per feature with ``per_level_mu``, or μ(t) on ``mu_knots`` knots)."""

    def __init__(self, adapted_config: dict):
        super().__init__()
        from diffusers import UNet2DConditionModel
        from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

        # A scaffold built from the same config gives blocks identical to the UNet's.
        scaffold = UNet2DConditionModel.from_config(adapted_config["unet"])
        channels = scaffold.config.block_out_channels[0]
        cond_channels = int(adapted_config.get("cond_channels", 4))
        hint = adapted_config.get("cond_embedding_channels")
        if hint is None:
            kernel = scaffold.config.conv_in_kernel
            self.conv_in = nn.Conv2d(cond_channels, channels, kernel, padding=(kernel - 1) // 2)
        else:
            self.cond_embedding = ControlNetConditioningEmbedding(channels, cond_channels, tuple(hint))
        self.down_blocks = scaffold.down_blocks
        self.mid_block = scaffold.mid_block
        self.mu_knots = int(adapted_config.get("mu_knots", 1))
        num_features = 1 + sum(len(b.resnets) + len(b.downsamplers or []) for b in self.down_blocks) + 1
        shape = (num_features,) if adapted_config.get("per_level_mu") else ()
        self.mu = nn.Parameter(torch.zeros(((self.mu_knots,) if self.mu_knots > 1 else ()) + shape))

    def forward(self, cond: Tensor, emb: Tensor, encoder_hidden_states: Optional[Tensor]) -> list[Tensor]:
        h = self.conv_in(cond) if hasattr(self, "conv_in") else self.cond_embedding(cond)
        features = [h]
        for block in self.down_blocks:
            if _has_cross_attention(block):
                h, skips = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, skips = block(hidden_states=h, temb=emb)
            features += list(skips)
        if self.mid_block is not None:
            if _has_cross_attention(self.mid_block):
                h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h = self.mid_block(h, emb)
        return features + [h]

    def gate(self, timesteps: Tensor, batch: int, num_features: int) -> Tensor:
        """μ at ``timesteps`` (the UNet's units): the constant(s), or μ(t) as (B, features)."""
        if self.mu_knots == 1:
            return self.mu
        k = self.mu_knots
        u = (timesteps.float().reshape(-1).expand(batch) / 1000.0).clamp(0.0, 1.0) * (k - 1)
        lo = u.floor().clamp(max=k - 2).long()
        frac = (u - lo)[:, None]
        values = self.mu.float().reshape(k, -1)
        return ((1.0 - frac) * values[lo] + frac * values[lo + 1]).expand(batch, num_features)


class CoDiUNet(nn.Module):
    """Full CoDi in PyTorch: diffusers' UNet with the conditional encoder's features blended into
    its skip points and mid output by forward hooks (the UNet's own forward is unchanged; with no
    pending features, e.g. called directly, the hooks pass values through)."""

    def __init__(self, unet: nn.Module, encoder: CondEncoder):
        super().__init__()
        self.unet, self.encoder = unet, encoder
        self._pending: Optional[tuple[list[Tensor], Tensor]] = None
        self._points = skip_point_modules(unet)
        for i, module in enumerate(self._points):
            module.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def blend_output(module, inputs, output):
            if self._pending is None:
                return output
            features, mu = self._pending
            m = mu[..., i] if mu.ndim else mu
            if isinstance(output, torch.Tensor):
                return _blend(output, features[i], m)
            if isinstance(output, tuple):  # attention blocks called with return_dict=False
                return (_blend(output[0], features[i], m),) + tuple(output[1:])
            raise TypeError(f"CoDiUNet: cannot blend the output of {type(module).__name__} ({type(output).__name__})")

        return blend_output

    def forward(self, sample: Tensor, timestep: Tensor, cond: Tensor,
                encoder_hidden_states: Optional[Tensor] = None) -> Tensor:
        """The raw prediction for NCHW ``sample`` at ``timestep`` (0..T−1) given the model-ready
        condition ``cond`` (see :meth:`CoDiPipeline.condition`)."""
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        features = self.encoder(cond, emb, encoder_hidden_states)
        mu = self.encoder.gate(torch.as_tensor(timestep), sample.shape[0], len(features))
        self._pending = (features, mu)
        try:
            return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        finally:
            self._pending = None

    @classmethod
    def from_export(cls, folder: str, torch_dtype: torch.dtype = torch.float32) -> "CoDiUNet":
        """The ``unet/`` and ``cond_encoder/`` of a full-CoDi export folder."""
        from diffusers import UNet2DConditionModel
        from safetensors.numpy import load_file

        meta = _read_meta(folder)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch_dtype)
        config = dict(meta["adapted_config"], unet=dict(unet.config))
        if config.get("adapter") != "cond_encoder":
            raise ValueError(f"{folder}: adapter {config.get('adapter')!r} is not full CoDi's cond_encoder")
        encoder = CondEncoder(config)
        flat = load_file(os.path.join(folder, "cond_encoder", "model.safetensors"))
        mu = flat.pop("mu")
        # The file holds the Flax tree (``/``-joined paths, Flax layouts): a rename plus transpose.
        state = convert.flax_to_torch(convert.unflatten({tuple(k.split("/")): v for k, v in flat.items()}))
        state["mu"] = mu.reshape(tuple(encoder.mu.shape))
        encoder.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, strict=True)
        return cls(unet, encoder.to(torch_dtype)).eval()


class ControlledUNet(nn.Module):
    """PE-CoDi in PyTorch: diffusers' ControlNet residuals added to the UNet's, as its pipelines do."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, sample: Tensor, timestep: Tensor, cond: Tensor,
                encoder_hidden_states: Optional[Tensor] = None) -> Tensor:
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=cond, return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         return_dict=False)[0]


def _read_meta(folder: str) -> dict:
    path = os.path.join(folder, "codi.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} has no codi.json (not a codi_jax export folder)")
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass
class CoDiPipeline:
    """CoDi's few-step sampler on a codi_jax export, in PyTorch (either adapter, any condition)."""

    model: nn.Module                  # CoDiUNet or ControlledUNet
    vae: Any
    alphas_cumprod: np.ndarray        # the teacher's ᾱ_k, k = 0..T−1
    grid: int
    prediction_type: str
    hint_stem: bool                   # the condition enters a hint stem as pixels, not as a VAE latent
    text_encoder: Any = None
    tokenizer: Any = None
    clip_skip: int = 0
    prompt: str = ""
    # A guidance-aware export (codi_jax/diffusion/guidance.py): the map from w's sinusoidal
    # features to the condition's channels, and the w it samples with by default.
    w_embed: Optional[Tensor] = None
    guidance: float = 0.0

    @classmethod
    def from_export(cls, folder: str, torch_dtype: torch.dtype = torch.float32) -> "CoDiPipeline":
        """Every component of an export folder (``codi_jax.export.export``'s layout)."""
        from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel

        meta = _read_meta(folder)
        adapted = meta["adapted_config"]
        if adapted.get("adapter") == "cond_encoder":
            model = CoDiUNet.from_export(folder, torch_dtype)
        elif adapted.get("adapter") == "controlnet":
            model = ControlledUNet(
                UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch_dtype),
                ControlNetModel.from_pretrained(folder, subfolder="controlnet", torch_dtype=torch_dtype)).eval()
        else:
            raise ValueError(f"{folder}: adapter {adapted.get('adapter')!r} has no condition to sample with")
        if not os.path.isdir(os.path.join(folder, "vae")):
            raise ValueError(f"{folder}: no vae/ (a pixel-space model; only latent models run here)")
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch_dtype).eval()
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
        text_encoder = tokenizer = None
        if os.path.isdir(os.path.join(folder, "text_encoder")):
            from transformers import CLIPTextModel, CLIPTokenizer

            text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch_dtype).eval()
            tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        w_embed = None
        if meta.get("guidance_input"):
            from safetensors.numpy import load_file

            w_embed = torch.from_numpy(load_file(os.path.join(folder, "guidance", "w_embed.safetensors"))["kernel"]).float()
        prediction_type = meta["prediction_type"]
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"codi.json: unknown prediction_type {prediction_type!r}; known: {PREDICTION_TYPES}")
        return cls(model, vae, scheduler.alphas_cumprod.double().numpy(), int(meta["grid"]), prediction_type,
                   hint_stem=adapted.get("cond_embedding_channels") is not None,
                   text_encoder=text_encoder, tokenizer=tokenizer,
                   clip_skip=1 if meta.get("text_layer") == "penultimate" else 0, prompt=meta.get("prompt", ""),
                   w_embed=w_embed, guidance=float(meta.get("guidance", 0.0)))

    @torch.no_grad()
    def encode_prompt(self, prompt: Optional[str], batch: int) -> Optional[Tensor]:
        """Prompt embeddings as diffusers' SD pipelines compute them (``clip_skip`` included)."""
        if self.text_encoder is None:
            return None
        text = self.prompt if prompt is None else prompt
        ids = self.tokenizer([text] * batch, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        if self.clip_skip == 0:
            return self.text_encoder(ids)[0]
        states = self.text_encoder(ids, output_hidden_states=True).hidden_states[-(self.clip_skip + 1)]
        return self.text_encoder.text_model.final_layer_norm(states)

    @torch.no_grad()
    def condition(self, cond: Tensor) -> Tensor:
        """The condition (NCHW pixels in [−1, 1] at the output size, extra channels such as an
        inpainting mask after RGB) as the model reads it: [0, 1] pixels for a hint stem (as
        diffusers' ControlNet pipelines pass them), else the VAE latent of the RGB part (posterior
        mode, scaled) with the extra channels resized to it."""
        if self.hint_stem:
            return (cond + 1.0) / 2.0
        latent = self.vae.encode(cond[:, :3]).latent_dist.mode() * self.vae.config.scaling_factor
        if cond.shape[1] == 3:
            return latent
        extra = nn.functional.interpolate(cond[:, 3:], size=latent.shape[2:], mode="bilinear",
                                          align_corners=False, antialias=True)
        return torch.cat([latent, extra.to(latent.dtype)], dim=1)

    def _x_eps(self, pred: Tensor, z: Tensor, alpha: float, sigma: float) -> tuple[Tensor, Tensor]:
        if self.prediction_type == "v_prediction":
            return alpha * z - sigma * pred, alpha * pred + sigma * z
        if self.prediction_type == "epsilon":
            return (z - sigma * pred) / alpha, pred
        return pred, (z - alpha * pred) / sigma

    def with_guidance(self, c: Tensor, guidance: Optional[float]) -> Tensor:
        """A guidance-aware model's condition: c plus the embedding of w (``guidance``, or the
        export's own), broadcast over the spatial axes; other models' c as it is."""
        if self.w_embed is None:
            if guidance is not None:
                raise ValueError("guidance: this export is not guidance-aware (it has no w input)")
            return c
        w = torch.full((c.shape[0],), self.guidance if guidance is None else float(guidance), dtype=torch.float32)
        num_frequencies = (self.w_embed.shape[0] - 1) // 2
        freqs = torch.exp(torch.linspace(np.log(1.0 / 16.0), np.log(4.0), num_frequencies))
        angles = w[:, None] * freqs[None]
        features = torch.cat([w[:, None], torch.sin(angles), torch.cos(angles)], dim=-1)
        return c + (features @ self.w_embed).to(c.dtype)[:, :, None, None]

    @torch.no_grad()
    def __call__(self, cond: Tensor, latents: Tensor, num_inference_steps: int = 4,
                 prompt: Optional[str] = None, prompt_embeds: Optional[Tensor] = None,
                 guidance: Optional[float] = None) -> Tensor:
        """Images (NCHW in [0, 1]) from the initial noise ``latents`` (NCHW, the VAE latent's
        shape) given the condition ``cond`` (see :meth:`condition`): ``num_inference_steps`` DDIM
        steps (eq. 6) on the teacher grid, the last of which lands on clean data. ``guidance``:
        the w of a guidance-aware export (default: the one it was exported with)."""
        c = self.with_guidance(self.condition(cond), guidance)
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, latents.shape[0])
        steps = grid_timesteps(num_inference_steps, self.grid, len(self.alphas_cumprod))
        bars = [float(self.alphas_cumprod[k]) for k in steps] + [1.0]
        z = latents
        for i, k in enumerate(steps):
            t = torch.full((z.shape[0],), k, dtype=torch.long)
            pred = self.model(z, t, c, prompt_embeds).float()
            x, eps = self._x_eps(pred, z.float(), bars[i] ** 0.5, (1.0 - bars[i]) ** 0.5)
            z = bars[i + 1] ** 0.5 * x + (1.0 - bars[i + 1]) ** 0.5 * eps
        image = self.vae.decode(z / self.vae.config.scaling_factor).sample
        return ((image.clamp(-1.0, 1.0) + 1.0) / 2.0).float()


def pipeline_kwargs(folder: str, num_inference_steps: int) -> dict[str, Any]:
    """What diffusers' ``StableDiffusionControlNetPipeline`` needs besides its inputs to sample a
    PE-CoDi export as ``codi_jax`` does (a hint-stem ControlNet, ``model.cond_input=pixel``)."""
    meta = _read_meta(folder)
    if meta.get("guidance_input"):
        raise ValueError(f"{folder}: a guidance-aware export reads w through its condition, which "
                         "diffusers' ControlNet pipeline cannot add: use codi_jax.torch.CoDiPipeline")
    grid = int(meta["grid"])
    if grid % num_inference_steps:
        raise ValueError(f"num_inference_steps: diffusers' trailing DDIM timesteps equal CoDi's only for "
                         f"step counts that divide the teacher grid ({grid}); got {num_inference_steps}")
    return {"num_inference_steps": num_inference_steps, "guidance_scale": 1.0, "eta": 0.0,
            "controlnet_conditioning_scale": 1.0,
            "clip_skip": 1 if meta.get("text_layer") == "penultimate" else None}


__all__ = ("CoDiPipeline", "CoDiUNet", "ControlledUNet", "grid_timesteps", "pipeline_kwargs",
                          "skip_point_modules")
