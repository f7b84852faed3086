"""The shared behaviour of the objectives' config dataclasses: named choices checked on
construction, and construction from a config mapping where unknown keys are errors."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping


class Switches:
    """Mixin for frozen dataclasses; subclasses set ``CHOICES`` (field → allowed values) and may
    extend ``check`` for other constraints."""

    CHOICES: ClassVar[Mapping[str, tuple]] = {}

    def __post_init__(self) -> None:
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: unknown value {getattr(self, name)!r}; known: {list(choices)}")
        if getattr(self, "grid", 1) < 1:
            raise ValueError(f"grid: the teacher grid needs at least one step, got {self.grid}")
        self.check()

    def check(self) -> None:
        """Constraints beyond the named choices (none by default)."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]):
        """Builds the config from a (ml_collections) mapping; unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**dict(values))
