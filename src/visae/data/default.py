"""The embedded default dataset: concept scenes rendered once and cached per generator identity."""

from __future__ import annotations

import os
from pathlib import Path

from visae.data.scene_dataset import SceneDataset
from visae.data.scenes import MANIFEST, SceneConfig, SceneGenerator, generate_scenes

DEFAULT_SCENES = SceneConfig(n_scenes=1000, size=224, seed=0, objects="auto", pairs_per_kind=50)


def cache_dir() -> Path:
    """`$VISAE_CACHE`, else `$XDG_CACHE_HOME/visae`, else `~/.cache/visae`."""
    if os.environ.get("VISAE_CACHE"):
        return Path(os.environ["VISAE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "visae"


def cached_scenes(
    config: SceneConfig, progress: bool = True, workers: int | None = None
) -> SceneDataset:
    """Scenes for `config`, rendered on first use under the cache, keyed by the generator's
    identity (config + object and background sources), so a change of any input re-renders."""
    gen = SceneGenerator(config)
    folder = cache_dir() / "scenes" / gen.key()[:20]
    if not (folder / MANIFEST).is_file():
        generate_scenes(
            config, folder, workers=workers, progress=progress, overwrite=True, generator=gen
        )
    return SceneDataset.load(folder)


def default_scenes(progress: bool = True) -> SceneDataset:
    """The default dataset of `visae extract` and `make demo`: 1000 scenes of 224 px, seed 0,
    with 50 pairs of each kind (1200 images); Tux Paint photos, or shapes if not installed."""
    return cached_scenes(DEFAULT_SCENES, progress=progress)
