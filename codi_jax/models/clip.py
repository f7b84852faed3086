"""CLIP text encoder (transformers' ``CLIPTextModel``) in Flax linen, plus tokenizer helpers.

Parameter paths mirror the PyTorch checkpoint keys of Stable Diffusion's ``text_encoder`` folder:
``text_model.encoder.layers.0.self_attn.q_proj.weight`` <-> ``text_model/encoder/layers_0/self_attn/
q_proj/kernel``. The forward pass is a pre-LayerNorm transformer with a causal mask; outputs are
the final-normed last hidden state, every layer's hidden state (for ``clip_skip`` / penultimate-layer
conditioning) and the pooled EOS-token state.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

# transformers checkpoints written before its PR #24773 store eos_token_id = 2; for those the pooled
# token is the position of the largest input id (the EOS id is the largest in CLIP's vocabulary).
_LEGACY_EOS_TOKEN_ID = 2

_ACTIVATIONS = {
    # CLIP's original activation: x * sigmoid(1.702 x).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # transformers' "gelu" is the exact (erf) form; OpenCLIP-H (SD 2.x) uses it.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}

# config.json keys that map onto module fields (same names on both sides).
_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "eos_token_id",
)


@flax.struct.dataclass
class CLIPTextOutput:
    """Outputs of :class:`CLIPTextModel`.

    Attributes:
      last_hidden_state: ``(B, T, D)`` output of the last layer after ``final_layer_norm``.
      pooler_output: ``(B, D)`` ``last_hidden_state`` at each sequence's EOS token.
      hidden_states: ``num_hidden_layers + 1`` arrays ``(B, T, D)``: the embeddings, then each
        layer's output *before* the final LayerNorm (as transformers' ``output_hidden_states``).
    """

    last_hidden_state: Array
    pooler_output: Array
    hidden_states: tuple[Array, ...]


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings."""

    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array) -> Array:
        seq_len = input_ids.shape[-1]
        if seq_len > self.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_position_embeddings {self.max_position_embeddings}"
            )
        tokens = nn.Embed(self.vocab_size, self.hidden_size, dtype=self.dtype, name="token_embedding")
        positions = nn.Embed(
            self.max_position_embeddings, self.hidden_size, dtype=self.dtype, name="position_embedding"
        )
        return tokens(input_ids) + positions(jnp.arange(seq_len))[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate, biased q/k/v/out projections."""

    hidden_size: int
    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        head_dim = self.hidden_size // self.num_heads

        def proj(name: str) -> Array:
            y = nn.Dense(self.hidden_size, dtype=self.dtype, name=name)(x)
            return y.reshape(*y.shape[:-1], self.num_heads, head_dim)

        out = jax.nn.dot_product_attention(
            proj("q_proj"), proj("k_proj"), proj("v_proj"), mask=mask, is_causal=True
        )
        out = out.reshape(*out.shape[:-2], self.hidden_size)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    hidden_size: int
    intermediate_size: int
    hidden_act: str
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = _ACTIVATIONS[self.hidden_act](x)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> Array:
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(self.hidden_size, self.num_heads, dtype=self.dtype, name="self_attn")(h, mask)
        h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layer_norm2")(x)
        mlp = CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, dtype=self.dtype, name="mlp")
        return x + mlp(h)


class CLIPEncoder(nn.Module):
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None) -> tuple[Array, ...]:
        states = [x]
        for i in range(self.num_layers):
            x = CLIPEncoderLayer(
                self.hidden_size,
                self.intermediate_size,
                self.num_heads,
                self.hidden_act,
                self.layer_norm_eps,
                dtype=self.dtype,
                name=f"layers_{i}",
            )(x, mask)
            states.append(x)
        return tuple(states)


class CLIPTextTransformer(nn.Module):
    """The ``text_model`` submodule: embeddings, encoder, final LayerNorm."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.embeddings = CLIPTextEmbeddings(
            self.vocab_size, self.hidden_size, self.max_position_embeddings, dtype=self.dtype
        )
        self.encoder = CLIPEncoder(
            self.num_hidden_layers,
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.hidden_act,
            self.layer_norm_eps,
            dtype=self.dtype,
        )
        self.final_layer_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype)

    def __call__(self, input_ids: Array, attention_mask: Array | None) -> tuple[Array, tuple[Array, ...]]:
        mask = None
        if attention_mask is not None:
            # Padding mask over keys, (B, 1, 1, S); the causal part comes from is_causal.
            mask = attention_mask.astype(bool)[:, None, None, :]
        states = self.encoder(self.embeddings(input_ids), mask)
        return self.final_layer_norm(states[-1]), states


class CLIPTextModel(nn.Module):
    """transformers' ``CLIPTextModel``: ``apply(params, input_ids, attention_mask=None)``.

    ``input_ids``: int ``(B, T)`` with ``T <= max_position_embeddings``. ``attention_mask``: optional
    ``(B, T)`` with 1 for real tokens and 0 for padding (Stable Diffusion passes none: padding tokens
    are attended to, which is what its UNet was trained with). Returns :class:`CLIPTextOutput`.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # transformers' CLIPTextConfig default
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        self.text_model = CLIPTextTransformer(
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.max_position_embeddings,
            self.hidden_act,
            self.layer_norm_eps,
            dtype=self.dtype,
        )

    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> CLIPTextOutput:
        last, states = self.text_model(input_ids, attention_mask)
        if self.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            # First EOS occurrence: the pad token may equal the EOS token.
            eos_pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=states)

    def encode_prompt(self, input_ids: Array, attention_mask: Array | None = None, clip_skip: int = 0) -> Array:
        """Prompt embeddings for the UNet, as diffusers' Stable Diffusion pipelines compute them.

        ``clip_skip=0`` is ``last_hidden_state``; ``clip_skip=k`` takes the output of the layer ``k``
        before the last and applies ``final_layer_norm`` to it (diffusers' ``clip_skip``). SD 2.x needs
        no skip here: its checkpoint already drops OpenCLIP's last layer (23 of 24 layers).
        """
        if not 0 <= clip_skip < self.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {self.num_hidden_layers})")
        _, states = self.text_model(input_ids, attention_mask)
        return self.text_model.final_layer_norm(states[-(clip_skip + 1)])

    @classmethod
    def from_config(cls, config: dict, dtype: Dtype = jnp.float32, **options: Any) -> "CLIPTextModel":
        """Builds the model from a transformers ``CLIPTextConfig`` dict (``text_encoder/config.json``).

        Unknown keys are ignored. ``options`` override module fields by name.
        """
        architectures = config.get("architectures") or ["CLIPTextModel"]
        if list(architectures) != ["CLIPTextModel"]:
            raise ValueError(f"architectures={architectures!r} is not supported; only ['CLIPTextModel']")
        if config.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported; use one of {sorted(_ACTIVATIONS)}")
        kwargs = {k: config[k] for k in _CONFIG_FIELDS if config.get(k) is not None}
        if isinstance(kwargs.get("eos_token_id"), list):
            raise ValueError(f"eos_token_id={kwargs['eos_token_id']!r} is not supported; expected one int")
        kwargs.update(options)
        return cls(dtype=dtype, **kwargs)

    @classmethod
    def dummy_inputs(cls, config: dict, batch: int = 1) -> tuple[Array]:
        """``(input_ids,)`` of shape ``(batch, max_position_embeddings)`` for ``init``/``eval_shape``."""
        seq_len = config.get("max_position_embeddings", 77)
        return (jnp.zeros((batch, seq_len), jnp.int32),)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Loads transformers' ``CLIPTokenizer`` from a pipeline folder (its ``tokenizer/``), a tokenizer
    folder, or a hub id of a pipeline (``tokenizer`` subfolder; needs network or the local cache)."""
    from transformers import CLIPTokenizer  # Imported here: the model code does not need transformers.

    path = os.fspath(path)
    if os.path.isdir(path):
        sub = os.path.join(path, "tokenizer")
        return CLIPTokenizer.from_pretrained(sub if os.path.isdir(sub) else path)
    return CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")


def tokenize(tokenizer: Any, texts: str | Sequence[str], max_length: int = 77) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes like diffusers' SD pipelines: pad to ``max_length``, truncate longer prompts.

    Returns ``(input_ids, attention_mask)``, both int32 ``(B, max_length)`` numpy arrays.
    """
    if isinstance(texts, str):
        texts = [texts]
    enc = tokenizer(
        list(texts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
