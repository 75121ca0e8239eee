"""Named registries: each name is registered once, and a lookup of an unknown name says which
names exist. `ARCHS` holds the SAE architecture classes; `SAEConfig` validates against it and
`SAE.create` builds from it, so an architecture is named in exactly one place (its class).

This module imports nothing of the SAE code, so the config, the model and the checkpoint format
can all read the registry without importing each other.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from visae.errors import VisaeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order; a repeated name is refused."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if not name:
            raise VisaeError(f"a {self.kind} needs a non-empty name")
        if name in self._entries:
            raise VisaeError(
                f"{self.kind} {name!r} is already registered (by {self._entries[name]!r})"
            )
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise VisaeError(
                f"unknown {self.kind} {name!r}; expected one of {self.names()}"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


# SAE classes by `arch`; each class also says which config options it reads (`uses`).
ARCHS: Registry[Any] = Registry("SAE architecture")
