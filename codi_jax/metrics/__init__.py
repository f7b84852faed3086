"""Evaluation metrics: FID (Inception-v3 pool features), LPIPS (VGG16 / AlexNet + linear heads),
DISTS (VGG16 with L2 pooling + learned weights) and a multi-scale sliced Wasserstein distance that
needs no pretrained network.

FID, LPIPS and DISTS need the standard network weights, read from local files the user supplies
(see ``fid.load_inception``, ``lpips.load_lpips`` and ``dists.load_dists`` for the exact files),
or fetched from their canonical URLs and cached when given as ``auto`` (``fetch``). Without them
these metrics are *not computed*: ``load_or_not_computed`` returns a ``NotComputed`` with the reason,
which the evaluation writes as such — never a number.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, TypeVar

from codi_jax.models.convert import ModelIOError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class NotComputed:
    """A metric that could not be computed (e.g. its network weights are absent), and why."""

    reason: str

    def to_json(self) -> dict:
        return {"value": None, "not_computed": self.reason}

    def __float__(self) -> float:
        # A missing metric must never turn into a number in a table or a plot.
        raise TypeError(f"metric not computed: {self.reason}")


def load_or_not_computed(loader: Callable[[str], T], path: str | os.PathLike | None,
                         name: str) -> T | NotComputed:
    """``loader(path)``, or ``NotComputed`` when no path is configured or the file is missing,
    unreadable or does not fit the network (every ``ModelIOError``). Other errors propagate."""
    if path is None or str(path) == "":
        return NotComputed(f"{name}: no weight file configured")
    try:
        return loader(os.fspath(path))
    except ModelIOError as err:
        return NotComputed(f"{name}: {err}")


def load_networks(fid_weights: str | None, lpips_weights: str | None, lpips_net: str = "alex",
                  dists_weights: str | None = None) -> tuple:
    """The FID extractor, the LPIPS metric and the DISTS metric from their weight files
    (``lpips_weights`` / ``dists_weights``: one path or several, comma-separated; ``auto``: the
    standard files, fetched and cached by ``fetch``), each ``NotComputed`` when its files are
    absent, unreachable or unfit."""
    from codi_jax.metrics import dists, fetch, fid, lpips

    def files(spec: str, metric: str) -> list[str]:
        return fetch.resolve(spec, metric).split(",")

    return (load_or_not_computed(lambda p: fid.load_inception(files(p, "fid")[0]), fid_weights, "FID"),
            load_or_not_computed(lambda p: lpips.load_lpips(files(p, f"lpips:{lpips_net}"), net=lpips_net),
                                 lpips_weights, "LPIPS"),
            load_or_not_computed(lambda p: dists.load_dists(files(p, "dists")), dists_weights, "DISTS"))


__all__ = ["NotComputed", "load_networks", "load_or_not_computed"]
