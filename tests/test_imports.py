"""What runs on an accelerator machine without TensorFlow: the trainer's setup and step, the
planner, the SD step benchmark's code and the configs import no TensorFlow (only the data
pipeline and TensorBoard writing load it, on first use)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = """
import sys
import codi_jax.train, codi_jax.plan, codi_jax.predict, codi_jax.throughput
from codi_jax import config_lib, data
from codi_jax.data.config import cond_channels
cfg = config_lib.config_module("configs/sr.py", "sr").get_config("sd15,pe")
loaded = sorted(m for m in ("tensorflow", "tensorflow_datasets", "clu.metric_writers") if m in sys.modules)
assert not loaded, loaded
data.get_op  # the pipeline's names still load on first use
assert "tensorflow" in sys.modules
"""


def test_step_and_planning_code_import_no_tensorflow():
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
