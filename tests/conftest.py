"""Session-wide test set-up: every cache (converted models, rendered scenes) goes to one
temporary folder, so tests never read or write the user's ~/.cache/visae."""

from __future__ import annotations

import os

import pytest

# no test reaches the model hub: hub-id code paths fail at once with the hub client's offline
# error (read by huggingface_hub when it is first imported, hence here, before any test module)
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["VISAE_CACHE"] = os.environ.get("VISAE_TEST_CACHE") or str(
        tmp_path_factory.mktemp("visae-cache")
    )
