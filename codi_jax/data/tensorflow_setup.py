"""TensorFlow, for the data pipeline only. Every data module that uses it imports it from here,
so its GPUs are hidden before TensorFlow can initialise them: it must never take memory meant
for JAX. Nothing outside ``codi_jax/data`` imports TensorFlow, so planning, benchmarking and
training-step code runs on machines without it (``tests/test_imports.py``)."""

import tensorflow as tf

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow already initialised its devices elsewhere; nothing to undo
    pass

__all__ = ["tf"]
