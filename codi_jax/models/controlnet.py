"""Flax ControlNetModel with diffusers-compatible parameter paths.

The trunk (``conv_in``, ``time_embedding``, ``down_blocks``, ``mid_block``) is built by the same
builders as the UNet's encoder, so ``ControlNetModel.from_unet``-style initialisation is a copy of
those subtrees. The condition ("hint") enters through ``controlnet_cond_embedding``; every skip
and the mid output leave through zero-initialised 1x1 convolutions.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models.layers import AttentionImpl, conv2d
from codi_jax.models.unet import (
    UNetArch,
    block_common,
    build_down_blocks,
    build_mid_block,
    check_context,
    embed_timesteps,
    run_encoder,
    time_embedding_module,
)

Array = jax.Array


class ControlNetConditioningEmbedding(nn.Module):
    """Hint stem: ``conv_in`` → SiLU → (conv, SiLU, stride-2 conv, SiLU) per extra stage → ``conv_out``.

    ``block_out_channels`` of length k downsamples by 2**(k-1) (SD's default (16, 32, 96, 256):
    pixel space, 8×; a single entry keeps the size, for latent-space conditions). ``zero_out``
    zero-initialises ``conv_out`` as ControlNet does.
    """

    out_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    zero_out: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, cond: Array) -> Array:
        boc = self.block_out_channels
        h = nn.silu(conv2d(boc[0], 3, dtype=self.dtype, name="conv_in")(cond.astype(self.dtype)))
        for i in range(len(boc) - 1):
            h = nn.silu(conv2d(boc[i], 3, dtype=self.dtype, name=f"blocks_{2 * i}")(h))
            h = nn.silu(conv2d(boc[i + 1], 3, stride=2, dtype=self.dtype, name=f"blocks_{2 * i + 1}")(h))
        return conv2d(self.out_channels, 3, dtype=self.dtype, zero_init=self.zero_out, name="conv_out")(h)

    @property
    def downscale(self) -> int:
        """Spatial factor between the condition and the network's latent."""
        return 2 ** (len(self.block_out_channels) - 1)


class ControlNetModel(nn.Module):
    """diffusers' ControlNetModel on NHWC inputs; returns residuals for ``UNet2DConditionModel``."""

    arch: UNetArch
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr_conditioning: bool = False
    global_pool_conditions: bool = False
    dtype: Any = jnp.float32
    remat: Optional[str] = None
    attention_implementation: AttentionImpl = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Any = jnp.float32, **options: Any) -> "ControlNetModel":
        """Build from a diffusers ControlNet ``config.json``; ``options``: ``remat``, ``attention_implementation``."""
        order = config.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ValueError(f"unsupported config value controlnet_conditioning_channel_order={order!r}")
        return cls(
            UNetArch.from_config(config, with_up_blocks=False),
            conditioning_channels=int(config.get("conditioning_channels", 3)),
            conditioning_embedding_out_channels=tuple(
                int(c) for c in config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
            ),
            bgr_conditioning=order == "bgr",
            global_pool_conditions=bool(config.get("global_pool_conditions", False)),
            dtype=dtype,
            **options,
        )

    def to_config(self) -> dict[str, Any]:
        """A diffusers ``config.json`` dict for this architecture (round-trips through ``from_config``)."""
        return {
            "_class_name": "ControlNetModel",
            **self.arch.to_config(with_up_blocks=False),
            "conditioning_channels": self.conditioning_channels,
            "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
            "controlnet_conditioning_channel_order": "bgr" if self.bgr_conditioning else "rgb",
            "global_pool_conditions": self.global_pool_conditions,
        }

    @staticmethod
    def dummy_inputs(config: Mapping[str, Any], batch: int = 1) -> tuple[Array, Array, Optional[Array], Array]:
        """(sample, timesteps, encoder_hidden_states, controlnet_cond) for ``init`` / ``jax.eval_shape``."""
        arch = UNetArch.from_config(config, with_up_blocks=False)
        size = 2 ** max(3, len(arch.block_out_channels) - 1)
        factor = 2 ** (len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
        sample = jnp.zeros((batch, size, size, arch.in_channels), jnp.float32)
        context = None if arch.cross_attention_dim is None else jnp.zeros((batch, 8, arch.cross_attention_dim), jnp.float32)
        cond = jnp.zeros((batch, size * factor, size * factor, int(config.get("conditioning_channels", 3))), jnp.float32)
        return sample, jnp.zeros((batch,), jnp.int32), context, cond

    def setup(self) -> None:
        arch = self.arch
        common = block_common(arch, self.dtype, self.attention_implementation)
        self.conv_in = conv2d(arch.block_out_channels[0], arch.conv_in_kernel, dtype=self.dtype)
        self.time_embedding = time_embedding_module(arch, self.dtype)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            arch.block_out_channels[0], self.conditioning_embedding_out_channels, dtype=self.dtype
        )
        self.down_blocks = build_down_blocks(arch, common, self.remat)
        self.mid_block = build_mid_block(arch, common, self.remat)
        self.controlnet_down_blocks = [conv2d(c, 1, dtype=self.dtype, zero_init=True) for c in arch.skip_channels()]
        self.controlnet_mid_block = conv2d(arch.block_out_channels[-1], 1, dtype=self.dtype, zero_init=True)

    def __call__(
        self,
        sample: Array,
        timesteps: Array,
        encoder_hidden_states: Optional[Array],
        controlnet_cond: Array,
        conditioning_scale: float | Array = 1.0,
        deterministic: bool = True,
    ) -> tuple[tuple[Array, ...], Array]:
        """→ (down_block_res_samples, mid_block_res_sample), already scaled by ``conditioning_scale``.

        ``controlnet_cond`` is NHWC at the latent size × 2**(len(conditioning_embedding_out_channels) - 1).
        """
        arch = self.arch
        check_context(arch, encoder_hidden_states)
        x = sample.astype(self.dtype)
        context = None if encoder_hidden_states is None else encoder_hidden_states.astype(self.dtype)
        if self.bgr_conditioning:
            controlnet_cond = controlnet_cond[..., ::-1]
        temb = embed_timesteps(arch, self.time_embedding, timesteps, x.shape[0], self.dtype)
        h = self.conv_in(x) + self.controlnet_cond_embedding(controlnet_cond)
        h, skips = run_encoder(h, self.down_blocks, self.mid_block, temb, context, deterministic=deterministic)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(h)
        if self.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(d * conditioning_scale for d in down), mid * conditioning_scale
