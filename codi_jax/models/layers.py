"""Building blocks shared by the UNet, ControlNet, CoDi adapters and the VAE.

All modules take NHWC (images) or (batch, tokens, channels) (sequences) inputs. Submodule names
mirror diffusers' PyTorch attribute names (``conv1``, ``time_emb_proj``, ``to_q``, ``to_out_0``...),
so a torch state-dict key maps to a Flax parameter path by renaming and transposing only.

Parameters are kept in ``param_dtype`` (fp32 master weights); ``dtype`` is the compute dtype
(e.g. bf16 on TPU). Normalisations reduce in fp32 regardless (Flax default), so bf16 compute does
not lose the statistics' precision.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
AttentionImpl = Optional[Literal["xla", "cudnn"]]


def conv2d(
    features: int,
    kernel: int,
    stride: int = 1,
    padding: Optional[int] = None,
    dtype: jnp.dtype = jnp.float32,
    name: Optional[str] = None,
    use_bias: bool = True,
    zero_init: bool = False,
) -> nn.Conv:
    """A Conv with PyTorch's symmetric integer padding (default ``(kernel - 1) // 2``).

    Flax's ``'SAME'`` pads asymmetrically for strided convs on even inputs, which would not match
    the pretrained PyTorch weights; explicit padding does. ``zero_init`` initialises kernel and
    bias to zero (ControlNet's "zero convolutions").
    """
    init = {"kernel_init": nn.initializers.zeros_init(), "bias_init": nn.initializers.zeros_init()} if zero_init else {}
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
        **init,
    )


def get_timestep_embedding(
    timesteps: Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> Array:
    """Sinusoidal embedding of (B,) timesteps → (B, embedding_dim), float32.

    Frequencies are ``exp(-log(max_period) * i / (half - downscale_freq_shift))``; SD uses
    ``flip_sin_to_cos=True, freq_shift=0`` which puts the cosines first.
    """
    timesteps = jnp.asarray(timesteps, jnp.float32)
    half = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = timesteps[:, None] * jnp.exp(exponent)[None, :] * scale
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def activation(name: str):
    """Activation by diffusers' ``act_fn`` name."""
    table = {
        "silu": nn.silu,
        "swish": nn.silu,
        "gelu": lambda x: nn.gelu(x, approximate=False),  # PyTorch's default GELU is the exact one
        "relu": nn.relu,
        "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
    }
    if name not in table:
        raise ValueError(f"act_fn={name!r} is not supported (choose from {sorted(table)})")
    return table[name]


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: ``linear_1`` → act → ``linear_2``."""

    time_embed_dim: int
    out_dim: Optional[int] = None
    act_fn: str = "silu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: Array) -> Array:
        emb = nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=jnp.float32, name="linear_1")(emb)
        emb = activation(self.act_fn)(emb)
        return nn.Dense(self.out_dim or self.time_embed_dim, dtype=self.dtype, param_dtype=jnp.float32, name="linear_2")(emb)


class ResnetBlock2D(nn.Module):
    """GroupNorm → act → conv3x3 (+ projected time embedding) → GroupNorm → act → dropout → conv3x3,
    plus a (1x1-conv projected, when channels change) shortcut, divided by ``output_scale_factor``.

    ``groups_out`` defaults to ``groups``; ``temb`` may be None (VAE), in which case no
    ``time_emb_proj`` is created when ``use_time_emb=False``.
    """

    out_channels: int
    groups: int = 32
    groups_out: Optional[int] = None
    eps: float = 1e-6
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    use_time_emb: bool = True
    act_fn: str = "silu"
    conv_shortcut_kernel: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array] = None, deterministic: bool = True) -> Array:
        act = activation(self.act_fn)
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, param_dtype=jnp.float32, name="norm1")(x)
        h = act(h)
        h = conv2d(self.out_channels, 3, dtype=self.dtype, name="conv1")(h)
        if self.use_time_emb:
            if temb is None:
                raise ValueError("ResnetBlock2D(use_time_emb=True) needs a time embedding")
            t = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=jnp.float32, name="time_emb_proj")(act(temb))
            h = h + t[:, None, None, :]
        groups_out = self.groups_out or self.groups
        h = nn.GroupNorm(groups_out, epsilon=self.eps, dtype=self.dtype, param_dtype=jnp.float32, name="norm2")(h)
        h = act(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv2d(self.out_channels, 3, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, self.conv_shortcut_kernel, dtype=self.dtype, name="conv_shortcut")(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out_0``).

    Self-attention when ``context`` is None, cross-attention otherwise. 4-D NHWC inputs are
    flattened to tokens and reshaped back (VAE mid-block style); ``norm_num_groups`` adds the
    pre-attention ``group_norm`` and ``residual_connection`` the skip (both used by the VAE).
    ``upcast`` computes the scores and softmax in fp32 (SD 2.x ``upcast_attention``; the VAE's
    ``upcast_softmax``), which keeps bf16 runs from overflowing.
    """

    heads: int
    dim_head: int
    out_dim: Optional[int] = None  # default: the query's channel count
    bias: bool = False
    out_bias: bool = True
    upcast: bool = False
    norm_num_groups: Optional[int] = None
    norm_eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    dropout: float = 0.0
    implementation: AttentionImpl = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, context: Optional[Array] = None, deterministic: bool = True) -> Array:
        residual = x
        spatial = x.shape[1:3] if x.ndim == 4 else None
        if spatial is not None:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.norm_num_groups is not None:
            x = nn.GroupNorm(
                self.norm_num_groups, epsilon=self.norm_eps, dtype=self.dtype, param_dtype=jnp.float32, name="group_norm"
            )(x)
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda f, b, n: nn.Dense(f, use_bias=b, dtype=self.dtype, param_dtype=jnp.float32, name=n)
        q = dense(inner, self.bias, "to_q")(x)
        k = dense(inner, self.bias, "to_k")(context)
        v = dense(inner, self.bias, "to_v")(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
        q, k, v = split(q), split(k), split(v)
        out_dtype = q.dtype
        if self.upcast:
            q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
        h = jax.nn.dot_product_attention(q, k, v, scale=self.dim_head**-0.5, implementation=self.implementation)
        h = h.astype(out_dtype).reshape(h.shape[0], h.shape[1], inner)
        h = dense(self.out_dim or residual.shape[-1], self.out_bias, "to_out_0")(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        if spatial is not None:
            h = h.reshape(h.shape[0], *spatial, h.shape[-1])
        if self.residual_connection:
            h = h + residual
        if self.rescale_output_factor != 1.0:
            h = h / self.rescale_output_factor
        return h


class Downsample2D(nn.Module):
    """Halves H and W: a stride-2 3x3 ``conv`` (or 2x2 average pooling when ``use_conv=False``).

    ``padding=1`` pads symmetrically (UNet); ``padding=0`` first pads one row/column at the bottom
    and right, as the SD VAE encoder does.
    """

    out_channels: Optional[int] = None
    use_conv: bool = True
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if not self.use_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv2d(self.out_channels or x.shape[-1], 3, stride=2, padding=self.padding, dtype=self.dtype, name="conv")(x)


def _nearest_resize(x: Array, size: Sequence[int]) -> Array:
    """Nearest-neighbour resize with PyTorch's index rule ``src = floor(dst * in / out)``."""
    for axis, out in zip((1, 2), size):
        n = x.shape[axis]
        if out == 2 * n:
            x = jnp.repeat(x, 2, axis=axis)
        elif out != n:
            idx = (jnp.arange(out) * n) // out
            x = jnp.take(x, idx, axis=axis)
    return x


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2 (or to ``output_size``) followed by a 3x3 ``conv``."""

    out_channels: Optional[int] = None
    use_conv: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, output_size: Optional[Sequence[int]] = None) -> Array:
        size = tuple(output_size) if output_size is not None else (2 * x.shape[1], 2 * x.shape[2])
        x = _nearest_resize(x, size)
        if self.use_conv:
            x = conv2d(self.out_channels or x.shape[-1], 3, dtype=self.dtype, name="conv")(x)
        return x


def remat_policy(name: Optional[str]):
    """``jax.checkpoint_policies`` entry by name (e.g. ``'nothing_saveable'``); None disables remat."""
    if name is None:
        return None
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None or not callable(policy):
        raise ValueError(f"remat_policy={name!r} is not a jax.checkpoint_policies name")
    return policy


def maybe_remat(module_cls: type, policy_name: Optional[str], static_argnums: tuple[int, ...] = ()) -> type:
    """``nn.remat(module_cls)`` with the named policy, or the class unchanged when remat is off.

    ``static_argnums`` counts ``self`` as 0 (Flax's convention) and must cover Python-valued
    arguments such as ``deterministic``.
    """
    if policy_name is None:
        return module_cls
    return nn.remat(module_cls, policy=remat_policy(policy_name), static_argnums=static_argnums)
