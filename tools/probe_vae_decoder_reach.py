"""What can the autoencoder's decoder produce at all? Latents optimised directly against the picture.

``probe_vae_colors.py`` measures encode → decode. This probe drops the encoder: for each picture it
starts from the encoder's posterior mode and runs ``--steps`` Adam steps on the latent itself to
minimise the decoder's squared error against the picture, then scores the decoded result. What is
still wrong then is out of the decoder's reach, whatever encoder (or latent SR model) feeds it.
It prints the reconstruction PSNR (dB) of the held-out pictures' 64 px evaluation crops, encoder
latent → optimised latent, and of ``probe_vae_colors.py``'s flat colours (by saturation) and
smooth colour fields through the optimised latents.

    python tools/probe_vae_decoder_reach.py --vae=<VAE | pipeline folder | embedded:mini_sd> [--steps=150]

About 10 minutes for the shipped autoencoder on one core.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from codi_jax import config_lib
from codi_jax import data as data_lib
from codi_jax.data.embedded import HELD_OUT_IMAGES
from codi_jax.modeling import load_vae
from probe_vae_colors import _flat_colours, _psnr, _smooth_fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", default=config_lib.MINI_SD)
    parser.add_argument("--steps", type=int, default=150, help="Adam steps on each latent")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--crops", type=int, default=16, help="evaluation crops (all pictures)")
    args = parser.parse_args()

    vae, params = load_vae(args.vae)
    decode = lambda z: vae.apply({"params": params}, z, method=vae.decode)
    tx = optax.adam(args.lr)

    @jax.jit
    def best_latent(images: jax.Array) -> jax.Array:
        z = vae.apply({"params": params}, images, method=vae.encode).mode()
        grad = jax.grad(lambda z: jnp.mean(jnp.square(decode(z) - images)))

        def step(carry, _):
            z, opt = carry
            updates, opt = tx.update(grad(z), opt)
            return (optax.apply_updates(z, updates), opt), None

        return jax.lax.scan(step, (z, tx.init(z)), None, args.steps)[0][0]

    reach = jax.jit(lambda images: jnp.clip(decode(best_latent(images)), -1, 1))
    through = jax.jit(lambda images: jnp.clip(
        decode(vae.apply({"params": params}, images, method=vae.encode).mode()), -1, 1))

    cfg = config_lib.base_config("sr").data
    cfg.image_size = 64
    cfg.embedded.eval_crops_per_image = -(-args.crops // len(HELD_OUT_IMAGES))
    crops = [np.asarray(b["image"])[np.asarray(b["mask"]).astype(bool)]
             for b in data_lib.make_eval_dataset(cfg, global_batch_size=32, process_index=0, process_count=1)]
    crops = jnp.asarray(np.concatenate(crops)[:args.crops])
    encoded, optimised = _psnr(through(crops), crops), _psnr(reach(crops), crops)
    # The evaluation's crops are interleaved by picture (embedded.py).
    pictures = {n: {"encoder_latent": float(encoded[i::len(HELD_OUT_IMAGES)].mean()),
                    "optimised_latent": float(optimised[i::len(HELD_OUT_IMAGES)].mean())}
                for i, n in enumerate(HELD_OUT_IMAGES)}
    print(json.dumps({"vae": args.vae, "steps": args.steps, "lr": args.lr, "crops": int(len(crops)),
                      "pictures": pictures,
                      "all": {"encoder_latent": float(encoded.mean()), "optimised_latent": float(optimised.mean())},
                      "flat_colours_optimised": _flat_colours(reach),
                      "smooth_fields_optimised": _smooth_fields(reach)}, indent=1))


if __name__ == "__main__":
    main()
