"""Task data: tf.data pipelines yielding ``{"image", "cond", "text"}`` batches for the trainer.

Sources: the embedded demo (``"demo"``), any TFDS dataset (``"tfds:<name>"``) or a folder
(``"folder:<path>"``). Tasks: ``sr`` (Real-ESRGAN degradation), ``depth``, ``inpaint``, ``edit``,
``canny``. Condition channels: sr 3, depth 3 (``depth.channels``), inpaint 4 (masked image + mask,
1 = hole), edit 3, canny 3 (``canny.channels``); all in [-1, 1].

Training batches (``make_train_iterator``) depend only on (seed, step, process): resuming with
``start_step=k`` reproduces an uninterrupted run. Eval batches (``make_eval_dataset``) cover the
held-out split once, the last one padded and flagged by the boolean ``mask`` key. Depth maps are
min-max normalised per example (per crop). The demo's held-out split is the right-most quarter of
every source image (``demo.eval_fraction``), so eval crops share no pixel with training crops.

Importing this package (or ``codi_jax.data.config``) does not import TensorFlow: the pipeline's
names load it on first use (``tensorflow_setup`` hides its GPUs first, so it never takes memory
meant for JAX). Planning and step benchmarks thus run where TensorFlow is not installed.
"""
import importlib

from codi_jax.data.config import TASKS, cond_channels, default_config

# name -> the submodule that defines it, imported on first access (PEP 562).
_LAZY = {"OPS": "ops", "get_op": "ops", "EvalDataset": "pipeline", "TrainIterator": "pipeline",
         "make_eval_dataset": "pipeline", "make_train_iterator": "pipeline",
         "TASK_REGISTRY": "tasks", "get_task": "tasks"}

__all__ = ["TASKS", "cond_channels", "default_config", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'codi_jax.data' has no attribute {name!r}")
    # The Real-ESRGAN ops register themselves in OPS when their module loads.
    importlib.import_module("codi_jax.data.degradations")
    return getattr(importlib.import_module(f"codi_jax.data.{_LAZY[name]}"), name)
