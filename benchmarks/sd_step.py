"""Stable Diffusion's train step on one accelerator, measured: per cell (preset, variant, batch,
remat) the compiled memory, the device memory actually used at peak, the median step time,
images/s and MFU; beside it, on the same chip, the diffusers ControlNet training step.

    python benchmarks/sd_step.py --json=sd_step.jsonl                 # the default cells, < 10 min on one H200
    python benchmarks/sd_step.py --json=sd_step.jsonl --grid=full     # every cell; resumable, run it again
    python benchmarks/sd_step.py --table=sd_step.jsonl                # the markdown table of docs/scaling.md
    python benchmarks/sd_step.py --tiny --cells=pe:1:on,torch:1:off   # CPU smoke test (tests/test_benchmarks.py)

What runs. The JAX cells are the trainer's own step (``train.setup`` with ``built=`` random weights,
``train.compile_train_step``), Stable Diffusion 1.5 at 512 px and 2.1 at 768 px built from the
shipped diffusers configs (no download), bf16 compute, fp32 master weights, the GPU's fused
attention (``model.attention=cudnn``), one device (``mesh 1x1``), a synthetic batch (image,
condition, 77 token ids) so the input pipeline is not timed. ``codi`` is full CoDi (μ-blended
conditional encoder, every weight trained), ``pe`` PE-CoDi (frozen UNet, ControlNet adapter).
The step includes what Algorithm 1 needs: VAE encoding of image and condition, the text encoder,
the online forward and backward, the target (EMA) forward, AdamW and both EMAs.

The ``torch`` cells time what a user of diffusers' ControlNet trainer runs: UNet, VAE and text
encoder frozen in bf16, ControlNet trained in fp32 under bf16 autocast, AdamW, the VAE and text
encoder run every step, noise-prediction MSE; one forward and backward, no target forward, so our
PE-CoDi step does one UNet+ControlNet forward (and one VAE encode) more than it. ``remat=on`` is
diffusers' gradient checkpointing there.

Each cell runs in its own process (a fresh allocator: the peak is the cell's own) and appends a
JSON line to ``--json``; cells already there are skipped, so an interrupted run resumes. Memory:
``compiled.memory_analysis()`` (XLA's plan for the program) and ``memory_stats()``'s
``peak_bytes_in_use`` (everything the process held at once: weights, state, batch, workspace);
torch: ``torch.cuda.max_memory_allocated``. MFU: XLA's FLOP count of the compiled step × steps/s
/ the chip's peak bf16 FLOP/s (``codi_jax/throughput.py``; none for the torch cells, compared by
time per image instead). On a CPU (``--tiny``) there is no peak memory and no MFU: the script is
checked there and measured on an accelerator.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

# Runnable from a checkout without installing the package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VARIANTS = ("codi", "pe", "torch")
# The default cells: what the goals of docs/scaling.md are read from (PE-CoDi against the diffusers
# step at the same batch and remat; full CoDi at batch 2), meant to fit one 10-minute command:
# about 2 minutes per JAX cell (host init, transfer, compile, 7 steps), well under one per torch
# cell. An estimate until it has run; --grid=full is the rest, over several resumed runs.
DEFAULT_CELLS = ("sd15:pe:4:on", "sd15:torch:4:on", "sd15:pe:8:on", "sd15:torch:8:on", "sd15:codi:2:on")
GIB = 2**30


def tiny_configs() -> dict:
    """SD 1.5's architecture at toy width (two levels, 32 px pictures, 2x VAE): the CPU check."""
    from codi_jax import models

    unet = dict(models.get_config("unet", "sd15"), block_out_channels=[32, 64], layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=8,
                attention_head_dim=2, cross_attention_dim=32, sample_size=16)
    vae = dict(models.get_config("vae", "sd15"), block_out_channels=[8, 16], layers_per_block=1,
               down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
               norm_num_groups=4, sample_size=32)
    text = dict(models.get_config("text_encoder", "sd15"), hidden_size=32, intermediate_size=37,
                num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, projection_dim=32)
    return {"unet": unet, "vae": vae, "text_encoder": text}


def parse_cell(text: str, tiny: bool) -> dict:
    """``preset:variant:batch:remat`` (``--tiny``: ``variant:batch:remat``, preset "tiny")."""
    parts = text.split(":")
    if tiny:
        parts = ["tiny"] + parts
    if len(parts) != 4 or parts[1] not in VARIANTS or parts[3] not in ("on", "off") or not parts[2].isdigit():
        raise ValueError(f"--cells: bad cell {text!r}; use "
                         f"{'' if tiny else 'sd15|sd21:'}codi|pe|torch:<batch>:on|off")
    return {"preset": parts[0], "variant": parts[1], "batch": int(parts[2]), "remat": parts[3]}


def grid(name: str, tiny: bool) -> list[dict]:
    if tiny:
        return [parse_cell(c, True) for c in ("pe:1:on", "codi:1:off", "torch:1:off")]
    if name == "default":
        return [parse_cell(c, False) for c in DEFAULT_CELLS]
    return [{"preset": p, "variant": v, "batch": b, "remat": r} for p in ("sd15", "sd21")
            for v in VARIANTS for b in (1, 4, 8) for r in ("on", "off")]


def cell_key(c: dict) -> tuple:
    return (c["preset"], c["variant"], c["batch"], c["remat"])


def _config(cell: dict, attention: str):
    from codi_jax import config_lib

    preset = "sd15" if cell["preset"] == "tiny" else cell["preset"]
    arg = preset + (",pe" if cell["variant"] == "pe" else "")
    cfg = config_lib.config_module(os.path.join(ROOT, "configs", "sr.py"), "sr").get_config(arg)
    cfg.model.pretrained = ""  # random weights of the preset's architecture (see _random_model)
    cfg.model.remat = "nothing_saveable" if cell["remat"] == "on" else ""
    cfg.model.attention = attention
    cfg.train.batch_size = cell["batch"]
    cfg.mesh.data, cfg.mesh.fsdp = 1, 1
    if cell["preset"] == "tiny":
        cfg.data.image_size = 32
    return cfg


def _configs_of(preset: str) -> dict:
    from codi_jax import plan

    return tiny_configs() if preset == "tiny" else plan.preset_configs(preset)


def _synthetic_batch(shapes: dict, vocab: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {k: (rng.integers(0, vocab, s.shape).astype(np.int32) if k == "text"
                else rng.uniform(-1, 1, s.shape).astype(np.float32)) for k, s in shapes.items()}


def _timed(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def jax_cell(cell: dict, steps: int, warmup: int, attention: str) -> dict:
    """One JAX cell, in this process."""
    import jax

    from codi_jax import plan, sharding, throughput, train
    from codi_jax.data.config import cond_channels
    from codi_jax.modeling import build_student

    if attention == "auto":  # decided here: the parent process must not take the GPU's memory
        attention = "cudnn" if jax.devices()[0].platform == "gpu" else ""
    cfg = _config(cell, attention)
    configs = _configs_of(cell["preset"])
    t0 = time.perf_counter()
    # Random weights drawn and adapted in host memory, as the trainer reads real ones; the
    # rbg generator because threefry's init of a billion weights takes minutes to compile on a CPU.
    default_impl = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    try:
        with jax.default_device(sharding.host_device()):
            teacher = plan.random_teacher(cfg, configs, "epsilon", rng=jax.random.PRNGKey(0))
            built = build_student(cfg.model, teacher, cond_channels(cfg.data), jax.random.PRNGKey(1))
    finally:
        jax.config.update("jax_default_prng_impl", default_impl)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    parts = train.setup(cfg, mesh, built=built)
    del built, teacher
    setup_s = time.perf_counter() - t0
    local = _synthetic_batch(plan.batch_shapes(cfg, parts.student, cell["batch"]),
                             configs["text_encoder"]["vocab_size"])
    batch = sharding.global_batch(local, mesh)
    t0 = time.perf_counter()
    step, cost = train.compile_train_step(cfg, parts, mesh, batch)
    compile_s = time.perf_counter() - t0
    rng = jax.device_put(jax.device_get(jax.random.PRNGKey(2)), sharding.replicated(mesh))
    holder = {"state": parts.state}

    def run():
        holder["state"], metrics = step(holder["state"], parts.frozen, parts.aux, batch, rng)
        jax.block_until_ready(metrics["loss"])

    times = _timed(run, steps, warmup)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    median = statistics.median(times)
    peak = throughput.peak_flops(device.device_kind)
    return {"setup_s": setup_s, "compile_s": compile_s, "step_s": median, "step_s_all": times,
            "images_per_second": cell["batch"] / median, "flops": cost.flops,
            "mfu": cost.flops / median / peak if peak else None,
            "compiled_peak_bytes": cost.peak_bytes, "temp_bytes": cost.temp_bytes,
            "argument_bytes": cost.argument_bytes, "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "trainable_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(parts.state["params"]))),
            "device_kind": device.device_kind, "backend": cost.backend}


def torch_cell(cell: dict, steps: int, warmup: int) -> dict:
    """The diffusers ControlNet training step (see the module docstring), in this process."""
    import diffusers
    import torch
    import transformers

    configs = _configs_of(cell["preset"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = diffusers.UNet2DConditionModel.from_config(configs["unet"])
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    # The hint stem downsamples as much as the VAE (8x for SD; 2x for the tiny check).
    hint = (16, 32, 96, 256)[:int(math.log2(factor)) + 1]
    controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint).to(device)
    vae = diffusers.AutoencoderKL.from_config(configs["vae"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"]))
    for frozen in (unet, vae, text):  # diffusers' trainer: frozen models in the mixed-precision dtype
        frozen.requires_grad_(False)
        frozen.to(device, dtype=torch.bfloat16)
    if cell["remat"] == "on":
        controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, weight_decay=1e-2)
    noise_schedule = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    size = 32 if cell["preset"] == "tiny" else (512 if cell["preset"] == "sd15" else 768)
    b = cell["batch"]
    images = torch.rand(b, 3, size, size, device=device) * 2 - 1
    hint_images = torch.rand(b, 3, size, size, device=device)
    ids = torch.randint(0, configs["text_encoder"]["vocab_size"], (b, 77), device=device)
    setup_s = time.perf_counter() - t0

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                latents = vae.encode(images.to(torch.bfloat16)).latent_dist.sample() * vae.config.scaling_factor
                context = text(ids)[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (b,), device=device)
            noisy = noise_schedule.add_noise(latents, noise, t)
            down, mid = controlnet(noisy, t, encoder_hidden_states=context, controlnet_cond=hint_images,
                                   return_dict=False)
            pred = unet(noisy, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = _timed(run, steps, warmup)
    median = statistics.median(times)
    return {"setup_s": setup_s, "compile_s": 0.0, "step_s": median, "step_s_all": times,
            "images_per_second": b / median, "flops": None, "mfu": None,
            "peak_bytes_in_use": torch.cuda.max_memory_allocated() if cuda else None,
            "trainable_params": sum(p.numel() for p in controlnet.parameters()),
            "device_kind": torch.cuda.get_device_name() if cuda else "cpu", "backend": f"torch {torch.__version__}"}


def run_cells(cells: list[dict], out: str, steps: int, warmup: int, attention: str, timeout_s: int) -> None:
    done = {cell_key(r) for r in read_results(out)}
    for cell in cells:
        if cell_key(cell) in done:
            continue
        name = ":".join(str(v) for v in cell_key(cell))
        cmd = [sys.executable, os.path.abspath(__file__), "--_cell", json.dumps(cell), "--steps", str(steps),
               "--warmup", str(warmup), "--attention", attention, "--json", out]
        print(f"cell {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            failed = proc.returncode != 0
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            failed, log = True, f"timed out after {timeout_s} s"
        if failed:
            # A cell that does not fit (out of memory) is a result too: recorded, not retried.
            reason = "out of memory" if "RESOURCE_EXHAUSTED" in log or "OutOfMemory" in log else "failed"
            with open(out, "a") as f:
                f.write(json.dumps(dict(cell, error=reason, log_tail=log[-2000:])) + "\n")
            print(f"  {reason} ({time.perf_counter() - t0:.0f} s):\n{log[-1500:]}", flush=True)
        else:
            r = read_results(out)[-1]
            print(f"  {r['step_s'] * 1e3:.0f} ms/step, {r['images_per_second']:.2f} images/s"
                  + (f", MFU {r['mfu']:.1%}" if r.get("mfu") else "")
                  + (f", peak {r['peak_bytes_in_use'] / GIB:.1f} GiB" if r.get("peak_bytes_in_use") else "")
                  + f" (compile {r['compile_s']:.0f} s, {time.perf_counter() - t0:.0f} s in all)", flush=True)


def read_results(path: str) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def markdown_table(results: list[dict]) -> str:
    """One row per cell, and the per-image ratio of each PE-CoDi cell to the diffusers step."""
    torch_rows = {(r["preset"], r["batch"], r["remat"]): r for r in results if r["variant"] == "torch" and "error" not in r}
    kinds = sorted({r["device_kind"] for r in results if "device_kind" in r})
    rows = [f"Measured on {', '.join(kinds) or 'no device'} (benchmarks/sd_step.py).", "",
            "| preset | variant | batch | remat | compiled GiB | peak in use GiB | ms/step | images/s | MFU "
            "| diffusers ControlNet time per image / ours (> 1: ours faster) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['preset']} | {r['variant']} | {r['batch']} | {r['remat']} |"
        if "error" in r:
            rows.append(f"{head} {r['error']} | | | | | |")
            continue
        gib = lambda v: f"{v / GIB:.2f}" if v else ""  # noqa: E731
        ref = torch_rows.get((r["preset"], r["batch"], r["remat"]))
        ratio = f"{ref['step_s'] / r['step_s']:.2f}" if ref and r["variant"] == "pe" else ""
        rows.append(f"{head} {gib(r.get('compiled_peak_bytes'))} | {gib(r.get('peak_bytes_in_use'))} "
                    f"| {r['step_s'] * 1e3:.0f} | {r['images_per_second']:.2f} "
                    f"| {format(r['mfu'], '.1%') if r.get('mfu') else ''} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="sd_step.jsonl", help="results, one JSON line per cell (appended)")
    parser.add_argument("--grid", default="default", choices=("default", "full"))
    parser.add_argument("--cells", default="", help="comma-separated preset:variant:batch:on|off (overrides --grid)")
    parser.add_argument("--tiny", action="store_true", help="toy-width SD configs: the CPU check")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per cell (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per cell")
    parser.add_argument("--attention", default="auto",
                        help="model.attention; auto: cudnn on a GPU, XLA's own elsewhere")
    parser.add_argument("--cell_timeout", type=int, default=300, help="seconds before a cell is given up")
    parser.add_argument("--table", default="", help="print the markdown table of a --json file and exit")
    parser.add_argument("--_cell", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table:
        print(markdown_table(read_results(args.table)))
        return
    if args._cell:
        cell = json.loads(args._cell)
        fn = torch_cell(cell, args.steps, args.warmup) if cell["variant"] == "torch" else \
            jax_cell(cell, args.steps, args.warmup, args.attention)
        with open(args.json, "a") as f:
            f.write(json.dumps(dict(cell, **fn)) + "\n")
        return
    cells = ([parse_cell(c, args.tiny) for c in args.cells.split(",") if c] if args.cells
             else grid(args.grid, args.tiny))
    t0 = time.perf_counter()
    run_cells(cells, args.json, args.steps, args.warmup, args.attention or "auto", args.cell_timeout)
    print(f"\n{time.perf_counter() - t0:.0f} s in all\n")
    print(markdown_table(read_results(args.json)))


if __name__ == "__main__":
    main()
