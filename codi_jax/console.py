"""What a run prints. By default: warnings, and our own lines (the progress line with step, loss,
speed and ETA; the compiled step's cost; evaluation summaries). ``--verbosity=0`` (absl's INFO)
brings back every library's INFO lines (orbax, TFDS, the config dump). TensorBoard and the run's
JSON files get everything either way.
"""

from __future__ import annotations

import logging as std_logging

from absl import logging


def quiet() -> None:
    """Warnings and above only, for absl and Python's other loggers (TensorFlow's C++ side:
    ``TF_CPP_MIN_LOG_LEVEL``, set by ``codi_jax.main`` before anything imports TensorFlow)."""
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger().setLevel(std_logging.WARNING)


def say(message: str, every_process: bool = False) -> None:
    """One line on the console, from process 0 only unless ``every_process``."""
    if not every_process:
        import jax

        if jax.process_index() > 0:
            return
    print(message, flush=True)


def duration(seconds: float) -> str:
    """``3h05m``, ``2m45s``, ``12s``."""
    s = int(round(max(seconds, 0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def progress_line(step: int, num_steps: int, loss: float, perf: dict) -> str:
    """``step 25/400 (6%): loss 0.1234, 2.31 steps/s, 37.0 images/s, MFU 41.2%, ETA 2m42s``."""
    parts = [f"step {step}/{num_steps} ({step / max(num_steps, 1):.0%}): loss {loss:.4g}"]
    if "steps_per_second" in perf:
        parts += [f"{perf['steps_per_second']:.2f} steps/s", f"{perf['images_per_second']:.1f} images/s"]
        if "mfu" in perf:
            parts.append(f"MFU {perf['mfu']:.1%}")
        parts.append(f"ETA {duration((num_steps - step) / perf['steps_per_second'])}")
    return ", ".join(parts)
