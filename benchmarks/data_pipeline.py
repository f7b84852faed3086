"""Throughput of each task's training pipeline on this machine (examples/s), on the embedded demo.

    python benchmarks/data_pipeline.py [--tasks sr,depth] [--batch 16] [--seconds 10]
                                       [--image_size 32] [--train_steps_per_s 1.5]

With ``--train_steps_per_s`` (the trainer logs it) the script also prints how many times faster
than the training step each pipeline supplies batches; the embedded SR pipeline should be ≥ 5x.
Not a test: numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def measure(task: str, batch: int, seconds: float, image_size: int, data_dir: str | None) -> float:
    from codi_jax import data

    cfg = data.default_config(task)
    cfg.image_size = image_size
    cfg.data_dir = data_dir
    it = data.make_train_iterator(cfg, global_batch_size=batch, seed=0, process_index=0, process_count=1)
    for _ in range(3):  # graph tracing, thread pools, autotuning
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += batch
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="sr,depth,inpaint,edit,canny")
    parser.add_argument("--batch", type=int, default=16, help="global batch (the embedded default run uses 16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measurement time per task")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--data_dir", default=None, help="where the demo is built (default: the user cache)")
    parser.add_argument("--train_steps_per_s", type=float, default=0.0, help="the trainer's step rate, to compare")
    args = parser.parse_args()

    print(f"batch {args.batch}, {args.image_size}x{args.image_size} crops, {os.cpu_count()} CPUs")
    for task in args.tasks.split(","):
        rate = measure(task, args.batch, args.seconds, args.image_size, args.data_dir)
        line = f"{task:8s} {rate:9.1f} examples/s"
        if args.train_steps_per_s > 0:
            line += f"   {rate / (args.train_steps_per_s * args.batch):6.1f}x the training step's consumption"
        print(line, flush=True)


if __name__ == "__main__":
    main()
