"""Rewrites every float32 safetensors file under a folder in float16 (half the size on disk).

The loaders cast weights to the module's float32 parameters, so a float16 folder loads as before,
with each weight rounded to float16 (relative error ≤ 2⁻¹¹). The shipped assets are stored this way
to keep the repository light; their READMEs' numbers are measured on the float16 files.

    python tools/to_fp16.py codi_jax/assets/mini_sd
"""
from __future__ import annotations

import os
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def convert(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            if not name.endswith(".safetensors"):
                continue
            path = os.path.join(root, name)
            with safe_open(path, "np") as f:
                metadata = f.metadata()
            state = load_file(path)
            if not any(v.dtype == np.float32 for v in state.values()):
                continue
            half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in state.items()}
            if any(not np.isfinite(v).all() for v in half.values() if v.dtype == np.float16):
                raise ValueError(f"{path}: a weight overflows float16; left unchanged")
            tmp = path + ".tmp"
            save_file(half, tmp, metadata=metadata)
            os.replace(tmp, path)  # atomic: never a half-written weight file
            print(f"{path}: float16")


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        convert(folder)
