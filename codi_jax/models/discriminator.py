"""The latent discriminator head of Flash Diffusion's adversarial loss (eq. 4): a small CNN on the
frozen teacher UNet's encoder output (``UNet2DConditionModel.encode``), as the paper describes it:
convolutions of kernel 4 and stride 2, GroupNorm, SiLU, then a 1x1 convolution to one real/fake
score per remaining location."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class LatentDiscriminator(nn.Module):
    """(B, h, w, C) teacher features → (B, ⌈h / 2^num_layers⌉, ⌈w / 2^num_layers⌉) scores (fp32).

    Padding is ``SAME`` (⌈n / 2⌉ per layer; there are no pretrained weights to match), so a 1x1
    input stays 1x1 and the head applies to the mid-block output of any UNet depth."""

    channels: int = 128
    num_layers: int = 2
    groups: int = 32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        h = features.astype(jnp.float32)
        for i in range(self.num_layers):
            h = nn.Conv(self.channels, (4, 4), strides=(2, 2), padding="SAME", name=f"conv_{i}")(h)
            h = nn.GroupNorm(min(self.groups, self.channels), name=f"norm_{i}")(h)
            h = nn.silu(h)
        return nn.Conv(1, (1, 1), name="conv_out")(h)[..., 0]
