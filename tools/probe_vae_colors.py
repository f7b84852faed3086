"""Per held-out picture: what an autoencoder costs a latent SR model before any model runs.

For each held-out picture of the SR evaluation (its 64 px crops and Real-ESRGAN inputs, the
evaluation's fixed keys) this prints PSNR (dB) of: the original through the autoencoder
(posterior mode), the same with each crop's mean colour error removed (what a constant colour
shift costs), that mean colour error (R, G, B), bicubic upsampling of the degraded input, and
that input through the autoencoder (the latent a model copying its condition would decode).
No latent SR model can beat the first row; one that copies its condition scores the last.
Then the same reconstruction PSNR for flat 32 px pictures of colours drawn uniformly from the RGB
cube (seeded), by saturation (max − min channel): where the miniature autoencoder fails, even
when trained on saturated colours (its README); and for 32 px crops of unseen smooth colour
fields (``procedural.smooth_field``).

    python tools/probe_vae_colors.py --vae=<VAE folder | pipeline folder | embedded:mini_sd> [--num=128]
"""
from __future__ import annotations

import argparse
import json

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from codi_jax import autoencoder, config_lib
from codi_jax import data as data_lib
from codi_jax.data import procedural
from codi_jax.data.embedded import HELD_OUT_IMAGES
from codi_jax.modeling import load_vae


def _psnr(a: jax.Array, b: jax.Array) -> np.ndarray:
    """Per-image PSNR of images in [−1, 1], measured in [0, 1] like the evaluation."""
    return np.asarray(pix.psnr((jnp.clip(a, -1, 1) + 1) / 2, (b + 1) / 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", default=config_lib.MINI_SD)
    parser.add_argument("--num", type=int, default=128, help="evaluation crops (all pictures)")
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args()

    vae, params = load_vae(args.vae)
    cfg = config_lib.base_config("sr").data
    cfg.image_size = args.image_size
    cfg.embedded.eval_crops_per_image = -(-args.num // len(HELD_OUT_IMAGES))
    rec_fn = jax.jit(lambda x: autoencoder.reconstruct(vae, params, x))
    names = list(HELD_OUT_IMAGES)
    rows: dict[str, dict[str, list]] = {n: {"rec": [], "rec_mean_removed": [], "color_error": [],
                                            "bicubic": [], "input_through_vae": []} for n in names}
    seen = 0
    for batch in data_lib.make_eval_dataset(cfg, global_batch_size=32, process_index=0, process_count=1):
        keep = np.asarray(batch["mask"]).astype(bool)
        image, cond = jnp.asarray(batch["image"]), jnp.asarray(batch["cond"])[..., :3]
        rec = rec_fn(image)
        error = jnp.mean(rec - image, axis=(1, 2), keepdims=True)   # each crop's mean colour error
        columns = {"rec": _psnr(rec, image), "rec_mean_removed": _psnr(rec - error, image),
                   "color_error": np.asarray(error[:, 0, 0, :]) / 2,  # in [0, 1] units
                   "bicubic": _psnr(cond, image), "input_through_vae": _psnr(rec_fn(cond), image)}
        for j in np.flatnonzero(keep):
            # The evaluation's crops are interleaved by picture (embedded.py).
            for key, values in columns.items():
                rows[names[(seen + j) % len(names)]][key].append(values[j])
        seen += int(keep.sum())
        if seen >= args.num:
            break
    table = {n: {k: np.mean(v, axis=0).round(4).tolist() for k, v in r.items()} for n, r in rows.items()}
    every = {k: float(np.mean([x for r in rows.values() for x in r[k]])) for k in rows[names[0]]
             if k != "color_error"}
    print(json.dumps({"vae": args.vae, "crops": seen, "pictures": table, "all": every,
                      "flat_colours": _flat_colours(rec_fn), "smooth_fields": _smooth_fields(rec_fn)}, indent=1))


def _flat_colours(rec_fn, num: int = 96, size: int = 32) -> dict:
    """Mean reconstruction PSNR of flat pictures of uniform-RGB colours, overall and by saturation."""
    colours = np.random.default_rng(0).random((num, 3))
    image = jnp.asarray(np.broadcast_to(colours[:, None, None] * 2 - 1, (num, size, size, 3)), jnp.float32)
    rec = rec_fn(image)
    psnr = _psnr(rec, image)
    saturation = colours.max(1) - colours.min(1)
    centre = (np.asarray(rec[:, size // 2, size // 2]) + 1) / 2
    out = {"all": float(psnr.mean()), "worst": float(psnr.min()),
           # The four worst colours and what comes back at the picture's centre, RGB in [0, 1].
           "worst_colours": [[colours[i].round(2).tolist(), centre[i].round(2).tolist()]
                             for i in np.argsort(psnr)[:4]]}
    for lo, hi in ((0.0, 0.3), (0.3, 0.6), (0.6, 1.0)):
        out[f"saturation {lo}-{hi}"] = float(psnr[(saturation >= lo) & (saturation < hi)].mean())
    return out


def _smooth_fields(rec_fn, num: int = 32, size: int = 32) -> dict[str, float]:
    """Reconstruction PSNR of centre crops of smooth colour fields (``procedural.smooth_field``,
    seeds 10 000 on: never in a train split), what ``data.embedded.procedural_smooth`` trains on."""
    offset = (128 - size) // 2
    image = np.stack([procedural.smooth_field(10_000 + k, 128)[offset:offset + size, offset:offset + size]
                      for k in range(num)]).astype(np.float32) / 127.5 - 1.0
    psnr = _psnr(rec_fn(jnp.asarray(image)), jnp.asarray(image))
    return {"all": float(psnr.mean()), "worst": float(psnr.min())}


if __name__ == "__main__":
    main()
