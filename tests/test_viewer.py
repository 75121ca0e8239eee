"""Feature browser: the JSON documents against the artifact, the read-only server, and the app
itself in headless Chromium (served and as a static export opened from file://)."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_analysis import make_pipeline

from visae.analysis import Analysis, AnalysisConfig, run_analysis
from visae.errors import VisaeError
from visae.viewer import export_static, make_server
from visae.viewer.payload import (
    EXEMPLARS,
    MAP_LEVELS,
    SPARSE_MAX_PATCHES,
    code_id_dtype,
    encode_map,
    payload,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# the first analysis's evaluation-like columns (see `scores`)
CONCEPTS = ("object:animals/mammals/dogs", "object:Animals/birds", None, "scene:indoor/kitchen")
SOURCE = "runs/eval-topk"
NO_MS = (3, 10)


def scores(n: int) -> tuple[dict[str, np.ndarray], dict[str, list[str | None]]]:
    """`ms`: distinct multiples of 0.04 (shown unrounded), undefined on NO_MS; `concept_f1`:
    multiples of 0.2 (ties); `concept`: CONCEPTS in turn, so every fourth latent has none."""
    ms = ((np.arange(n) * 7) % n) / 25
    ms[list(NO_MS)] = np.nan
    f1 = (np.arange(n) % 5) / 5
    return {"ms": ms, "concept_f1": f1}, {"concept": [CONCEPTS[j % 4] for j in range(n)]}


@pytest.fixture(scope="module")
def analyses(tmp_path_factory: pytest.TempPathFactory) -> list[Analysis]:
    """Two analyses of the same images: a TopK SAE on a 4x5 patch grid and a ReLU SAE on a
    2x3 grid (two 'models'), so the side-by-side image page maps clicks between grids."""
    root = tmp_path_factory.mktemp("viewer")
    p0 = make_pipeline(root / "m0", n_images=30, n_latents=24, k=3, grid=(4, 5))
    p1 = make_pipeline(root / "m1", n_images=30, arch="relu", n_latents=16, grid=(2, 3), d=12)
    cfg = AnalysisConfig(top_n=4, sample_images=6, patch_codes_k=6)
    a0 = run_analysis(p0.sae, p0.store, root / "a0", config=cfg, progress=False, name="topk")
    a1 = run_analysis(p1.sae, p1.store, root / "a1", config=cfg, progress=False, name="relu")
    assert a0.dataset_fingerprint == a1.dataset_fingerprint
    a0.add_metric("score", np.arange(a0.n_latents, dtype=float)[::-1])
    metrics, texts = scores(a0.n_latents)
    a0.add_columns(metrics=metrics, texts=texts, source=SOURCE)
    return [Analysis.load(a0.path), Analysis.load(a1.path)]


@pytest.fixture(scope="module")
def server(analyses: list[Analysis]) -> Iterator[str]:
    srv = make_server(analyses, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}/"
    srv.shutdown()
    srv.server_close()


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def busiest_latent(a: Analysis) -> int:
    """A latent with a full top list (the most frequent one)."""
    return int(np.argmax(a.table["fire_image"]))


def decode_map(text: str, n: int) -> np.ndarray:
    """The levels of a map as the app reads them: n bytes dense, else (u16 patch, u8 level)."""
    raw = base64.b64decode(text)
    if len(raw) == n:
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    assert len(raw) % 3 == 0 and len(raw) < n
    out = np.zeros(n, dtype=np.int64)
    b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int64)
    out[b[:, 0] | (b[:, 1] << 8)] = b[:, 2]
    return out


def decode_codes(doc: dict[str, Any], patches: int) -> tuple[np.ndarray, np.ndarray]:
    c = doc["codes"]
    ids = np.frombuffer(base64.b64decode(c["latents"]), dtype=f"<i{c['id_bytes']}")
    vals = np.frombuffer(base64.b64decode(c["values"]), dtype="<f2")
    return ids.reshape(patches, c["k"]), vals.reshape(patches, c["k"])


# ---------------------------------------------------------------- documents and server


def test_documents_match_the_artifact(analyses: list[Analysis]) -> None:
    a = analyses[0]
    index = payload(analyses, "index")
    assert [x["name"] for x in index["analyses"]] == ["topk", "relu"]
    assert index["analyses"][0]["metrics"] == ["concept_f1", "ms", "score"]
    assert index["analyses"][0]["texts"] == ["concept"]
    assert index["analyses"][0]["sources"] == dict.fromkeys(("concept", "concept_f1", "ms"), SOURCE)
    assert index["analyses"][1]["metrics"] == index["analyses"][1]["texts"] == []
    assert index["analyses"][1]["grid"] == [2, 3]
    assert index["analyses"][0]["code_images"] == a.code_images.tolist()

    cols = payload(analyses, "a0/latents")
    assert cols["columns"]["fire_patch"] == a.table["fire_patch"].tolist()
    np.testing.assert_allclose(cols["columns"]["max_patch"], a.table["max_patch"], rtol=1e-7)
    assert cols["metrics"]["score"][0] == a.n_latents - 1
    ms = scores(a.n_latents)[0]["ms"]
    assert cols["metrics"]["ms"] == [None if math.isnan(v) else v for v in ms]  # NaN: null
    assert cols["texts"] == {"concept": [CONCEPTS[j % 4] for j in range(a.n_latents)]}
    assert payload(analyses, "a1/latents")["texts"] == {}
    for j in range(a.n_latents):
        assert cols["exemplars"][j] == [e.image for e in a.top(j, "max")][:EXEMPLARS]

    images = payload(analyses, "a0/images")
    assert images["image"] == sorted(a.images)
    for n, i in enumerate(images["image"]):
        assert images["thumb"][n] == a.images[i]["thumb"]
        assert images["source"][n] == a.images[i]["source"]
        assert [images["label_names"][x] for x in images["labels"][n]] == a.images[i]["labels"]
        assert images["codes"][n] == int(a.has_codes(i))
    assert len(set(images["label_names"])) == len(images["label_names"])

    patches = a.grid[0] * a.grid[1]
    kinds = set()
    for j in range(a.n_latents):
        doc = payload(analyses, f"a0/latent/{j}")
        scale = a.table["max_patch"][j] or 1.0
        for r in a.rankings:
            entries = a.top(j, r)
            assert doc["rankings"][r]["images"] == [e.image for e in entries]
            np.testing.assert_allclose(
                doc["rankings"][r]["values"], [e.value for e in entries], rtol=1e-3
            )
            for e in entries:
                text = doc["maps"][str(e.image)]
                kinds.add(len(base64.b64decode(text)) == patches)
                np.testing.assert_array_equal(
                    decode_map(text, patches), np.round(e.map.ravel() / scale * MAP_LEVELS)
                )
        assert sum(doc["hist"]["counts"]) == a.table["fire_patch"][j]
        assert len(doc["hist"]["edges"]) == len(doc["hist"]["counts"]) + 1
    assert kinds == {True, False}  # both the dense and the sparse map encoding were used

    for i in a.code_images.tolist():
        img = payload(analyses, f"a0/image/{i}")
        lat, val = a.patch_codes(i)
        got_lat, got_val = decode_codes(img, patches)
        np.testing.assert_array_equal(got_lat, lat)
        np.testing.assert_array_equal(got_val, val)  # float16 in the artifact: exact
        cl, cv = a.cls_codes(i)
        assert img["cls"]["latents"] == cl[cl >= 0].tolist()
        np.testing.assert_allclose(img["cls"]["values"], cv[cl >= 0], rtol=1e-3)
    for bad in ("a2/latents", "a2/images", "a0/latent/999", "../x", "a0/image/x"):
        with pytest.raises((KeyError, VisaeError)):
            payload(analyses, bad)


def test_server_is_read_only_and_confined(server: str, analyses: list[Analysis]) -> None:
    status, body = get(server)
    assert status == 200 and b"static/app.js" in body
    assert get(server + "static/app.js")[0] == 200
    status, body = get(server + "data/index.json")
    assert status == 200 and json.loads(body)["analyses"][1]["name"] == "relu"
    status, body = get(server + "data/a1/images.json")
    assert status == 200 and json.loads(body) == payload(analyses, "a1/images")
    thumb = analyses[0].images[int(analyses[0].code_images[0])]["thumb"]
    status, body = get(server + "a0/" + thumb)
    assert status == 200 and body[:2] == b"\xff\xd8"  # a JPEG
    assert get(server + "a0/plots/frequency.png")[0] == 200
    for path in (
        "a0/analysis.json",
        "a0/thumbs/../analysis.json",
        "a0/thumbs/%2e%2e",
        "a9/plots/frequency.png",
        "data/a0/latent/999.json",
        "static/../../x",
        "data/a0/latent/1/../../../analysis.json",
    ):
        assert get(server + path)[0] == 404, path
    req = urllib.request.Request(server + "data/index.json", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 501


def test_export_writes_every_page(tmp_path: Path, analyses: list[Analysis]) -> None:
    out = export_static(analyses, tmp_path / "site", progress=False)
    html = (out / "index.html").read_text()
    assert "window.VISAE_STATIC = true" in html
    for idx, a in enumerate(analyses):
        assert len(list((out / "data" / f"a{idx}" / "latent").iterdir())) == a.n_latents
        assert len(list((out / "data" / f"a{idx}" / "image").iterdir())) == len(a.images)
        assert len(list((out / f"a{idx}" / "thumbs").iterdir())) == len(a.images)
    for key in ("a1/latent/0", "a0/images", "a1/latents", f"a0/image/{analyses[0].code_images[0]}"):
        text = (out / "data" / f"{key}.js").read_text()
        assert text.startswith(f"visaeData({json.dumps(key)},")
        doc = json.loads(text[len(f"visaeData({json.dumps(key)},") : -len(");\n")])
        assert doc == json.loads(json.dumps(payload(analyses, key)))
    with pytest.raises(VisaeError, match="exists"):
        export_static(analyses, out, progress=False)


def test_export_holds_each_image_record_once(tmp_path: Path, analyses: list[Analysis]) -> None:
    """Image records live in one shared document per analysis, never on latent or image pages,
    and an image page is little more than its packed per-patch codes."""
    out = export_static(analyses, tmp_path / "site", progress=False)
    for idx, a in enumerate(analyses):
        base = out / "data" / f"a{idx}"
        shared = (base / "images.js").read_text()
        pages = {p: p.read_text() for d in ("latent", "image") for p in (base / d).iterdir()}
        for info in a.images.values():
            assert shared.count(json.dumps(info["thumb"])) == 1
            assert shared.count(json.dumps(info["source"])) == 1
            for p, text in pages.items():
                # '/' and '.' are not base64 digits: these cannot occur by chance
                assert info["thumb"] not in text and info["source"] not in text, p
        # an image page: base64 of its [patches, K] ids and float16 values, plus the CLS list
        k = int(a.meta["patch_codes_k"])
        packed = a.grid[0] * a.grid[1] * k * (code_id_dtype(a.n_latents).itemsize + 2) * 4 / 3
        for i in a.images:
            size = len(pages[base / "image" / f"{i}.js"])
            assert size <= (packed + 16 * k + 200 if a.has_codes(i) else 200), (i, size)


@pytest.mark.parametrize("n", [20, 21, 256, 1369])
def test_map_encoding_round_trips_and_is_never_longer_than_dense(n: int) -> None:
    rng = np.random.default_rng(n)
    for density in (0.0, 0.05, 0.3, 0.34, 0.5, 1.0):
        levels = np.where(rng.random(n) < density, rng.integers(1, 256, n), 0).astype(np.uint8)
        text = encode_map(levels)
        np.testing.assert_array_equal(decode_map(text, n), levels)
        assert len(text) <= 4 * -(-n // 3)  # the base64 length of the dense bytes
    # a grid too large for uint16 patch ids is sent dense, however sparse
    big = np.zeros(SPARSE_MAX_PATCHES + 1, dtype=np.uint8)
    big[[5, SPARSE_MAX_PATCHES]] = [9, 200]
    assert len(base64.b64decode(encode_map(big))) == big.size
    np.testing.assert_array_equal(decode_map(encode_map(big), big.size), big)


# ---------------------------------------------------------------- extra per-latent columns


def copy_analysis(a: Analysis, dest: Path) -> Analysis:
    """A private copy of a fixture analysis to add columns to."""
    shutil.copytree(a.path, dest)
    return Analysis.load(dest)


def columns_state(a: Analysis) -> tuple[Any, ...]:
    """An analysis's extra columns as comparable values (NaN as None)."""
    metrics = {k: [None if math.isnan(x) else x for x in v] for k, v in a.metrics.items()}
    return metrics, a.texts, a.sources


def hidden_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_extra_columns_round_trip(tmp_path: Path, analyses: list[Analysis]) -> None:
    a = copy_analysis(analyses[1], tmp_path / "a")
    n = a.n_latents
    ms = np.linspace(0, 1, n)
    ms[2] = np.nan
    odd = 'a "quoted", comma\r\nand a line break'
    concept = ["object:animals/mammals/dogs", odd, "", None, "ünïcode"] + [None] * (n - 5)
    a.add_columns(metrics={"ms": ms, "f1": ms * 2}, texts={"concept": concept}, source=tmp_path)
    a.add_metric("plain", np.arange(n))
    again = Analysis.load(a.path)
    assert sorted(again.metrics) == ["f1", "ms", "plain"]
    np.testing.assert_array_equal(again.metrics["ms"], ms)  # bit-exact, NaN kept
    np.testing.assert_array_equal(again.metrics["f1"], ms * 2)
    assert again.texts == {"concept": [*concept[:2], None, None, *concept[4:]]}  # "" is None
    assert again.sources == dict.fromkeys(("concept", "f1", "ms"), str(tmp_path))

    # a column replaced without a source loses its old one; with one, takes the new one
    again.add_metric("f1", ms)
    again.add_texts({"concept": [None] * n, "kind": ["x"] * n}, source="eval-2")
    again.add_metrics({"ms": -ms, "ms_corrected": ms - 1})
    last = Analysis.load(a.path)
    np.testing.assert_array_equal(last.metrics["ms"], -ms)
    np.testing.assert_array_equal(last.metrics["plain"], np.arange(n))
    assert last.texts == {"concept": [None] * n, "kind": ["x"] * n}
    assert last.sources == {"concept": "eval-2", "kind": "eval-2"}
    header = (a.path / "texts.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "latent,concept,kind"
    assert json.loads((a.path / "columns.json").read_text())["sources"] == last.sources
    assert hidden_files(a.path) == []


def test_extra_columns_refuse_bad_input_before_writing(
    tmp_path: Path, analyses: list[Analysis]
) -> None:
    a = copy_analysis(analyses[1], tmp_path / "a")
    n = a.n_latents
    ok = np.zeros(n)
    a.add_columns(metrics={"ms": ok}, texts={"concept": ["dog"] * n}, source="eval")
    files = {name: (a.path / name).read_bytes() for name in ("metrics.csv", "texts.csv")}
    files["columns.json"] = (a.path / "columns.json").read_bytes()
    bad: list[tuple[Any, str]] = [
        (lambda: a.add_metrics({"good": ok, "bad": ok[:3]}), r"metric 'bad' has shape \(3,\)"),
        (
            lambda: a.add_columns(metrics={"good": ok}, texts={"t": ["x"] * (n - 1)}),
            f"text column 't' has {n - 1} values; expected {n}",
        ),
        (lambda: a.add_texts({"t": ["x", 3] + [None] * (n - 2)}), "int at latent 1"),
        (lambda: a.add_text("t", "dog" * n), "not a sequence"),
        (lambda: a.add_metrics({"s": ["high"] * n}), "'s' has non-numeric values"),
        (lambda: a.add_metric("freq_patch", ok), "'freq_patch' is not allowed"),
        (lambda: a.add_metric("latent", ok), "'latent' is not allowed"),
        (lambda: a.add_text("9 lives", [None] * n), "'9 lives' is not allowed"),
        (lambda: a.add_text("ms", [None] * n), "'ms' is already a metric"),
        (lambda: a.add_metric("concept", ok), "'concept' is already a text column"),
        (
            lambda: a.add_columns(metrics={"x": ok}, texts={"x": [None] * n}),
            "'x' is given both as a metric and as a text column",
        ),
        (lambda: a.add_columns(), "no columns to add"),
        (lambda: a.add_metric("y", ok, source=""), "source of added columns is empty"),
    ]
    for call, message in bad:
        with pytest.raises(VisaeError, match=message):
            call()
        assert {name: (a.path / name).read_bytes() for name in files} == files, message
        assert hidden_files(a.path) == [], message
    assert sorted(Analysis.load(a.path).metrics) == ["ms"]


def test_extra_columns_survive_a_kill_at_every_step(
    tmp_path: Path, analyses: list[Analysis], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write of metrics, texts and sources is killed at each of its renames: a reader then
    sees all of the old columns or all of the new ones, and the next write starts from that."""

    class Killed(BaseException):
        pass

    base = copy_analysis(analyses[1], tmp_path / "base")
    n = base.n_latents
    base.add_columns(metrics={"ms": np.zeros(n)}, texts={"concept": ["old"] * n}, source="e1")
    old = columns_state(base)
    new_metrics = {"ms": np.ones(n), "ms_corrected": np.full(n, 0.5), "f1": np.full(n, 0.25)}
    new_texts = {"concept": ["new"] * n, "lca": ["animals"] * n}
    real_replace = os.replace
    renames = 0

    def counting(src: Any, dst: Any) -> None:
        nonlocal renames
        renames += 1
        real_replace(src, dst)

    probe = copy_analysis(base, tmp_path / "probe")
    monkeypatch.setattr(os, "replace", counting)
    probe.add_columns(metrics=new_metrics, texts=new_texts, source="e2")
    monkeypatch.setattr(os, "replace", real_replace)
    new = columns_state(probe)
    assert renames >= 4  # three files and the journal at least

    seen = []
    for kill_at in range(renames):
        a = copy_analysis(base, tmp_path / f"kill{kill_at}")
        calls = 0

        def killing(src: Any, dst: Any, kill_at: int = kill_at) -> None:
            nonlocal calls
            if calls == kill_at:
                raise Killed
            calls += 1
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", killing)
        with pytest.raises(Killed):
            a.add_columns(metrics=new_metrics, texts=new_texts, source="e2")
        monkeypatch.setattr(os, "replace", real_replace)
        state = columns_state(Analysis.load(a.path))
        assert state in (old, new), kill_at
        seen.append(state == new)
        Analysis.load(a.path).add_metric("later", np.zeros(n))
        metrics, texts, sources = columns_state(Analysis.load(a.path))
        assert metrics.pop("later") == [0.0] * n
        assert (metrics, texts, sources) == state, kill_at
        assert hidden_files(a.path) == [], kill_at
    assert True in seen and False in seen  # kills both before and after the commit point


# ---------------------------------------------------------------- the app in Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert CHROMIUM.exists(), "Debian chromium is not installed (`make test` installs it)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


HEAT_ALPHA = """c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lo = 255, hi = 0;
  for (let i = 3; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
  return [lo, hi];
}"""

CENTER_ALPHA = """(c, args) => {
  const [gh, gw] = args;
  const ctx = c.getContext('2d'), out = [];
  for (let r = 0; r < gh; r++) for (let q = 0; q < gw; q++) {
    const x = Math.floor((q + 0.5) * c.width / gw), y = Math.floor((r + 0.5) * c.height / gh);
    out.push(ctx.getImageData(x, y, 1, 1).data[3]);
  }
  return out;
}"""


def wait_ready(page: Any, route: str) -> None:
    page.wait_for_function(f"document.body.dataset.ready === {json.dumps(route)}")


def check_cards(
    page: Any, top: list[Any], grid: tuple[int, int], scale: float, strict: bool = True
) -> None:
    """The latent page's cards show `top` in order, thumbnails loaded, each overlay drawn from
    its map (`scale`: the latent's max): strong patches opaque, silent patches amid silent ones
    clear. `strict` adds that the strongest patch is the most opaque and every silent patch
    nearly clear, which holds on coarse grids; on fine ones the upsampling filter blends
    neighbours enough to reorder close patches."""
    cards = page.locator(".card")
    assert cards.evaluate_all("cs => cs.map(c => Number(c.dataset.image))") == [
        e.image for e in top
    ]
    page.wait_for_function(
        "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth)"
    )
    for n, e in enumerate(top):
        heat = cards.nth(n).locator("canvas")
        lo, hi = heat.evaluate(HEAT_ALPHA)
        assert hi > lo  # an overlay was drawn and it is not uniform
        alpha = np.array(heat.evaluate(CENTER_ALPHA, list(grid)))
        t = e.map.ravel() / scale
        # the heat colour's alpha (app.js heatColor) at the default overlay opacity 0.75
        want = 0.75 * 255 * np.minimum(0.9, 0.25 + 0.75 * t**0.8)
        strong = t >= 0.25
        assert strong.any() and (alpha[strong] >= 0.5 * want[strong]).all()
        silent_around = ~np.pad(e.map > 0, 1)
        quiet = np.ones(grid, dtype=bool)
        for dr in range(3):
            for dc in range(3):
                quiet &= silent_around[dr : dr + grid[0], dc : dc + grid[1]]
        assert (alpha[quiet.ravel()] < 0.1 * 255).all()
        if strict:
            assert alpha[np.argmax(t)] == alpha.max()  # strongest patch is the most opaque
            # smoothing blends a little of the neighbours into a silent patch's centre, no more
            assert (alpha[t == 0] < 0.25 * alpha.max()).all()


def row_ids(panel: Any) -> list[int]:
    return panel.locator("tbody tr").evaluate_all("rs => rs.map(r => Number(r.dataset.latent))")


def shown(v: float) -> str:
    """A score as the app shows it (3 significant digits; `scores` needs no rounding)."""
    return "–" if math.isnan(v) else f"{v:.3g}"


def check_scores(page: Any, a: Analysis) -> None:
    """The first analysis's latent list sorted by a score and a text column (undefined values
    last both ways), filtered by text and by a threshold, and the same view after a reload
    from the URL alone. Leaves every filter cleared."""
    lst = page.locator(".latent-list").nth(0)
    metrics, texts = scores(a.n_latents)
    ms, concept = metrics["ms"], texts["concept"]
    ids = range(a.n_latents)
    scored = [j for j in ids if j not in NO_MS]
    nan_last = sorted(NO_MS)

    lst.locator("th[data-column='ms']").click()
    assert row_ids(lst) == sorted(scored, key=lambda j: -ms[j]) + nan_last
    lst.locator("th[data-column='ms']").click()
    by_ms = sorted(scored, key=lambda j: ms[j]) + nan_last
    assert row_ids(lst) == by_ms
    cells = lst.locator("tbody tr td[data-column='concept']").all_inner_texts()
    assert cells == [concept[j] or "–" for j in by_ms]

    search = lst.locator("input.text-filter")
    search.fill("DOG")  # case-insensitive substring over the text columns
    dogs = [j for j in by_ms if j % 4 == 0]
    assert row_ids(lst) == dogs and dogs
    lst.locator("select.threshold-metric").select_option("ms")
    lst.locator("input.threshold-value").fill("0.5")
    assert row_ids(lst) == [j for j in dogs if ms[j] >= 0.5]
    assert lst.locator(".count").inner_text() == f"{len(row_ids(lst))} of {a.n_latents} latents"

    route = page.evaluate("location.hash")
    assert "a0.q=DOG" in route and "a0.m=ms" in route and "a1." not in route
    page.reload()
    wait_ready(page, route)
    assert row_ids(lst) == [j for j in dogs if ms[j] >= 0.5]
    assert search.input_value() == "DOG"
    assert lst.locator("select.threshold-metric").input_value() == "ms"

    search.fill("animals")  # "object:animals/..." and "object:Animals/..."
    assert row_ids(lst) == [j for j in by_ms if j % 4 in (0, 1) and ms[j] >= 0.5]
    search.fill("")
    lst.locator("select.threshold-op").select_option("le")
    lst.locator("input.threshold-value").fill("0.2")  # inclusive
    assert row_ids(lst) == [j for j in by_ms if ms[j] <= 0.2]
    lst.locator("input.threshold-value").fill("abc")  # not a number: no threshold
    assert row_ids(lst) == by_ms
    assert "invalid" in (lst.locator("input.threshold-value").get_attribute("class") or "")
    lst.locator("input.threshold-value").fill("")
    lst.locator("select.threshold-metric").select_option("")

    lst.locator("th[data-column='concept']").click()  # text: ascending first, none last
    key = {c: n for n, c in enumerate(sorted({c for c in concept if c}, key=str.lower))}
    assert row_ids(lst) == sorted(ids, key=lambda j: (concept[j] is None, key.get(concept[j]), j))
    assert page.locator(".latent-list").nth(1).locator(".threshold").count() == 0


def check_latent_scores(page: Any, a: Analysis, j: int) -> None:
    """The latent page lists every metric and text value of the latent, and their source."""
    box = page.locator(".scores")
    want = {name: shown(float(v[j])) for name, v in a.metrics.items()}
    want.update({name: v[j] or "–" for name, v in a.texts.items()})
    got = box.locator("[data-column]").evaluate_all(
        "ds => ds.map(d => [d.dataset.column, d.querySelector('.value').textContent])"
    )
    assert dict(got) == want and len(got) == len(want) == 4
    assert box.locator("[data-column='score'] .value").inner_text() == shown(a.n_latents - 1 - j)
    assert page.locator(".latent-page .sources").inner_text() == f"scores from {SOURCE}"
    assert box.locator("[data-column='ms']").get_attribute("title") == f"from {SOURCE}"


def check_app(page: Any, base: str, analyses: list[Analysis]) -> None:
    """Open the app, a latent, its images with overlays, an image page, a patch, the slider."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    a0, a1 = analyses
    page.goto(base)
    wait_ready(page, "#/")
    lists = page.locator(".latent-list")
    assert lists.count() == 2
    assert lists.nth(0).locator("tbody tr").count() == a0.n_latents
    first_ids = (
        lists.nth(0)
        .locator("tbody tr")
        .evaluate_all("rows => rows.map(r => Number(r.dataset.latent))")
    )
    freq = a0.table["freq_patch"]
    assert first_ids == sorted(range(a0.n_latents), key=lambda j: (-freq[j], j))
    lists.nth(0).locator("th[data-column='score']").click()
    assert int(lists.nth(0).locator("tbody tr").first.get_attribute("data-latent")) == 0
    lists.nth(0).locator("input[type=search]").fill("1")
    prefix = lists.nth(0).locator("tbody tr").evaluate_all("rs => rs.map(r => r.dataset.latent)")
    assert prefix and all(s.startswith("1") for s in prefix)
    lists.nth(0).locator("input[type=search]").fill("")
    check_scores(page, a0)

    j = busiest_latent(a0)
    lists.nth(0).locator(f"tbody tr[data-latent='{j}']").click()
    wait_ready(page, f"#/latent/0/{j}")
    top = a0.top(j, "max")
    cards = page.locator(".card")
    assert cards.count() == len(top) >= 2
    assert cards.evaluate_all("cs => cs.map(c => Number(c.dataset.image))") == [
        e.image for e in top
    ]
    check_cards(page, top, a0.grid, float(a0.table["max_patch"][j]))
    assert page.locator("canvas.hist").count() == 1
    check_latent_scores(page, a0, j)
    page.locator(".tabs button[data-ranking='mean']").click()
    wait_ready(page, f"#/latent/0/{j}?r=mean")
    assert page.locator(".card").evaluate_all("cs => cs.map(c => Number(c.dataset.image))") == [
        e.image for e in a0.top(j, "mean")
    ]

    # image page: the first top image, which both analyses hold codes for
    image = next(e.image for e in a0.top(j, "mean") if a1.has_codes(e.image))
    page.goto(base + f"#/image/0/{image}?l={j}")
    wait_ready(page, f"#/image/0/{image}?l={j}")
    panels = page.locator(".image-panel")
    assert panels.count() == 2
    overlay = panels.nth(0).locator("canvas")
    box = overlay.bounding_box()
    # click the centre of patch (row 2, col 3) of the 4x5 grid: relative (0.7, 0.625)
    page.mouse.click(box["x"] + 0.7 * box["width"], box["y"] + 0.625 * box["height"])
    page.wait_for_selector(".patch-title")
    k = a0.meta["patch_codes_k"]
    for panel, a, patch in ((panels.nth(0), a0, 2 * 5 + 3), (panels.nth(1), a1, 1 * 3 + 2)):
        assert int(panel.locator(".patch-title").get_attribute("data-patch")) == patch
        lat, val = a.patch_codes(image)
        want = [int(x) for x in lat[patch] if x >= 0]
        got = panel.locator(".patch-latent").evaluate_all(
            "rs => rs.map(r => [Number(r.dataset.latent), Number(r.dataset.value)])"
        )
        assert [g[0] for g in got] == want[:5]
        assert [g[1] for g in got] == [float(v) for v in val[patch][: len(got)]]  # float16, exact
        ex = panel.locator(".patch-latent").first.locator(".exemplars img").count()
        assert ex == len(a.top(want[0], "max")[:6])
    page.locator("#count-slider").fill(str(k))
    for panel, a, patch in ((panels.nth(0), a0, 13), (panels.nth(1), a1, 5)):
        lat, _ = a.patch_codes(image)
        assert panel.locator(".patch-latent").count() == int((lat[patch] >= 0).sum())
    page.locator("#count-slider").fill("1")
    assert panels.nth(0).locator(".patch-latent").count() == 1
    assert not errors, errors


def test_app_served(browser: Any, server: str, analyses: list[Analysis]) -> None:
    page = browser.new_page()
    check_app(page, server, analyses)
    page.goto(server + "#/images/0")
    wait_ready(page, "#/images/0")
    assert page.locator(".gallery a").count() == len(analyses[0].sample_images)
    page.close()


def test_app_static_export(browser: Any, tmp_path: Path, analyses: list[Analysis]) -> None:
    out = export_static(analyses, tmp_path / "site", progress=False)
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    check_app(page, (out / "index.html").as_uri(), analyses)
    assert requests and all(u.startswith("file://") or u.startswith("data:") for u in requests)
    page.close()


def test_app_maps_on_a_grid_of_more_than_256_patches(
    browser: Any, tmp_path: Path, analyses: list[Analysis]
) -> None:
    """Sparse maps address patches with two bytes: a 17x17 grid needs the high one."""
    p = make_pipeline(tmp_path / "m", n_images=10, n_latents=16, k=3, grid=(17, 17), d=12)
    cfg = AnalysisConfig(top_n=4, sample_images=2, patch_codes_k=4)
    a = run_analysis(p.sae, p.store, tmp_path / "a", config=cfg, progress=False, name="big")
    j = busiest_latent(a)
    top = a.top(j, "max")
    doc = payload([a], f"a0/latent/{j}")
    sparse_high = [
        e.image
        for e in top
        if len(base64.b64decode(doc["maps"][str(e.image)])) < 17 * 17
        and np.flatnonzero(e.map.ravel())[-1] >= 256
    ]
    assert sparse_high, "the test needs a sparse map with a patch beyond 255"
    out = export_static([a], tmp_path / "site", progress=False)
    page = browser.new_page()
    page.goto((out / "index.html").as_uri() + f"#/latent/0/{j}")
    wait_ready(page, f"#/latent/0/{j}")
    check_cards(page, top, a.grid, float(a.table["max_patch"][j]), strict=False)
    page.close()
