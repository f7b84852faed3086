"""The metric networks' standard weight files, fetched from their canonical URLs and cached.

``--fid_weights=auto``, ``--lpips_weights=auto`` and ``--dists_weights=auto`` (and the same
``eval.*_weights`` settings) stand for the files each metric's module docstring names:

* FID: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``;
* LPIPS: torchvision's AlexNet (or VGG16, with ``lpips_net=vgg``) and the LPIPS v0.1 heads;
* DISTS: torchvision's VGG16 and DISTS's α / β (``weights.pt``; taken from the installed
  ``DISTS_pytorch`` package when there is one, without a download).

Each file is downloaded once, checked against the SHA-256 prefix its name carries (torchvision
and pytorch-fid name their files so), converted to ``.safetensors`` with
``torch.load(weights_only=True)`` (PyTorch's restricted unpickler, which builds tensors only) and
kept in ``$CODI_JAX_CACHE/metrics`` (default ``~/.cache/codi_jax/metrics``); the cached file is
written to a temporary name and renamed, so an interrupted download never passes for a whole
one. Offline, or without torch for the conversion, the metric is "not computed" and the reason
says which file to supply instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import urllib.request
from typing import Optional

from codi_jax.models.io import HubUnavailableError, WeightFileError

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Source:
    url: str
    sha256_prefix: Optional[str] = None   # what the file's canonical name promises
    package_file: Optional[tuple[str, str]] = None   # (installed package, file beside its data) to use first


SOURCES = {
    "pt_inception": Source("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                           "pt_inception-2015-12-05-6726825d.pth", "6726825d"),
    "alexnet": Source("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79"),
    "vgg16": Source("https://download.pytorch.org/models/vgg16-397923af.pth", "397923af"),
    "lpips_alex": Source("https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/"
                         "lpips/weights/v0.1/alex.pth"),
    "lpips_vgg": Source("https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/"
                        "lpips/weights/v0.1/vgg.pth"),
    "dists": Source("https://raw.githubusercontent.com/dingkeyan93/DISTS/master/DISTS_pytorch/weights.pt",
                    package_file=("DISTS_pytorch", "weights.pt")),
}
# The files that make up each metric's network.
METRIC_FILES = {"fid": ("pt_inception",), "lpips:alex": ("alexnet", "lpips_alex"),
                "lpips:vgg": ("vgg16", "lpips_vgg"), "dists": ("vgg16", "dists")}


def cache_dir() -> str:
    root = os.environ.get("CODI_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "codi_jax")
    return os.path.join(root, "metrics")


def resolve(spec: str, metric: str) -> str:
    """``spec`` as given, or for ``auto`` the comma-separated cached files of ``metric``
    (a key of ``METRIC_FILES``), fetched when they are not cached yet."""
    if spec != AUTO:
        return spec
    if metric not in METRIC_FILES:
        raise ValueError(f"metric: unknown value {metric!r}; known: {sorted(METRIC_FILES)}")
    return ",".join(cached_file(name) for name in METRIC_FILES[metric])


def cached_file(name: str) -> str:
    """The ``.safetensors`` of ``SOURCES[name]`` in the cache, fetched and converted first if absent."""
    source = SOURCES[name]
    path = os.path.join(cache_dir(), f"{name}.safetensors")
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        raw = _packaged(source) or _download(source, os.path.join(tmp, os.path.basename(source.url)))
        _convert(raw, os.path.join(tmp, "converted.safetensors"), source.url)
        os.replace(os.path.join(tmp, "converted.safetensors"), path)
    return path


def _packaged(source: Source) -> Optional[str]:
    """The file as an installed package ships it (pip puts DISTS_pytorch's weights.pt in the
    environment's data directory), or None."""
    if source.package_file is None:
        return None
    import importlib.util
    import sys

    package, filename = source.package_file
    if importlib.util.find_spec(package) is None:
        return None
    candidate = os.path.join(sys.prefix, filename)
    return candidate if os.path.isfile(candidate) else None


def _download(source: Source, dest: str) -> str:
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response, open(dest, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except OSError as err:   # URLError, timeouts, refused connections
        raise HubUnavailableError(f"cannot fetch {source.url} ({err}); offline? pass the file "
                                  f"itself (converted to .safetensors, see codi_jax/metrics/weights.py)") from None
    if source.sha256_prefix and not digest.hexdigest().startswith(source.sha256_prefix):
        raise WeightFileError(f"{source.url}: SHA-256 {digest.hexdigest()[:16]}… does not start with "
                              f"{source.sha256_prefix}, the prefix its name promises; not used")
    return dest


def _convert(raw: str, dest: str, origin: str) -> None:
    """A PyTorch ``.pth`` (a state dict of tensors) → ``.safetensors`` of float32 arrays."""
    try:
        import torch
    except ImportError:
        raise WeightFileError(f"converting {origin} needs torch (pip install torch==2.13.0); or pass "
                              f"the file converted to .safetensors (codi_jax/metrics/weights.py)") from None
    from safetensors.numpy import save_file

    try:
        state = torch.load(raw, map_location="cpu", weights_only=True)
    except Exception as err:   # a corrupt or non-state-dict file: torch raises many kinds
        raise WeightFileError(f"{origin}: not a PyTorch state dict of tensors ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFileError(f"{origin}: not a PyTorch state dict of tensors")
    save_file({k: v.float().contiguous().numpy() for k, v in state.items()}, dest)
