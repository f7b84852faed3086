"""Test-wide settings: eight virtual CPU devices so sharded code paths run, quiet TensorFlow."""
import os

# Must be set before jax is imported anywhere: gives 8 CPU devices for mesh tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
