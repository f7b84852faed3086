"""One process of the multi-host test (tests/test_multihost.py): ``python -m codi_jax.main`` with the
records each process reads written down.

Usage: ``python tests/multihost_worker.py <records.json> --config=... --workdir=... [main's flags]``.
Every TFDS record this process loads is noted as (split, global index); at exit the notes and the
split's shard (offset, length, total) go to ``<records.json>``, so the test can check that each
process read only its own shard.
"""

import atexit
import json
import sys
from collections import defaultdict

from absl import app

from codi_jax import main
from codi_jax.data import sources

_read: dict[str, set] = defaultdict(set)
_shards: dict[str, tuple[int, int, int]] = {}
_original_load = sources.TfdsSource.load


def _recording_load(self, i):
    _read[self.name].add(int(self.offset + i))
    _shards[self.name] = (int(self.offset), len(self), int(self.total))
    return _original_load(self, i)


def _dump(path: str) -> None:
    with open(path, "w") as f:
        json.dump({name: {"read": sorted(ids), "shard": _shards[name]} for name, ids in _read.items()}, f)


if __name__ == "__main__":
    sources.TfdsSource.load = _recording_load
    atexit.register(_dump, sys.argv[1])
    app.run(main.main, argv=[sys.argv[0]] + sys.argv[2:])
