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

Importing this package imports TensorFlow and hides GPUs from it, so it never takes memory meant
for JAX.
"""
import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already initialised its devices elsewhere; nothing to undo
    pass

from codi_jax.data.config import TASKS, cond_channels, default_config  # noqa: E402
from codi_jax.data.ops import OPS, get_op  # noqa: E402
from codi_jax.data.pipeline import EvalDataset, TrainIterator, make_eval_dataset, make_train_iterator  # noqa: E402
from codi_jax.data.tasks import TASK_REGISTRY, get_task  # noqa: E402

# Registers the Real-ESRGAN ops in OPS.
from codi_jax.data import degradations  # noqa: E402,F401

__all__ = [
    "TASKS", "TASK_REGISTRY", "OPS", "EvalDataset", "TrainIterator", "cond_channels", "default_config",
    "get_op", "get_task", "make_eval_dataset", "make_train_iterator",
]
