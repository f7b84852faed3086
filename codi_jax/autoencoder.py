"""Pretraining of a KL autoencoder (diffusers ``AutoencoderKL`` layout): ``objective="autoencoder"``.

The embedded miniature Stable Diffusion needs its own VAE: the teacher diffuses in its latent
space and no SR result can beat what it reconstructs. The objective is the reconstruction part of
the LDM autoencoder recipe (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models", App. G): ``|x − D(z)|₁ + w₂ ‖x − D(z)‖² + w_KL KL(q(z|x) ‖ N(0, I))`` with
z ~ q(z|x) and SD's tiny KL weight, without the adversarial and LPIPS terms (no offline weights
for the latter; both trade PSNR for sharpness, and PSNR is what the SR evaluation measures).

It trains a new autoencoder from ``model.vae_config``, or fine-tunes the trained one of
``model.vae``: all of it, or (``autoencoder.trainable="decoder"``) the decoder only, the encoder
and so the latent space that models were trained in kept, bit for bit, with its ``scaling_factor``.

The loop is the trainer's (``train.make_optimizer``, orbax checkpoints with resume, SIGTERM,
non-finite steps never applied, evaluation every ``eval.every`` steps to TensorBoard and
``eval_log.jsonl``). At the end the latent scale is measured as SD did (``scaling_factor`` =
1 / std of the training latents) and ``export/vae`` is written in diffusers layout.
"""

from __future__ import annotations

import json
import os
from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from flax import linen as nn

from codi_jax import console, models, sharding, throughput
from codi_jax.distill import ema_update
from codi_jax.models.torch_init import torch_default_init
from codi_jax.models.vae import AutoencoderKL
from codi_jax.modeling import load_vae
from codi_jax.train import (Preempted, PreemptionFlag, append_jsonl, check_resumable, checkpoint_manager, combine,
                            evaluation_decay, make_optimizer, partition, restore_latest, save_checkpoint)


LOWPASS_POOL = 8  # pixels a side of the blocks whose mean colours autoencoder.lowpass_weight compares
INITS = ("flax", "torch")


def make_loss(vae: AutoencoderKL, cfg: ml_collections.ConfigDict):
    """``loss(params, images, rng) -> (loss, metrics)`` of the reconstruction objective."""
    w = cfg.autoencoder

    def loss(params, images, rng):
        posterior = vae.apply({"params": params}, images, method=vae.encode)
        z = posterior.sample(rng)
        rec = vae.apply({"params": params}, z, method=vae.decode).astype(jnp.float32)
        l1 = jnp.mean(jnp.abs(rec - images))
        l2 = jnp.mean(jnp.square(rec - images))
        # Summed over latent elements, normalised by the pixel count like the reconstruction terms,
        # so w_KL has the meaning of LDM's per-image kl_weight.
        kl = 0.5 * jnp.sum(posterior.mean**2 + posterior.var - 1.0 - posterior.logvar,
                           axis=(1, 2, 3)) / np.prod(images.shape[1:])
        total = w.l1_weight * l1 + w.l2_weight * l2 + w.kl_weight * jnp.mean(kl)
        metrics = {"loss": total, "l1": l1, "l2": l2, "kl": jnp.mean(kl)}
        if w.lowpass_weight:
            # The reconstruction's error in each 8x8 block's mean colour, weighted on its own: a
            # colour shift over a flat region is cheap in the pixel terms next to texture errors.
            pool = lambda x: nn.avg_pool(x, (LOWPASS_POOL, LOWPASS_POOL), (LOWPASS_POOL, LOWPASS_POOL))
            metrics["lowpass"] = jnp.mean(jnp.square(pool(rec) - pool(images)))
            total = total + w.lowpass_weight * metrics["lowpass"]
            metrics["loss"] = total
        return total, metrics

    return loss


# The parts of an AutoencoderKL that map latents to pixels: what ``autoencoder.trainable="decoder"``
# trains (the rest, encoder and quant_conv, fixes the latent space).
DECODER_PARTS = ("post_quant_conv", "decoder")
TRAINABLE = ("all", "decoder")


def trainable_mask(params: dict, trainable: str) -> dict:
    """``params``-shaped booleans: True where ``autoencoder.trainable`` trains the parameter."""
    if trainable not in TRAINABLE:
        raise ValueError(f"autoencoder.trainable: unknown value {trainable!r}; known: {list(TRAINABLE)}")
    return {part: jax.tree.map(lambda _: trainable == "all" or part in DECODER_PARTS, tree)
            for part, tree in params.items()}


def make_train_step(vae: AutoencoderKL, cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation):
    """``step(state, frozen, images, base_rng)``: ``state`` holds the trainable params only."""
    loss_fn = make_loss(vae, cfg)

    def step(state, frozen, images, base_rng):
        rng = jax.random.fold_in(base_rng, state["step"])
        (loss, metrics), grads = jax.value_and_grad(
            lambda p: loss_fn(combine(p, frozen), images, rng), has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
               "ema": ema_update(state["ema"], params, evaluation_decay(cfg.train.eval_ema_decay, state["step"]))}
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        new["step"] = state["step"] + 1
        return new, dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))

    return step


def reconstruct(vae: AutoencoderKL, params: Any, images: jax.Array) -> jax.Array:
    """Posterior-mode reconstruction, clipped to [−1, 1] (what a latent model's decode shows)."""
    z = vae.apply({"params": params}, images, method=vae.encode).mode()
    return jnp.clip(vae.apply({"params": params}, z, method=vae.decode).astype(jnp.float32), -1.0, 1.0)


def evaluate(vae: AutoencoderKL, params: Any, cfg: ml_collections.ConfigDict, mesh) -> dict:
    """Reconstruction PSNR / SSIM on each held-out split of ``eval.splits`` (at most
    ``eval.num_examples`` each), and the latent std on the first split."""
    from codi_jax import data as data_lib

    rec_fn = jax.jit(lambda p, x: reconstruct(vae, p, x))
    out = {}
    for split in tuple(cfg.eval.splits) or (cfg.data.eval_split,):
        data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
        data_cfg.eval_split = split
        ds = data_lib.make_eval_dataset(data_cfg, global_batch_size=cfg.eval.batch_size)
        total = {"psnr": 0.0, "ssim": 0.0, "count": 0.0}
        for b, local in enumerate(ds):
            if b * cfg.eval.batch_size >= cfg.eval.num_examples:
                break
            batch = sharding.global_batch({"image": local["image"], "mask": local["mask"]}, mesh)
            rec = rec_fn(params, batch["image"])
            a, t = (rec + 1.0) / 2.0, (batch["image"] + 1.0) / 2.0
            w = batch["mask"].astype(jnp.float32)
            total["psnr"] += float(jnp.sum(w * pix.psnr(a, t)))
            total["ssim"] += float(jnp.sum(w * pix.ssim(a, t)))
            total["count"] += float(jnp.sum(w))
        out[split] = {k: total[k] / max(total["count"], 1.0) for k in ("psnr", "ssim")}
        out[split]["num_examples"] = int(total["count"])
    return out


def latent_std(vae: AutoencoderKL, params: Any, cfg: ml_collections.ConfigDict, mesh,
               num_batches: int = 8) -> float:
    """The std of posterior samples over training crops: SD's recipe for ``scaling_factor``."""
    from codi_jax import data as data_lib

    batches = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size,
                                           seed=cfg.data.seed + 12345)
    enc = jax.jit(lambda p, x, k: vae.apply({"params": p}, x, method=vae.encode).sample(k))
    zs = [np.asarray(enc(params, sharding.global_batch({"image": next(batches)["image"]}, mesh)["image"],
                         jax.random.PRNGKey(i))) for i in range(num_batches)]
    return float(np.std(np.concatenate(zs)))


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the autoencoder of ``cfg.model.vae_config`` in ``workdir`` (resuming), evaluates,
    and exports ``workdir/export/vae``."""
    from codi_jax import data as data_lib

    check_resumable(workdir, cfg)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    if cfg.model.vae:  # fine-tune a trained VAE (its own config; model.vae_config is not read)
        loaded, params = load_vae(cfg.model.vae)
        vae_config = models.module_config(loaded, "vae")
        vae = AutoencoderKL.from_config(vae_config, jnp.dtype(cfg.model.dtype))
    else:
        if cfg.autoencoder.trainable != "all":
            raise ValueError(f"autoencoder.trainable={cfg.autoencoder.trainable!r} fine-tunes part of a "
                             "trained VAE: set model.vae to it")
        vae_config = dict(cfg.model.vae_config.to_dict(), _class_name="AutoencoderKL")
        vae = AutoencoderKL.from_config(vae_config, jnp.dtype(cfg.model.dtype))
        if cfg.autoencoder.init not in INITS:
            raise ValueError(f"autoencoder.init: unknown value {cfg.autoencoder.init!r}; known: {list(INITS)}")
        params = jax.jit(vae.init)(jax.random.PRNGKey(cfg.seed), *AutoencoderKL.dummy_inputs(vae_config))["params"]
        if cfg.autoencoder.init == "torch":
            params = torch_default_init(params, jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2))
    trainable, frozen = partition(params, trainable_mask(params, cfg.autoencoder.trainable))
    tx, schedule = make_optimizer(cfg.train)
    init = lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "ema": p, "opt_state": tx.init(p)}
    state_sh = sharding.tree_shardings(jax.eval_shape(init, trainable), mesh, cfg.mesh.min_shard_size)
    state = jax.jit(init, out_shardings=state_sh)(trainable)
    frozen_sh = sharding.tree_shardings(frozen, mesh, cfg.mesh.min_shard_size)
    frozen = jax.device_put(frozen, frozen_sh)
    mgr = checkpoint_manager(workdir, cfg)
    restored = restore_latest(mgr, sharding.with_shardings(state, state_sh))
    if restored is not None:
        state = restored
        console.say(f"resumed from step {int(state['step'])}")
    start = int(state["step"])
    step_fn = jax.jit(make_train_step(vae, cfg, tx),
                      in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                      out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    base_rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    report = periodic_actions.ReportProgress(num_train_steps=cfg.train.num_steps, writer=writer)
    batches = data_lib.make_train_iterator(cfg.data, global_batch_size=cfg.train.batch_size,
                                           seed=cfg.data.seed, start_step=start)
    preempted = PreemptionFlag()

    def log_eval(step: int) -> dict:
        results = evaluate(vae, combine(state["ema"], frozen), cfg, mesh)
        writer.write_scalars(step, {f"eval/{split}_{k}": v for split, m in results.items()
                                    for k, v in m.items()})
        append_jsonl(workdir, "eval_log.jsonl", {"step": step, **results})
        console.say(f"eval at step {step}: " + "; ".join(
            f"{split} {m['psnr']:.2f} dB / {m['ssim']:.3f}" for split, m in results.items() if "psnr" in m))
        return results

    speed = throughput.Throughput(cfg.train.batch_size, 0.0, None)  # images/s and ETA on the console
    speed.restart(start)

    try:
        for step in range(start, cfg.train.num_steps):
            batch = sharding.global_batch({"image": next(batches)["image"]}, mesh)
            state, metrics = step_fn(state, frozen, batch["image"], base_rng)
            report(step + 1)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.num_steps:
                metrics = jax.device_get(metrics)
                if not metrics.pop("finite"):
                    raise RuntimeError(f"step {done}: non-finite autoencoder loss {metrics['loss']}")
                scalars = {k: float(v) for k, v in metrics.items()} | {"lr": float(schedule(done))}
                writer.write_scalars(done, {f"train/{k}": v for k, v in scalars.items()})
                append_jsonl(workdir, "train_log.jsonl", {"step": done, **scalars})
                console.say(console.progress_line(done, cfg.train.num_steps, scalars["loss"], speed.record(done)))
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.num_steps:
                save_checkpoint(mgr, done, state, cfg)
            if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.train.num_steps:
                log_eval(done)
                speed.restart(done)
            if preempted.stop_after(done):
                save_checkpoint(mgr, done, state, cfg, force=True)
                mgr.wait_until_finished()
                logging.warning("SIGTERM: saved step %d and stopped", done)
                raise Preempted(done)
    finally:
        mgr.wait_until_finished()
        preempted.restore()

    results = log_eval(int(state["step"]))
    final = combine(state["ema"], frozen)
    std = latent_std(vae, final, cfg, mesh)
    results["latent_std"] = std
    # A frozen encoder keeps its latents, and so the scale the models trained on them use.
    results["scaling_factor"] = (float(vae_config["scaling_factor"]) if cfg.autoencoder.trainable == "decoder"
                                 else float(f"{1.0 / std:.5g}"))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump(dict(results, step=int(state["step"])), f, indent=2)
        if cfg.export:
            config = dict(vae_config, scaling_factor=results["scaling_factor"])
            models.save(vae, jax.device_get(final), os.path.join(workdir, "export", "vae"), "vae",
                        config=config)
    writer.flush()
    return results
