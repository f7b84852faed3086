"""One process of the multi-host test (tests/test_multihost.py): ``python -m codi_jax.main`` with the
records each process reads written down.

Usage: ``python tests/multihost_worker.py <records.json> --config=... --workdir=... [main's flags]``.
Every record this process loads (TFDS or embedded source) is noted as (split, global index); at exit the notes and the
split's shard (offset, length, total) go to ``<records.json>``, so the test can check that each
process read only its own shard.
"""

import atexit
import json
import sys
from collections import defaultdict

from absl import app

from codi_jax import main
from codi_jax.data import embedded, sources

_read: dict[str, set] = defaultdict(set)
_shards: dict[str, tuple[int, int, int]] = {}


def _recording(original):
    def load(self, i):
        _read[self.name].add(int(self.offset + i))
        _shards[self.name] = (int(self.offset), len(self), int(self.total))
        return original(self, i)

    return load


def _dump(path: str) -> None:
    with open(path, "w") as f:
        json.dump({name: {"read": sorted(ids), "shard": _shards[name]} for name, ids in _read.items()}, f)


if __name__ == "__main__":
    for cls in (sources.TfdsSource, embedded.EmbeddedSource):
        cls.load = _recording(cls.load)
    atexit.register(_dump, sys.argv[1])
    app.run(main.main, argv=[sys.argv[0]] + sys.argv[2:])
