"""What to do when a test's system package (installed by `make test`'s set-up) is missing:
skip on a developer's machine, fail under CI=true, where the set-up must have installed it."""

from __future__ import annotations

import os

import pytest


def require(present: bool, what: str) -> None:
    """Skip (or, in CI, fail) the calling test unless `present`; `what` names the package."""
    if present:
        return
    message = f"{what} is missing (scripts/install-system-deps.sh installs it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
