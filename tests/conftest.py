"""Session-wide test set-up: every cache (converted models, rendered scenes) goes to one
temporary folder, so tests never read or write the user's ~/.cache/visae."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# no test reaches the model hub: hub-id code paths fail at once with the hub client's offline
# error (read by huggingface_hub when it is first imported, hence here, before any test module)
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["VISAE_CACHE"] = os.environ.get("VISAE_TEST_CACHE") or str(
        tmp_path_factory.mktemp("visae-cache")
    )


@pytest.fixture(scope="session")
def study_analysis(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real analysis for the study tests (DINOv2-S at 112 px over 120 rendered scenes, a TopK
    SAE trained on its layer 10, evaluated so the analysis carries the proxies), ~40 s, built
    once for every study test module."""
    from study_helpers import build_study_analysis

    return build_study_analysis(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl in a temp dir, a Unix socket only, as
    the postgres user when run as root); yields a function that creates a fresh database and
    returns its URL."""
    from study_helpers import postgres_cluster

    with postgres_cluster() as new_database:
        yield new_database
