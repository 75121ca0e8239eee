"""Which store files have already been verified, so that a store is hashed once, not at every
open: for each file, the (size, mtime_ns, inode) it had when its sha256 was last checked.

The record lives in the visae cache folder (`visae.data.cache_dir()`, `$VISAE_CACHE`), one file
per store keyed by the store's resolved path, never inside the store: a store stays
byte-identical to one written in one go and can be read from a read-only folder. A record that
cannot be read or written is ignored (debug log); the only cost is hashing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from visae.atomic import write_text
from visae.data.default import cache_dir
from visae.errors import VisaeError

logger = logging.getLogger("visae.store")

FORMAT = "visae.store-checks"
VERSION = 1


def checks_file(store: Path) -> Path:
    key = hashlib.sha256(str(store.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "store-checks" / f"{key}.json"


def stamp(st: os.stat_result) -> list[int]:
    """What must be unchanged for a past check to still hold."""
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)]


class VerifiedFiles:
    """The verification record of one store: `{relative path: (stamp, sha256)}`."""

    def __init__(self, store: Path) -> None:
        self.store = store.resolve()
        self.path = checks_file(store)
        self.files: dict[str, list[Any]] = {}
        self.dirty = False
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
            same = (raw.get("format"), raw.get("version"), raw.get("store"))
            if same == (FORMAT, VERSION, str(self.store)):
                self.files = dict(raw["files"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
            logger.debug("ignoring unreadable store check record %s: %s", self.path, exc)

    def holds(self, rel: str, st: os.stat_result, sha256: str) -> bool:
        """True when `rel` was verified to have `sha256` and has not changed since."""
        entry = self.files.get(rel)
        return entry is not None and entry == [*stamp(st), sha256]

    def record(self, rel: str, st: os.stat_result, sha256: str) -> None:
        entry = [*stamp(st), sha256]
        if self.files.get(rel) != entry:
            self.files[rel] = entry
            self.dirty = True

    def save(self, keep: Iterable[str] | None = None) -> None:
        """Write the record if it changed (`keep`: drop entries of other files)."""
        if keep is not None:
            wanted = set(keep)
            stale = [rel for rel in self.files if rel not in wanted]
            for rel in stale:
                del self.files[rel]
            self.dirty = self.dirty or bool(stale)
        if not self.dirty:
            return
        text = json.dumps(
            {"format": FORMAT, "version": VERSION, "store": str(self.store), "files": self.files},
            sort_keys=True,
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(self.path, text)
        except (OSError, VisaeError) as exc:
            logger.debug("cannot save the store check record %s: %s", self.path, exc)
            return
        self.dirty = False
