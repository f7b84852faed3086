"""Stable Diffusion's KL autoencoder (diffusers' ``AutoencoderKL``) in Flax linen, NHWC.

Parameter paths mirror the diffusers checkpoint keys (``encoder.down_blocks.0.resnets.1.conv1.weight``
<-> ``encoder/down_blocks_0/resnets_1/conv1/kernel``). Images are NHWC in [-1, 1]; ``encode``
returns the posterior over *unscaled* latents -- multiply a sample by ``scaling_factor`` before the
UNet, and divide by it before ``decode``, as diffusers' pipelines do.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from codi_jax.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, activation, conv2d

Array = jax.Array
Dtype = Any

# The VAE's norms (resnets, mid-block attention, output norm) all use this epsilon in diffusers.
_EPS = 1e-6

# config.json keys that map onto module fields of the same name.
_CONFIG_FIELDS = (
    "in_channels",
    "out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "scaling_factor",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
)


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) over latents, NHWC, in float32.

    ``logvar`` is clipped to [-30, 20] like diffusers' ``DiagonalGaussianDistribution``.
    """

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> "DiagonalGaussian":
        """Splits the last axis of ``moments`` into (mean, logvar) halves."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: Array) -> Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> Array:
        return self.mean


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` without time embedding: resnet, (attention, resnet)."""

    channels: int
    groups: int
    act_fn: str
    add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        def resnet(i: int) -> ResnetBlock2D:
            return ResnetBlock2D(
                self.channels, groups=self.groups, eps=_EPS, use_time_emb=False, act_fn=self.act_fn,
                dtype=self.dtype, name=f"resnets_{i}",
            )

        x = resnet(0)(x)
        if self.add_attention:
            # One head over all channels, biased projections, fp32 softmax (diffusers' upcast_softmax).
            x = Attention(
                heads=1, dim_head=self.channels, bias=True, upcast=True, norm_num_groups=self.groups,
                norm_eps=_EPS, residual_connection=True, dtype=self.dtype, name="attentions_0",
            )(x)
        return resnet(1)(x)


class EncoderBlock(nn.Module):
    """``DownEncoderBlock2D``: resnets, then (except in the last block) a stride-2 downsampler."""

    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_downsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels, groups=self.groups, eps=_EPS, use_time_emb=False, act_fn=self.act_fn,
                dtype=self.dtype, name=f"resnets_{j}",
            )(x)
        if self.add_downsample:
            # padding=0: pad one row/column at the bottom/right, then a valid stride-2 conv.
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, name="downsamplers_0")(x)
        return x


class DecoderBlock(nn.Module):
    """``UpDecoderBlock2D``: resnets, then (except in the last block) nearest x2 + conv."""

    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for j in range(self.num_layers):
            x = ResnetBlock2D(
                self.out_channels, groups=self.groups, eps=_EPS, use_time_emb=False, act_fn=self.act_fn,
                dtype=self.dtype, name=f"resnets_{j}",
            )(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image (B, H, W, in) -> moments (B, H/f, W/f, 2 * latent_channels), f = 2^(levels - 1)."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    groups: int
    act_fn: str
    mid_block_add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = conv2d(self.block_out_channels[0], 3, dtype=self.dtype, name="conv_in")(x)
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            x = EncoderBlock(
                channels, self.layers_per_block, self.groups, self.act_fn, add_downsample=i < last,
                dtype=self.dtype, name=f"down_blocks_{i}",
            )(x)
        x = MidBlock(
            self.block_out_channels[-1], self.groups, self.act_fn, self.mid_block_add_attention,
            dtype=self.dtype, name="mid_block",
        )(x)
        x = nn.GroupNorm(self.groups, epsilon=_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="conv_norm_out")(x)
        x = activation(self.act_fn)(x)
        return conv2d(2 * self.out_channels, 3, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h * f, w * f, out_channels)."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    groups: int
    act_fn: str
    mid_block_add_attention: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: Array) -> Array:
        x = conv2d(self.block_out_channels[-1], 3, dtype=self.dtype, name="conv_in")(z)
        x = MidBlock(
            self.block_out_channels[-1], self.groups, self.act_fn, self.mid_block_add_attention,
            dtype=self.dtype, name="mid_block",
        )(x)
        reversed_channels = self.block_out_channels[::-1]
        last = len(reversed_channels) - 1
        for i, channels in enumerate(reversed_channels):
            # The decoder has one more resnet per level than the encoder.
            x = DecoderBlock(
                channels, self.layers_per_block + 1, self.groups, self.act_fn, add_upsample=i < last,
                dtype=self.dtype, name=f"up_blocks_{i}",
            )(x)
        x = nn.GroupNorm(self.groups, epsilon=_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="conv_norm_out")(x)
        x = activation(self.act_fn)(x)
        return conv2d(self.out_channels, 3, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (the SD 1.x/2.x VAE), NHWC.

    ``encode(x)`` -> :class:`DiagonalGaussian` over unscaled latents; ``decode(z)`` -> image;
    ``__call__(x)`` reconstructs (posterior mode, or a sample when ``sample_posterior``) and is what
    ``init`` traces. Defaults are diffusers' constructor defaults; SD's VAE comes from its config.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        block_out_channels = tuple(self.block_out_channels)
        self.encoder = Encoder(
            self.latent_channels, block_out_channels, self.layers_per_block, self.norm_num_groups, self.act_fn,
            self.mid_block_add_attention, dtype=self.dtype,
        )
        self.decoder = Decoder(
            self.out_channels, block_out_channels, self.layers_per_block, self.norm_num_groups, self.act_fn,
            self.mid_block_add_attention, dtype=self.dtype,
        )
        if self.use_quant_conv:
            self.quant_conv = conv2d(2 * self.latent_channels, 1, dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv2d(self.latent_channels, 1, dtype=self.dtype)

    def encode(self, x: Array) -> DiagonalGaussian:
        """Image NHWC in [-1, 1] -> posterior over latents (B, H/f, W/f, latent_channels)."""
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: Array) -> Array:
        """Unscaled latents NHWC -> image NHWC (roughly [-1, 1]), in the compute dtype."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: Array, sample_posterior: bool = False, rng: Optional[Array] = None) -> Array:
        posterior = self.encode(x)
        if sample_posterior:
            if rng is None:
                raise ValueError("sample_posterior=True needs an rng key")
            z = posterior.sample(rng)
        else:
            z = posterior.mode()
        return self.decode(z)

    @classmethod
    def from_config(cls, config: dict, dtype: Dtype = jnp.float32, **options: Any) -> "AutoencoderKL":
        """Builds the model from a diffusers ``AutoencoderKL`` ``config.json`` dict.

        Unknown keys are ignored; values this implementation does not cover raise ``ValueError``.
        ``options`` override module fields by name.
        """
        levels = len(config.get("block_out_channels", cls.block_out_channels))
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(config.get(key, [block] * levels))
            if types != [block] * levels:
                raise ValueError(f"{key}={types!r} is not supported; expected {levels} x {block!r}")
        # Latent normalisations other than a plain scale (SD3/Flux shift, per-channel statistics)
        # would be silently ignored by a caller that only applies scaling_factor.
        for key in ("shift_factor", "latents_mean", "latents_std"):
            if config.get(key) is not None:
                raise ValueError(f"{key}={config[key]!r} is not supported (only scaling_factor)")
        kwargs = {k: config[k] for k in _CONFIG_FIELDS if config.get(k) is not None}
        activation(kwargs.get("act_fn", cls.act_fn))  # raises ValueError naming act_fn if unknown
        if "block_out_channels" in config:
            kwargs["block_out_channels"] = tuple(config["block_out_channels"])
        kwargs.update(options)
        return cls(dtype=dtype, **kwargs)

    @classmethod
    def dummy_inputs(cls, config: dict, batch: int = 1) -> tuple[Array]:
        """``(image,)`` NHWC for ``init``/``eval_shape``: 8 latent pixels a side (parameter shapes do
        not depend on the spatial size, so it is kept small)."""
        levels = len(config.get("block_out_channels", cls.block_out_channels))
        size = 8 * 2 ** (levels - 1)
        return (jnp.zeros((batch, size, size, config.get("in_channels", cls.in_channels)), jnp.float32),)
