"""Can the miniature autoencoder's architecture learn flat saturated colours at all?

Trains a fresh autoencoder of ``config_lib.MINI_VAE``'s architecture (``--groups`` overrides its
``norm_num_groups``) on pictures that are nothing but flat colours and two-colour splits, drawn
anywhere in the RGB cube, at one picture size (``--size``), with L1 + L2 on the posterior mode,
then prints ``probe_vae_colors.py``'s ``flat_colours`` (reconstruction PSNR of flat pictures of
96 seeded uniform-RGB colours, overall and by saturation) at several picture sizes.

If it learns them at the training size, the shipped autoencoder's failure on saturated colours
(``probe_vae_colors.py``) comes from what its training pictures hold, not from its architecture;
the PSNR at other sizes says how much a flat picture's reconstruction depends on its size (the
GroupNorm statistics of a flat picture come from its borders). The mini_sd README has the numbers.

    python tools/probe_vae_flat.py [--groups=16] [--size=32] [--steps=800]   (about 5 minutes)
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from codi_jax import config_lib
from codi_jax.models.vae import AutoencoderKL
from probe_vae_colors import _flat_colours  # the same colours and scores as that probe


def flat_and_split_pictures(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    """``batch`` pictures in [−1, 1]: half flat colours, half split in two colours at a random column."""
    colours = rng.random((batch, 2, 3)) * 2 - 1
    pictures = np.broadcast_to(colours[:, 0, None, None], (batch, size, size, 3)).copy()
    split = rng.random(batch) < 0.5
    right = np.arange(size)[None, :, None] >= rng.integers(2, size - 2, batch)[:, None, None]
    pictures[split] = np.where(right[split][..., None], colours[split, 1, None, None], pictures[split])
    return pictures.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=config_lib.MINI_VAE["norm_num_groups"])
    parser.add_argument("--size", type=int, default=32, help="training picture side")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval_sizes", default="16,32,64,128")
    args = parser.parse_args()

    config = dict(config_lib.MINI_VAE, norm_num_groups=args.groups)
    vae = AutoencoderKL.from_config(config)
    params = jax.jit(vae.init)(jax.random.PRNGKey(0), *AutoencoderKL.dummy_inputs(config))["params"]
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)

    def loss_fn(p, x):
        rec = vae.apply({"params": p}, x)
        return jnp.mean(jnp.abs(rec - x)) + jnp.mean(jnp.square(rec - x))

    @jax.jit
    def step(p, o, x):
        loss, grads = jax.value_and_grad(loss_fn)(p, x)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    rng = np.random.default_rng(0)
    for _ in range(args.steps):
        params, opt_state, loss = step(params, opt_state, flat_and_split_pictures(rng, args.batch, args.size))

    rec_fn = jax.jit(lambda x: jnp.clip(vae.apply({"params": params}, x), -1.0, 1.0))
    out = {"groups": args.groups, "train_size": args.size, "steps": args.steps, "final_loss": float(loss)}
    for size in (int(s) for s in args.eval_sizes.split(",")):
        out[f"flat {size} px"] = _flat_colours(rec_fn, size=size)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
