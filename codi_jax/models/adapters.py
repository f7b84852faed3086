"""Adapting a pretrained (unconditional / text-to-image) UNet into a conditional one (paper §4.1, §4.4).

Two adapters, both initialised from the pretrained UNet so that the adapted model starts out
computing exactly the pretrained function:

* ``'cond_encoder'`` (full CoDi, eq. 10): :class:`CondEncoder` duplicates the UNet's ``conv_in``,
  down blocks and mid block and reads the condition c. Its features h_η(c) are blended into the
  UNet's encoder features, ``h' = (1 - μ) h_θ(z_t) + μ h_η(c)``, at every skip point and the mid
  output; μ is learnable and starts at 0. The UNet's forward continues from the blended values.
* ``'controlnet'`` (PE-CoDi, §4.4 / Fig. 4): a diffusers-keyed :class:`ControlNetModel` on z_t
  plus the hint embedding of c; zero-initialised 1x1 convs add its outputs to the UNet's skips and
  mid block. Usually trained with the UNet frozen (``trainable_mask(params, 'adapter')``).

:class:`ConditionedUNet` is the single entry point used by trainer and loss:
``model.apply({'params': p}, z_t, timesteps, cond, context)`` with
``p = {'unet': <diffusers UNet params>, 'adapter': <adapter params>}``.

Adapted-model config (a JSON-able dict, so it can be stored with checkpoints)::

    {"unet": <diffusers UNet config.json dict>,
     "adapter": "cond_encoder" | "controlnet" | "none",
     "cond_channels": 4,                 # channels of c
     "cond_embedding_channels": None,    # None: c is latent-sized; a tuple: hint stem, c is
                                         # 2**(len - 1) times larger (pixel space: (16, 32, 96, 256))
     "per_level_mu": False,              # one μ per blend point instead of one global μ
     "mu_knots": 1}                      # 1: μ is a learned constant (the paper); K > 1: μ(t) is
                                         # piecewise linear in t on K equally spaced knots
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from codi_jax.models.controlnet import ControlNetConditioningEmbedding, ControlNetModel
from codi_jax.models.layers import AttentionImpl, conv2d
from codi_jax.models.unet import (
    UNet2DConditionModel,
    UNetArch,
    block_common,
    build_down_blocks,
    build_mid_block,
    run_encoder,
)

Array = jax.Array
ADAPTERS: tuple[str, ...] = ("cond_encoder", "controlnet", "none")

# Hint stem of a ControlNet adapter whose condition is already latent-sized (no downsampling):
# diffusers' stem with a single stage, i.e. conv_in → SiLU → zero conv_out.
LATENT_HINT_CHANNELS: tuple[int, ...] = (64,)

_ADAPTED_KEYS = ("unet", "adapter", "cond_channels", "cond_embedding_channels", "per_level_mu", "mu_knots")
# The UNet's timestep range (diffusers' num_train_timesteps): μ(t)'s knots span [0, TIMESTEP_RANGE].
TIMESTEP_RANGE = 1000.0


def _check_adapted_config(config: Mapping[str, Any]) -> None:
    if "unet" not in config:
        raise ValueError("adapted-model config needs a 'unet' entry (the diffusers UNet config dict)")
    unknown = sorted(set(config) - set(_ADAPTED_KEYS))
    if unknown:
        raise ValueError(f"unknown adapted-model config keys {unknown} (known: {_ADAPTED_KEYS})")
    if config.get("adapter", "cond_encoder") not in ADAPTERS:
        raise ValueError(f"unsupported config value adapter={config['adapter']!r} (choose from {ADAPTERS})")


def _embedding_channels(config: Mapping[str, Any]) -> Optional[tuple[int, ...]]:
    chans = config.get("cond_embedding_channels")
    return None if chans is None else tuple(int(c) for c in chans)


def cond_downscale(config: Mapping[str, Any]) -> int:
    """How much larger (per side) the condition is than z_t for this adapted-model config."""
    chans = _embedding_channels(config)
    return 1 if chans is None else 2 ** (len(chans) - 1)


def controlnet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers ``ControlNetModel`` config of a ``'controlnet'`` adapter (for export / reload)."""
    _check_adapted_config(config)
    unet = dict(config["unet"])
    keep = (
        "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
        "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
        "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
        "attention_head_dim", "num_attention_heads", "use_linear_projection", "upcast_attention", "mid_block_type",
    )
    out = {k: unet[k] for k in keep if k in unet}
    out["_class_name"] = "ControlNetModel"
    out["conditioning_channels"] = int(config.get("cond_channels", 4))
    out["conditioning_embedding_out_channels"] = list(_embedding_channels(config) or LATENT_HINT_CHANNELS)
    return out


class CondEncoder(nn.Module):
    """The CoDi conditional encoder h_η: a copy of the UNet encoder that reads c (not z_t).

    A latent-sized c goes through ``conv_in`` (initialised from the UNet's, re-shaped to
    ``cond_channels``); with ``embedding_channels`` a learned hint stem (``cond_embedding``, the
    ControlNet stem without the zero output conv) maps a larger, e.g. pixel-space, c to the first
    feature map instead. Returns ``(features, μ)``: one feature per UNet skip point plus the mid
    output, and μ: a scalar, or one per feature with ``per_level_mu``; with ``mu_knots`` = K > 1,
    μ(t) is the piecewise-linear interpolation of K learned values at equally spaced t ∈ [0, 1],
    one per example and feature, (B, features). A constant μ has to trade the low-noise steps, where
    z_t says most and the blend should stay near 0, against t ≈ 1, where z_t is noise and only the
    condition informs x̂ (the 1-step sampler); μ(t) needs no such compromise. All start at 0.
    """

    arch: UNetArch
    cond_channels: int = 4
    embedding_channels: Optional[tuple[int, ...]] = None
    per_level_mu: bool = False
    mu_knots: int = 1
    dtype: Any = jnp.float32
    remat: Optional[str] = None
    attention_implementation: AttentionImpl = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Any = jnp.float32, **options: Any) -> "CondEncoder":
        """Build from an adapted-model config (module docstring); ``options``: ``remat``, ``attention_implementation``."""
        _check_adapted_config(config)
        return cls(
            UNetArch.from_config(config["unet"]),
            cond_channels=int(config.get("cond_channels", 4)),
            embedding_channels=_embedding_channels(config),
            per_level_mu=bool(config.get("per_level_mu", False)),
            mu_knots=int(config.get("mu_knots", 1)),
            dtype=dtype,
            **options,
        )

    @staticmethod
    def dummy_inputs(config: Mapping[str, Any], batch: int = 1) -> tuple[Array, Array, Array, Optional[Array]]:
        """(cond, temb, timesteps, context) for ``init`` / ``jax.eval_shape``."""
        sample, timesteps, context = UNet2DConditionModel.dummy_inputs(config["unet"], batch)
        size = sample.shape[1] * cond_downscale(config)
        cond = jnp.zeros((batch, size, size, int(config.get("cond_channels", 4))), jnp.float32)
        arch = UNetArch.from_config(config["unet"])
        return cond, jnp.zeros((batch, arch.time_embed_dim), jnp.float32), timesteps, context

    def setup(self) -> None:
        arch = self.arch
        common = block_common(arch, self.dtype, self.attention_implementation)
        if self.embedding_channels is None:
            self.conv_in = conv2d(arch.block_out_channels[0], arch.conv_in_kernel, dtype=self.dtype)
        else:
            self.cond_embedding = ControlNetConditioningEmbedding(
                arch.block_out_channels[0], self.embedding_channels, zero_out=False, dtype=self.dtype
            )
        self.down_blocks = build_down_blocks(arch, common, self.remat)
        self.mid_block = build_mid_block(arch, common, self.remat)
        if self.mu_knots < 1:
            raise ValueError(f"mu_knots: need at least 1, got {self.mu_knots}")
        shape = (arch.num_skip_points + 1,) if self.per_level_mu else ()
        self.mu = self.param("mu", nn.initializers.zeros_init(), ((self.mu_knots,) if self.mu_knots > 1 else ()) + shape)

    def __call__(
        self, cond: Array, temb: Array, timesteps: Array, context: Optional[Array], deterministic: bool = True
    ) -> tuple[list[Array], Array]:
        c = cond.astype(self.dtype)
        h = self.conv_in(c) if self.embedding_channels is None else self.cond_embedding(c)
        mid, skips = run_encoder(h, self.down_blocks, self.mid_block, temb, context, deterministic=deterministic)
        features = skips + [mid]
        return features, self.gate(timesteps, cond.shape[0], len(features))

    def gate(self, timesteps: Array, batch: int, num_features: int) -> Array:
        """μ at ``timesteps`` (the UNet's units): the learned constant(s), or μ(t) (B, features)."""
        if self.mu_knots == 1:
            return self.mu
        u = jnp.clip(jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,)) / TIMESTEP_RANGE, 0.0, 1.0)
        knots = jnp.linspace(0.0, 1.0, self.mu_knots)
        values = self.mu.reshape(self.mu_knots, -1).astype(jnp.float32)  # (K, 1 or features)
        mu = jax.vmap(lambda v: jnp.interp(u, knots, v), in_axes=1, out_axes=1)(values)
        return jnp.broadcast_to(mu, (batch, num_features))


class ConditionedUNet(nn.Module):
    """Pretrained UNet + adapter: ``(z_t, timesteps, cond, context)`` → raw prediction shaped like z_t.

    Params: ``{'unet': ..., 'adapter': ...}`` (no ``'adapter'`` for ``adapter=None``, i.e. ``'none'``).
    """

    unet: UNet2DConditionModel
    adapter: Optional[nn.Module] = None  # CondEncoder | ControlNetModel | None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], dtype: Any = jnp.float32, **options: Any) -> "ConditionedUNet":
        """Build from an adapted-model config (module docstring); ``options`` (``remat``,
        ``attention_implementation``) apply to UNet and adapter alike."""
        _check_adapted_config(config)
        unet = UNet2DConditionModel.from_config(config["unet"], dtype, **options)
        kind = config.get("adapter", "cond_encoder")
        if kind == "cond_encoder":
            adapter = CondEncoder.from_config(config, dtype, **options)
        elif kind == "controlnet":
            adapter = ControlNetModel.from_config(controlnet_config(config), dtype, **options)
        else:
            adapter = None
        return cls(unet, adapter)

    @staticmethod
    def dummy_inputs(config: Mapping[str, Any], batch: int = 1) -> tuple[Array, Array, Array, Optional[Array]]:
        """(z_t, timesteps, cond, context) for ``init`` / ``jax.eval_shape``."""
        _check_adapted_config(config)
        sample, timesteps, context = UNet2DConditionModel.dummy_inputs(config["unet"], batch)
        size = sample.shape[1] * cond_downscale(config)
        cond = jnp.zeros((batch, size, size, int(config.get("cond_channels", 4))), jnp.float32)
        return sample, timesteps, cond, context

    def __call__(
        self,
        z_t: Array,
        timesteps: Array,
        cond: Optional[Array],
        context: Optional[Array] = None,
        deterministic: bool = True,
    ) -> Array:
        """NHWC ``z_t``, timesteps in the UNet's units (SD: 0..999, scalar or (B,)), condition ``cond``
        (NHWC, latent-sized or ``cond_downscale`` times larger; ignored without adapter), text
        ``context`` (None for models without cross-attention) → fp32 prediction shaped like ``z_t``."""
        if isinstance(self.adapter, CondEncoder):
            temb = self.unet.embed_time(timesteps, z_t.shape[0])
            features, mu = self.adapter(cond, temb, timesteps, context, deterministic)
            return self.unet(z_t, timesteps, context, encoder_features=features, encoder_mix=mu, deterministic=deterministic)
        if isinstance(self.adapter, ControlNetModel):
            down, mid = self.adapter(z_t, timesteps, context, cond, deterministic=deterministic)
            return self.unet(z_t, timesteps, context, down, mid, deterministic=deterministic)
        return self.unet(z_t, timesteps, context, deterministic=deterministic)


def _copy(tree: Any) -> Any:
    # Fresh buffers: the adapter must not alias the UNet's arrays, or donating params to a jitted
    # train step would donate one buffer twice.
    return jax.tree_util.tree_map(jnp.array, tree)


def _reshape_conv_in(kernel: Array, in_channels: int) -> Array:
    """Pretrained conv_in kernel (k, k, C_unet, C) → (k, k, in_channels, C): shared channels copied, extra ones zero."""
    n = min(kernel.shape[2], in_channels)
    out = jnp.zeros(kernel.shape[:2] + (in_channels,) + kernel.shape[3:], kernel.dtype)
    return out.at[:, :, :n].set(kernel[:, :, :n])


def init_adapted_params(config: Mapping[str, Any], unet_params: Mapping[str, Any], rng: jax.Array) -> dict[str, Any]:
    """Params of ``ConditionedUNet.from_config(config)`` that, at initialisation, compute exactly the
    pretrained UNet given by ``unet_params`` (for any condition).

    The adapter's encoder (``conv_in``, ``down_blocks_*``, ``mid_block``; for ControlNet also
    ``time_embedding``) is a copy of ``unet_params``; μ = 0; ControlNet's zero convs and hint-stem
    output are zero. Only the hint stem is randomly initialised (from ``rng``), so no random
    encoder is ever materialised (it would be discarded; at SD scale that is ~0.3 B values).
    """
    params: dict[str, Any] = {"unet": dict(unet_params)}
    adapter = ConditionedUNet.from_config(config).adapter
    if adapter is None:
        return params
    is_controlnet = isinstance(adapter, ControlNetModel)
    inputs = ControlNetModel.dummy_inputs(controlnet_config(config)) if is_controlnet else CondEncoder.dummy_inputs(config)
    target = jax.eval_shape(adapter.init, rng, *inputs)["params"]
    copied = [name for name in target if copied_from_unet(name, is_controlnet)]
    if is_controlnet:
        stem = ControlNetConditioningEmbedding(adapter.arch.block_out_channels[0], adapter.conditioning_embedding_out_channels)
        fresh = {"controlnet_cond_embedding": stem.init(rng, inputs[3])["params"]}
        for name in target:
            if name.startswith("controlnet_down_blocks_") or name == "controlnet_mid_block":
                fresh[name] = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), target[name])
    else:
        fresh = {"mu": jnp.zeros(target["mu"].shape, jnp.float32)}
        if adapter.embedding_channels is None:
            kernel = unet_params["conv_in"]["kernel"]
            fresh["conv_in"] = {
                "kernel": _reshape_conv_in(kernel, adapter.cond_channels),
                "bias": jnp.array(unet_params["conv_in"]["bias"]),
            }
        else:
            stem = ControlNetConditioningEmbedding(adapter.arch.block_out_channels[0], adapter.embedding_channels, zero_out=False)
            fresh["cond_embedding"] = stem.init(rng, inputs[0])["params"]
    for name in copied:
        fresh[name] = _copy(unet_params[name])
    shapes = lambda tree: jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype)), tree)
    if shapes(fresh) != shapes(dict(target)):
        raise ValueError("unet_params do not match the UNet described by config['unet'] (adapter shapes differ)")
    params["adapter"] = fresh
    return params


def copied_from_unet(name: str, is_controlnet: bool) -> bool:
    """Whether the adapter's top-level part ``name`` starts as a copy of the pretrained UNet's."""
    return (name.startswith("down_blocks_") or name == "mid_block"
            or (is_controlnet and name in ("conv_in", "time_embedding")))


def new_weights_mask(params: Mapping[str, Any]) -> dict[str, Any]:
    """True for the adapter's parts that copy no pretrained weight (μ, the condition's
    ``conv_in`` / hint stem, ControlNet's zero convs); False for the UNet and the copies."""
    adapter = params.get("adapter", {})
    is_controlnet = "controlnet_cond_embedding" in adapter
    mask = {"unet": jax.tree_util.tree_map(lambda _: False, params["unet"])}
    if "adapter" in params:
        mask["adapter"] = {k: jax.tree_util.tree_map(lambda _, new=not copied_from_unet(k, is_controlnet): new, v)
                           for k, v in adapter.items()}
    if "w_embed" in params:   # a guidance-aware model's w embedding (diffusion/guidance.py)
        mask["w_embed"] = jax.tree_util.tree_map(lambda _: True, params["w_embed"])
    return mask


def trainable_mask(params: Mapping[str, Any], mode: Literal["all", "adapter"]) -> dict[str, Any]:
    """Pytree of bools shaped like ``params`` for ``optax.masked`` / ``optax.multi_transform``.

    ``'all'``: full CoDi, UNet and adapter train. ``'adapter'``: PE-CoDi, the UNet is frozen.
    """
    if mode not in ("all", "adapter"):
        raise ValueError(f"trainable mode {mode!r}: choose 'all' or 'adapter'")
    if mode == "adapter" and "adapter" not in params:
        raise ValueError("trainable mode 'adapter' needs params with an 'adapter' subtree")
    # Besides the adapter, a guidance-aware model's w embedding (diffusion/guidance.py) is new.
    return {
        k: jax.tree_util.tree_map(lambda _: mode == "all" or k in ("adapter", "w_embed"), v)
        for k, v in params.items()
    }
