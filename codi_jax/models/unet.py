"""Flax UNet2DConditionModel with diffusers-compatible parameter paths (SD 1.x and 2.x).

The encoder half (``conv_in`` → down blocks → mid block) is factored into :func:`run_encoder` and
the block builders below, so the ControlNet and the CoDi conditional encoder reuse the exact same
blocks (and therefore the same parameter layout, which is what lets them be initialised by copying
UNet weights).

CoDi's feature blend (paper eq. 10) is a UNet feature: ``encoder_features`` (one array per skip
point plus the mid-block output) and ``encoder_mix`` (μ) make the UNet replace each of its encoder
features h by ``(1 - μ) h + μ f`` and continue its forward pass from the blended value.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models.layers import (
    Attention,
    AttentionImpl,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    activation,
    conv2d,
    get_timestep_embedding,
    maybe_remat,
)

Array = jax.Array

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)

# Config keys whose non-default values select features this implementation does not have.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "reverse_transformer_layers_per_block": None,
    "cross_attention_norm": None,
    "class_embeddings_concat": False,
}


def _per_block(value: Any, n: int, key: str) -> tuple:
    """Broadcast an int/bool config value to one entry per block, or check a list's length."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{key}={value!r} must have one entry per block ({n})")
        if any(isinstance(v, (list, tuple)) for v in value):
            raise ValueError(f"{key}={value!r}: nested per-layer lists are not supported")
        return tuple(value)
    return (value,) * n


def _compact(values: tuple) -> Any:
    """A per-block tuple as a config value: the scalar when all entries agree, else a list."""
    return values[0] if len(set(values)) == 1 else list(values)


@dataclasses.dataclass(frozen=True)
class UNetArch:
    """The architecture fields of a diffusers UNet/ControlNet config, normalised to per-block tuples.

    Hashable (tuples only), so it can be a Flax module attribute.
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: Optional[str]
    layers_per_block: tuple[int, ...]
    transformer_layers_per_block: tuple[int, ...]
    num_attention_heads: tuple[int, ...]
    only_cross_attention: tuple[bool, ...]
    mid_block_only_cross_attention: bool
    cross_attention_dim: Optional[int]
    use_linear_projection: bool
    upcast_attention: bool
    flip_sin_to_cos: bool
    freq_shift: float
    norm_num_groups: int
    norm_eps: float
    act_fn: str
    downsample_padding: int
    mid_block_scale_factor: float
    resnet_out_scale_factor: float
    time_embed_dim: int
    conv_in_kernel: int
    conv_out_kernel: int
    center_input_sample: bool
    dropout: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any], with_up_blocks: bool = True) -> "UNetArch":
        """Parse a diffusers ``config.json`` dict; unknown keys are ignored, unsupported values raise."""
        for key, default in _UNSUPPORTED_DEFAULTS.items():
            if config.get(key, default) != default:
                raise ValueError(f"unsupported config value {key}={config[key]!r} (only {default!r} is implemented)")
        boc = tuple(int(c) for c in config.get("block_out_channels", (320, 640, 1280, 1280)))
        n = len(boc)
        down = tuple(config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)))
        up = tuple(config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)) if with_up_blocks else ()
        for key, types, allowed in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
            for t in types:
                if t not in allowed:
                    raise ValueError(f"unsupported config value {key} entry {t!r} (supported: {allowed})")
        if len(down) != n or (with_up_blocks and len(up) != n):
            raise ValueError(f"down_block_types/up_block_types must have {n} entries (block_out_channels={boc})")
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid not in _MID_TYPES:
            raise ValueError(f"unsupported config value mid_block_type={mid!r} (supported: {_MID_TYPES})")
        if config.get("num_attention_heads") is not None and config.get("attention_head_dim") is not None:
            # diffusers' UNet stores the head COUNT in attention_head_dim; a separate
            # num_attention_heads would be ambiguous, and diffusers rejects it too.
            raise ValueError(f"unsupported config value num_attention_heads={config['num_attention_heads']!r}")
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        cross = config.get("cross_attention_dim", 1280)
        if isinstance(cross, (list, tuple)):
            raise ValueError(f"unsupported config value cross_attention_dim={cross!r} (per-block lists)")
        groups = config.get("norm_num_groups", 32)
        if groups is None:
            raise ValueError("unsupported config value norm_num_groups=None")
        oca = config.get("only_cross_attention", False)
        mid_oca = config.get("mid_block_only_cross_attention")
        if mid_oca is None:
            mid_oca = oca if isinstance(oca, bool) else False
        return cls(
            in_channels=int(config.get("in_channels", 4)),
            out_channels=int(config.get("out_channels", 4)),
            block_out_channels=boc,
            down_block_types=down,
            up_block_types=up,
            mid_block_type=mid,
            layers_per_block=tuple(int(v) for v in _per_block(config.get("layers_per_block", 2), n, "layers_per_block")),
            transformer_layers_per_block=tuple(
                int(v) for v in _per_block(config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
            ),
            num_attention_heads=tuple(int(v) for v in _per_block(heads, n, "attention_head_dim")),
            only_cross_attention=tuple(bool(v) for v in _per_block(oca, n, "only_cross_attention")),
            mid_block_only_cross_attention=bool(mid_oca),
            cross_attention_dim=None if cross is None else int(cross),
            use_linear_projection=bool(config.get("use_linear_projection", False)),
            upcast_attention=bool(config.get("upcast_attention", False)),
            flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
            freq_shift=float(config.get("freq_shift", 0)),
            norm_num_groups=int(groups),
            norm_eps=float(config.get("norm_eps", 1e-5)),
            act_fn=str(config.get("act_fn", "silu")),
            downsample_padding=int(config.get("downsample_padding", 1)),
            mid_block_scale_factor=float(config.get("mid_block_scale_factor", 1.0)),
            resnet_out_scale_factor=float(config.get("resnet_out_scale_factor", 1.0)),
            time_embed_dim=int(config.get("time_embedding_dim") or 4 * boc[0]),
            conv_in_kernel=int(config.get("conv_in_kernel", 3)),
            conv_out_kernel=int(config.get("conv_out_kernel", 3)),
            center_input_sample=bool(config.get("center_input_sample", False)),
            dropout=float(config.get("dropout", 0.0)),
        )

    def to_config(self, with_up_blocks: bool = True) -> dict[str, Any]:
        """The diffusers config dict (JSON-able) that :meth:`from_config` parses back to ``self``."""
        config = {
            "in_channels": self.in_channels,
            "block_out_channels": list(self.block_out_channels),
            "down_block_types": list(self.down_block_types),
            "mid_block_type": self.mid_block_type,
            # Scalars when uniform, as in the SD configs (diffusers' ControlNetModel needs an int
            # layers_per_block).
            "layers_per_block": _compact(self.layers_per_block),
            "transformer_layers_per_block": _compact(self.transformer_layers_per_block),
            "attention_head_dim": _compact(self.num_attention_heads),
            "only_cross_attention": _compact(self.only_cross_attention),
            "cross_attention_dim": self.cross_attention_dim,
            "use_linear_projection": self.use_linear_projection,
            "upcast_attention": self.upcast_attention,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "act_fn": self.act_fn,
            "downsample_padding": self.downsample_padding,
            "mid_block_scale_factor": self.mid_block_scale_factor,
        }
        # Keys diffusers' ControlNetModel does not take (it fixes them to these defaults).
        if with_up_blocks:
            config.update(
                mid_block_only_cross_attention=self.mid_block_only_cross_attention,
                time_embedding_dim=self.time_embed_dim,
                conv_in_kernel=self.conv_in_kernel,
                dropout=self.dropout,
                out_channels=self.out_channels,
                up_block_types=list(self.up_block_types),
                resnet_out_scale_factor=self.resnet_out_scale_factor,
                conv_out_kernel=self.conv_out_kernel,
                center_input_sample=self.center_input_sample,
            )
        return config

    @property
    def num_skip_points(self) -> int:
        """Encoder features the up path consumes: conv_in output + each layer + each downsampler."""
        return 1 + sum(self.layers_per_block) + len(self.block_out_channels) - 1

    def skip_channels(self) -> list[int]:
        """Channel count of every skip point, in forward order (conv_in first)."""
        chans = [self.block_out_channels[0]]
        for i, c in enumerate(self.block_out_channels):
            chans += [c] * self.layers_per_block[i]
            if i < len(self.block_out_channels) - 1:
                chans.append(c)
        return chans


def _blend(h: Array, feature: Array, mu: Array) -> Array:
    """Paper eq. 10: ``(1 - μ) h + μ f``; exactly ``h`` at μ = 0. ``μ``: a scalar or one per example."""
    mu = mu.astype(jnp.float32)
    mu = mu.reshape(mu.shape + (1,) * (h.ndim - mu.ndim))
    return ((1.0 - mu) * h.astype(jnp.float32) + mu * feature.astype(jnp.float32)).astype(h.dtype)


class GEGLU(nn.Module):
    """``proj`` to 2×inner, then value × GELU(gate) (exact erf GELU, as PyTorch's default)."""

    inner_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = nn.Dense(2 * self.inner_dim, dtype=self.dtype, param_dtype=jnp.float32, name="proj")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``net_0`` (GEGLU) → dropout → ``net_2`` (Dense back to the model width)."""

    dim: int
    mult: int = 4
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention (``attn1``), cross-attention (``attn2``, absent without a context dim), GEGLU MLP."""

    dim: int
    heads: int
    dim_head: int
    cross_attention_dim: Optional[int]
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dropout: float = 0.0
    implementation: AttentionImpl = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array], deterministic: bool = True) -> Array:
        attn = lambda name: Attention(
            self.heads, self.dim_head, upcast=self.upcast_attention, dropout=self.dropout,
            implementation=self.implementation, dtype=self.dtype, name=name,
        )
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name=name)
        x = attn("attn1")(norm("norm1")(x), context if self.only_cross_attention else None, deterministic) + x
        if self.cross_attention_dim is not None:
            x = attn("attn2")(norm("norm2")(x), context, deterministic) + x
        return FeedForward(self.dim, dropout=self.dropout, dtype=self.dtype, name="ff")(norm("norm3")(x), deterministic) + x


class Transformer2DModel(nn.Module):
    """GroupNorm → ``proj_in`` → transformer blocks on tokens → ``proj_out``, plus the residual.

    ``use_linear_projection`` picks Dense (SD 2.x) or 1x1 Conv (SD 1.x) projections; on NHWC they
    compute the same thing, but the parameter shapes differ, so both are kept.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    cross_attention_dim: Optional[int] = None
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    dropout: float = 0.0
    implementation: AttentionImpl = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array], deterministic: bool = True) -> Array:
        b, hgt, wid, c = x.shape
        inner = self.heads * self.dim_head
        proj = lambda f, name: (
            nn.Dense(f, dtype=self.dtype, param_dtype=jnp.float32, name=name)
            if self.use_linear_projection
            else conv2d(f, 1, dtype=self.dtype, name=name)
        )
        h = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32, name="norm")(x)
        h = proj(inner, "proj_in")(h).reshape(b, hgt * wid, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                inner, self.heads, self.dim_head, self.cross_attention_dim, self.only_cross_attention,
                self.upcast_attention, self.dropout, self.implementation, self.dtype, name=f"transformer_blocks_{i}",
            )(h, context, deterministic)
        h = proj(c, "proj_out")(h.reshape(b, hgt, wid, inner))
        return h + x


@dataclasses.dataclass(frozen=True)
class _BlockCommon:
    """Settings every block of one network shares."""

    groups: int
    eps: float
    act_fn: str
    dropout: float
    cross_attention_dim: Optional[int]
    use_linear_projection: bool
    upcast_attention: bool
    implementation: AttentionImpl
    dtype: Any

    def resnet(self, out: int, scale: float, name: str) -> ResnetBlock2D:
        return ResnetBlock2D(out, groups=self.groups, eps=self.eps, dropout=self.dropout, output_scale_factor=scale,
                             act_fn=self.act_fn, dtype=self.dtype, name=name)

    def transformer(self, out: int, heads: int, layers: int, only_cross: bool, name: str) -> Transformer2DModel:
        return Transformer2DModel(
            heads, out // heads, layers, self.cross_attention_dim, self.groups, self.use_linear_projection,
            only_cross, self.upcast_attention, self.dropout, self.implementation, self.dtype, name=name,
        )


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (``with_attention``) or DownBlock2D.

    Returns the output and the tuple of skip features (one per layer, plus the downsampler's). With
    ``features``/``mix`` given, each of those points is blended with the matching feature before
    the block continues (CoDi eq. 10).
    """

    common: _BlockCommon
    out_channels: int
    num_layers: int
    with_attention: bool
    heads: int = 1
    transformer_layers: int = 1
    only_cross_attention: bool = False
    add_downsample: bool = True
    downsample_padding: int = 1
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(
        self,
        h: Array,
        temb: Array,
        context: Optional[Array],
        features: Optional[Sequence[Array]] = None,
        mix: Optional[Array] = None,
        deterministic: bool = True,
    ) -> tuple[Array, tuple[Array, ...]]:
        cm = self.common
        skips = []
        for j in range(self.num_layers):
            h = cm.resnet(self.out_channels, self.output_scale_factor, f"resnets_{j}")(h, temb, deterministic)
            if self.with_attention:
                h = cm.transformer(self.out_channels, self.heads, self.transformer_layers, self.only_cross_attention,
                                   f"attentions_{j}")(h, context, deterministic)
            if features is not None:
                h = _blend(h, features[len(skips)], mix[len(skips)])
            skips.append(h)
        if self.add_downsample:
            h = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=cm.dtype, name="downsamplers_0")(h)
            if features is not None:
                h = _blend(h, features[len(skips)], mix[len(skips)])
            skips.append(h)
        return h, tuple(skips)


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: ``resnets_0``, then (``attentions_i``, ``resnets_{i+1}``) pairs."""

    common: _BlockCommon
    channels: int
    heads: int
    transformer_layers: int = 1
    only_cross_attention: bool = False
    num_layers: int = 1
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, h: Array, temb: Array, context: Optional[Array], deterministic: bool = True) -> Array:
        cm = self.common
        h = cm.resnet(self.channels, self.output_scale_factor, "resnets_0")(h, temb, deterministic)
        for i in range(self.num_layers):
            h = cm.transformer(self.channels, self.heads, self.transformer_layers, self.only_cross_attention,
                               f"attentions_{i}")(h, context, deterministic)
            h = cm.resnet(self.channels, self.output_scale_factor, f"resnets_{i + 1}")(h, temb, deterministic)
        return h


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D (``with_attention``) or UpBlock2D: concatenates one skip per layer (last first)."""

    common: _BlockCommon
    out_channels: int
    num_layers: int
    with_attention: bool
    heads: int = 1
    transformer_layers: int = 1
    only_cross_attention: bool = False
    add_upsample: bool = True
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(
        self,
        h: Array,
        skips: Sequence[Array],
        temb: Array,
        context: Optional[Array],
        upsample_size: Optional[tuple[int, int]] = None,
        deterministic: bool = True,
    ) -> Array:
        cm = self.common
        for j in range(self.num_layers):
            h = jnp.concatenate([h, skips[-1 - j].astype(h.dtype)], axis=-1)
            h = cm.resnet(self.out_channels, self.output_scale_factor, f"resnets_{j}")(h, temb, deterministic)
            if self.with_attention:
                h = cm.transformer(self.out_channels, self.heads, self.transformer_layers, self.only_cross_attention,
                                   f"attentions_{j}")(h, context, deterministic)
        if self.add_upsample:
            h = Upsample2D(self.out_channels, dtype=cm.dtype, name="upsamplers_0")(h, upsample_size)
        return h


# Flax counts ``self`` as argument 0; the Python-valued arguments must be static under remat.
_DOWN_STATIC = (6,)
_MID_STATIC = (4,)
_UP_STATIC = (5, 6)


def block_common(arch: UNetArch, dtype: Any, implementation: AttentionImpl) -> _BlockCommon:
    """The shared block settings of a network built from ``arch``."""
    return _BlockCommon(arch.norm_num_groups, arch.norm_eps, arch.act_fn, arch.dropout, arch.cross_attention_dim,
                        arch.use_linear_projection, arch.upcast_attention, implementation, dtype)


def build_down_blocks(arch: UNetArch, common: _BlockCommon, remat: Optional[str]) -> list[nn.Module]:
    """The encoder's down blocks (call inside ``setup`` and assign to ``self.down_blocks``)."""
    cls = maybe_remat(DownBlock, remat, _DOWN_STATIC)
    n = len(arch.block_out_channels)
    return [
        cls(common, arch.block_out_channels[i], arch.layers_per_block[i], t == "CrossAttnDownBlock2D",
            arch.num_attention_heads[i], arch.transformer_layers_per_block[i], arch.only_cross_attention[i],
            i < n - 1, arch.downsample_padding, arch.resnet_out_scale_factor)
        for i, t in enumerate(arch.down_block_types)
    ]


def build_mid_block(arch: UNetArch, common: _BlockCommon, remat: Optional[str]) -> Optional[nn.Module]:
    """The mid block, or None for ``mid_block_type=None``."""
    if arch.mid_block_type is None:
        return None
    cls = maybe_remat(MidBlock, remat, _MID_STATIC)
    return cls(common, arch.block_out_channels[-1], arch.num_attention_heads[-1], arch.transformer_layers_per_block[-1],
               arch.mid_block_only_cross_attention, 1, arch.mid_block_scale_factor)


def time_embedding_module(arch: UNetArch, dtype: Any) -> TimestepEmbedding:
    """The ``time_embedding`` MLP (assign to ``self.time_embedding`` in ``setup``)."""
    return TimestepEmbedding(arch.time_embed_dim, act_fn=arch.act_fn, dtype=dtype)


def embed_timesteps(arch: UNetArch, time_embedding: nn.Module, timesteps: Array, batch: int, dtype: Any) -> Array:
    """Scalar or (B,) timesteps (model units, e.g. 0..999) → (B, time_embed_dim) embedding."""
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    emb = get_timestep_embedding(t, arch.block_out_channels[0], arch.flip_sin_to_cos, arch.freq_shift)
    return time_embedding(emb.astype(dtype))


def run_encoder(
    h: Array,
    down_blocks: Sequence[nn.Module],
    mid_block: Optional[nn.Module],
    temb: Array,
    context: Optional[Array],
    features: Optional[Sequence[Array]] = None,
    mix: Optional[Array] = None,
    deterministic: bool = True,
) -> tuple[Array, list[Array]]:
    """Down blocks then mid block from the ``conv_in`` output ``h``.

    Returns (mid output, skip features starting with ``h``). With ``features``/``mix`` (one entry per
    skip point plus one for the mid block), every skip point and the mid output are blended (eq. 10).
    """
    if features is not None:
        h = _blend(h, features[0], mix[0])
    skips = [h]
    for block in down_blocks:
        n = len(skips)
        sub_f = None if features is None else tuple(features[n:])
        sub_m = None if features is None else mix[n:]
        h, block_skips = block(h, temb, context, sub_f, sub_m, deterministic)
        skips += block_skips
    if mid_block is not None:
        h = mid_block(h, temb, context, deterministic)
        if features is not None:
            h = _blend(h, features[len(skips)], mix[len(skips)])
    return h, skips


def has_cross_attention(arch: UNetArch) -> bool:
    """Whether any block of ``arch`` reads ``encoder_hidden_states``."""
    with_transformers = arch.mid_block_type is not None or any(
        t.startswith("CrossAttn") for t in arch.down_block_types + arch.up_block_types
    )
    return arch.cross_attention_dim is not None and with_transformers


def check_context(arch: UNetArch, context: Optional[Array]) -> None:
    """A model with cross-attention needs a context; diffusers would silently self-attend instead."""
    if context is None and has_cross_attention(arch):
        raise ValueError(
            f"this model has cross-attention (cross_attention_dim={arch.cross_attention_dim}); pass "
            "encoder_hidden_states, or build it from a config with cross_attention_dim=None"
        )


class UNet2DConditionModel(nn.Module):
    """diffusers' UNet2DConditionModel on NHWC inputs.

    ``remat`` names a ``jax.checkpoint_policies`` policy applied per block (None = no remat);
    ``attention_implementation`` is passed to ``jax.nn.dot_product_attention``. Output is fp32.
    """

    arch: UNetArch
    dtype: Any = jnp.float32
    remat: Optional[str] = None
    attention_implementation: AttentionImpl = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Any = jnp.float32, **options: Any) -> "UNet2DConditionModel":
        """Build from a diffusers ``config.json`` dict; ``options``: ``remat``, ``attention_implementation``."""
        return cls(UNetArch.from_config(config), dtype=dtype, **options)

    def to_config(self) -> dict[str, Any]:
        """A diffusers ``config.json`` dict for this architecture (round-trips through ``from_config``)."""
        return {"_class_name": "UNet2DConditionModel", **self.arch.to_config()}

    @staticmethod
    def dummy_inputs(config: Mapping[str, Any], batch: int = 1) -> tuple[Array, Array, Optional[Array]]:
        """(sample, timesteps, encoder_hidden_states) for ``init`` / ``jax.eval_shape`` (small spatial size)."""
        arch = UNetArch.from_config(config)
        size = 2 ** max(3, len(arch.block_out_channels) - 1)
        sample = jnp.zeros((batch, size, size, arch.in_channels), jnp.float32)
        context = None if arch.cross_attention_dim is None else jnp.zeros((batch, 8, arch.cross_attention_dim), jnp.float32)
        return sample, jnp.zeros((batch,), jnp.int32), context

    def setup(self) -> None:
        arch = self.arch
        common = block_common(arch, self.dtype, self.attention_implementation)
        self.conv_in = conv2d(arch.block_out_channels[0], arch.conv_in_kernel, dtype=self.dtype)
        self.time_embedding = time_embedding_module(arch, self.dtype)
        self.down_blocks = build_down_blocks(arch, common, self.remat)
        self.mid_block = build_mid_block(arch, common, self.remat)
        up_cls = maybe_remat(UpBlock, self.remat, _UP_STATIC)
        rev = arch.block_out_channels[::-1]
        n = len(rev)
        self.up_blocks = [
            up_cls(common, rev[i], arch.layers_per_block[::-1][i] + 1, t == "CrossAttnUpBlock2D",
                   arch.num_attention_heads[::-1][i], arch.transformer_layers_per_block[::-1][i],
                   arch.only_cross_attention[::-1][i], i < n - 1, arch.resnet_out_scale_factor)
            for i, t in enumerate(arch.up_block_types)
        ]
        self.conv_norm_out = nn.GroupNorm(arch.norm_num_groups, epsilon=arch.norm_eps, dtype=self.dtype, param_dtype=jnp.float32)
        self.conv_out = conv2d(arch.out_channels, arch.conv_out_kernel, dtype=self.dtype)

    def embed_time(self, timesteps: Array, batch: int) -> Array:
        """The time embedding ``temb`` (shared with the CoDi conditional encoder)."""
        return embed_timesteps(self.arch, self.time_embedding, timesteps, batch, self.dtype)

    def encode(self, sample: Array, timesteps: Array, encoder_hidden_states: Optional[Array] = None) -> Array:
        """The encoder half alone (``conv_in``, down blocks, mid block): its output (B, h, w, C),
        the compressed features a latent discriminator reads (Flash Diffusion's adversarial loss).
        Run with ``apply(..., method="encode")``; the up path's parameters are not touched."""
        check_context(self.arch, encoder_hidden_states)
        h, _, _, _ = self._encoder(sample, timesteps, encoder_hidden_states)
        return h.astype(jnp.float32)

    def _encoder(self, sample: Array, timesteps: Array, encoder_hidden_states: Optional[Array],
                 features: Optional[Sequence[Array]] = None, mix: Optional[Array] = None,
                 deterministic: bool = True) -> tuple[Array, list[Array], Array, Optional[Array]]:
        """The shared first half of ``__call__`` and ``encode``: (mid output, skips, temb, context)."""
        x = sample.astype(self.dtype)
        if self.arch.center_input_sample:
            x = 2 * x - 1.0
        context = None if encoder_hidden_states is None else encoder_hidden_states.astype(self.dtype)
        temb = self.embed_time(timesteps, x.shape[0])
        h, skips = run_encoder(self.conv_in(x), self.down_blocks, self.mid_block, temb, context,
                               features, mix, deterministic)
        return h, skips, temb, context

    def __call__(
        self,
        sample: Array,
        timesteps: Array,
        encoder_hidden_states: Optional[Array] = None,
        down_block_additional_residuals: Optional[Sequence[Array]] = None,
        mid_block_additional_residual: Optional[Array] = None,
        encoder_features: Optional[Sequence[Array]] = None,
        encoder_mix: Optional[Array] = None,
        deterministic: bool = True,
    ) -> Array:
        """NHWC ``sample`` (B, H, W, in_channels) → raw prediction (B, H, W, out_channels), fp32.

        ``down_block_additional_residuals``/``mid_block_additional_residual``: ControlNet outputs,
        added to the skips and the mid output. ``encoder_features`` (``num_skip_points + 1``
        arrays) with ``encoder_mix`` (μ: a scalar, one per feature, or one per example and feature
        (B, features)): the CoDi blend of eq. 10.
        """
        arch = self.arch
        check_context(arch, encoder_hidden_states)
        if (encoder_features is None) != (encoder_mix is None):
            raise ValueError("encoder_features and encoder_mix must be given together")
        mix = None
        if encoder_features is not None:
            if len(encoder_features) != arch.num_skip_points + 1:
                raise ValueError(f"expected {arch.num_skip_points + 1} encoder_features, got {len(encoder_features)}")
            mix = jnp.asarray(encoder_mix, jnp.float32)
            # Indexed by feature: (features,), or (features, B) for a per-example μ(t).
            mix = mix.T if mix.ndim == 2 else jnp.broadcast_to(mix, (len(encoder_features),))
        h, skips, temb, context = self._encoder(sample, timesteps, encoder_hidden_states,
                                                encoder_features, mix, deterministic)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"expected {len(skips)} down_block_additional_residuals, got {len(down_block_additional_residuals)}"
                )
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(h.dtype)
        for i, block in enumerate(self.up_blocks):
            k = block.num_layers
            block_skips, skips = skips[-k:], skips[:-k]
            # Odd sizes: upsample to the next skip's size instead of exactly ×2 (as diffusers does).
            size = tuple(skips[-1].shape[1:3]) if block.add_upsample else None
            h = block(h, tuple(block_skips), temb, context, size, deterministic)
        h = activation(arch.act_fn)(self.conv_norm_out(h))
        return self.conv_out(h).astype(jnp.float32)
