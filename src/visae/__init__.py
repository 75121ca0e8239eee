"""visae: understand vision models with sparse autoencoders."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """`visae.SAE` without importing torch when only the version is needed."""
    if name == "SAE":
        from visae.sae import SAE

        return SAE
    raise AttributeError(f"module 'visae' has no attribute {name!r}")
