"""codi_jax: Conditional Diffusion Distillation (CoDi) in JAX/Flax.

Subpackages are imported on use (``from codi_jax import models, diffusion``) so that importing the
math does not pull in TensorFlow or the model zoo.
"""

__version__ = "0.1.0"
