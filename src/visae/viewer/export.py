"""Static export: the browser's pages as plain files that open from disk (`file://`) without a
server. Each JSON document becomes a script `data/<key>.js` that hands it to the app, since
browsers refuse `fetch` of local files but do run local scripts."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from visae.analysis.artifact import Analysis
from visae.atomic import atomic_directory
from visae.errors import VisaeError
from visae.viewer.payload import images_payload, index_payload, latents_payload, payload
from visae.viewer.server import SERVED_DIRS, STATIC_FILES, load_analyses, static_dir

STATIC_FLAG = "<script>window.VISAE_STATIC = true;</script>"


def _script(key: str, doc: dict) -> str:
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    return f"visaeData({json.dumps(key)},{body});\n"


def export_static(
    analyses: Sequence[str | os.PathLike[str] | Analysis],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write the browser for `analyses` as static files under `out`; open `out/index.html`.

    Every latent page and every image page is exported, with each analysis's shared
    `latents` and `images` documents, thumbnails and plots. The folder appears only when
    complete.
    """
    loaded = load_analyses(analyses)
    out = Path(out)
    if out.exists() and not overwrite:
        raise VisaeError(f"export folder {out} exists (pass overwrite=True / --overwrite)")
    with atomic_directory(out) as tmp:
        (tmp / "static").mkdir()
        _write(loaded, tmp, progress)
    return out


def _write(analyses: list[Analysis], root: Path, progress: bool) -> None:
    src = static_dir()
    for name in STATIC_FILES:
        if name != "index.html":
            shutil.copyfile(src / name, root / "static" / name)
    html = (src / "index.html").read_text(encoding="utf-8")
    if "<!--static-flag-->" not in html:
        raise RuntimeError("viewer index.html lacks its <!--static-flag--> marker")
    (root / "index.html").write_text(
        html.replace("<!--static-flag-->", STATIC_FLAG), encoding="utf-8"
    )
    data = root / "data"
    data.mkdir()
    (data / "index.js").write_text(_script("index", index_payload(analyses)), encoding="utf-8")
    for idx, a in enumerate(analyses):
        base = data / f"a{idx}"
        (base / "latent").mkdir(parents=True)
        (base / "image").mkdir()
        (base / "latents.js").write_text(
            _script(f"a{idx}/latents", latents_payload(a)), encoding="utf-8"
        )
        (base / "images.js").write_text(
            _script(f"a{idx}/images", images_payload(a)), encoding="utf-8"
        )
        for j in tqdm(
            range(a.n_latents),
            desc=f"export {a.name}: latents",
            unit="latent",
            disable=not progress,
        ):
            key = f"a{idx}/latent/{j}"
            (base / "latent" / f"{j}.js").write_text(
                _script(key, payload(analyses, key)), encoding="utf-8"
            )
        for i in tqdm(a.images, desc=f"export {a.name}: images", unit="img", disable=not progress):
            key = f"a{idx}/image/{i}"
            (base / "image" / f"{i}.js").write_text(
                _script(key, payload(analyses, key)), encoding="utf-8"
            )
        for sub in SERVED_DIRS:
            if (a.path / sub).is_dir():
                shutil.copytree(a.path / sub, root / f"a{idx}" / sub)
