"""ScoreCard report card and comparison: built from synthetic evaluation folders written to the
`visae.evaluation/1` schema (a full one: baselines, raw neurons, pairs, a Matryoshka hierarchy,
null values and a score that does not separate from its frozen baseline; a minimal one: no pairs,
no baselines), checked as HTML text, as plot files and in headless Chromium from a copy of the
folder."""

from __future__ import annotations

import copy
import csv
import importlib.util
import io
import json
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from system_deps import require
from test_viewer import CHROMIUM, CHROMIUM_ARGS

from visae.errors import VisaeError
from visae.eval.compare import compare
from visae.eval.report import SCHEMA, load_score_card, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT_CONCEPT = "<script>alert('x')</script> & co"
N_LATENTS = 64
D = 16


def val(value: float | None, lo: float | None = None, hi: float | None = None, n: int = 6) -> dict:
    return {"value": value, "ci": None if lo is None else [lo, hi], "n": n}


def score(name: str, title: str, group: str, values: dict, separates: dict, **kw: Any) -> dict:
    out = {"name": name, "title": title, "group": group, "level": "image", "over": "concepts"}
    out.update(chance=None, values=values, separates=separates, note=None)
    out.update(kw)
    return out


def full_doc() -> dict:
    sae = {
        "path": "/runs/a/sae",
        "arch": "batchtopk",
        "n_latents": N_LATENTS,
        "k": 8,
        "d": D,
        "tokens": "patch",
        "layer": 10,
        "matryoshka": [0.125, 0.25, 0.5, 1.0],
    }
    store = {
        "path": "/stores/cub",
        "backbone": "dinov2-small",
        "dataset": "cub200",
        "fingerprint": "f00d",
        "n_images": 500,
    }
    scores = [
        score(
            "match@1",
            "MATCHScore@1 (best single latent)",
            "matching",
            {"trained": val(0.3125, 0.29, 0.335), "frozen": val(0.1), "random": val(0.095)},
            {"frozen": True, "random": True},
        ),
        score(
            "match@3",
            "MATCHScore@3 (FBMP, beta 1)",
            "matching",
            {
                "trained": val(0.412, 0.39, 0.431),
                "frozen": val(0.405, 0.38, 0.43),
                "random": val(0.2, 0.18, 0.22),
            },
            {"frozen": False, "random": True},
        ),
        score(
            "ms",
            "Monosemanticity Score",
            "monosemanticity",
            {
                "trained": val(0.62, 0.6, 0.64, 59),
                "frozen": val(0.58, 0.56, 0.6, 62),
                "random": val(0.5, 0.48, 0.52, 63),
                "raw_neurons": val(0.45, 0.4, 0.5, 15),
            },
            {"frozen": True, "random": True},
            over="latents",
            chance=0.31,
        ),
        score(
            "tapa",
            "TAPAScore (swap/add pairs)",
            "perturbation",
            {"trained": val(0.25, 0.1, 0.4, 40), "frozen": val(0.0, -0.05, 0.05, 40)},
            {"frozen": True, "random": None},
            over="pairs",
        ),
        score(
            "tapa_removal",
            "TAPAScore (removal pairs)",
            "perturbation",
            {"trained": val(None, n=0), "frozen": val(None, n=0)},
            {"frozen": None, "random": None},
            over="pairs",
            note="no removal pairs: synCUB pairs are swaps",
        ),
        score(
            "hierarchy",
            "Matryoshka hierarchy (LCA depth, last - first group)",
            "hierarchy",
            {"trained": val(1.25, 0.5, 2.0, 58), "frozen": val(None, n=0), "random": val(0.1)},
            {"frozen": None, "random": True},
            over="latents",
        ),
        score(
            "min_frequency",
            "Lowest firing frequency of a live latent",
            "health",
            {"trained": val(0.0004, n=60), "frozen": val(-0.0, n=62)},
            {"frozen": None},
            over="latents",
        ),
        score(
            "locality",
            "Locality of activation maps",
            "locality",
            {
                "trained": val(0.71, 0.69, 0.73, 56),
                "frozen": val(0.4, 0.38, 0.42, 62),
                "random": val(0.35, 0.33, 0.37, 64),
            },
            {"frozen": True, "random": True},
            level="patch",
            over="latents",
        ),
    ]
    concept = {"trained": None, "frozen": None, "random": None}
    tapa = [
        {
            "concept": "has_red_wing",
            "n_swap_add": 12,
            "swap_add": {"trained": 0.5, "frozen": 0.0, "random": -0.1},
            "n_removal": 0,
            "removal": dict(concept),
        },
        {
            "concept": SCRIPT_CONCEPT,
            "n_swap_add": 8,
            "swap_add": {"trained": 0.25, "frozen": 0.125, "random": None},
            "n_removal": 0,
            "removal": dict(concept),
        },
        {
            "concept": "price $5",
            "n_swap_add": 20,
            "swap_add": {"trained": 0.75, "frozen": 0.05, "random": 0.0},
            "n_removal": 0,
            "removal": dict(concept),
        },
        {
            "concept": "never_edited",
            "n_swap_add": 0,
            "swap_add": dict(concept),
            "n_removal": 0,
            "removal": dict(concept),
        },
    ]
    bounds = [(0, 8), (8, 16), (16, 32), (32, 64)]
    depth = [1.5, 2.0, 2.6, 3.1]
    hierarchy = [
        {
            "group": g,
            "start": a,
            "stop": b,
            "trained": val(depth[g], depth[g] - 0.25, depth[g] + 0.25, b - a),
            "frozen": val(None if g == 0 else 2.0, None if g == 0 else 1.8, 2.2, b - a),
            "random": val(2.1, 1.9, 2.3, b - a),
        }
        for g, (a, b) in enumerate(bounds)
    ]
    k = [1, 2, 3, 5, 10, 20]
    curves = {
        "match_at_k": {
            "image": {
                "k": k,
                "trained": [0.3125, 0.38, 0.412, 0.43, 0.44, 0.44],
                "frozen": [0.1, 0.3, 0.405, 0.41, 0.41, 0.41],
                "random": [0.095, 0.15, 0.2, 0.22, 0.23, 0.23],
            },
            "patch": {
                "k": k,
                "trained": [0.2, 0.25, 0.3, 0.31, 0.32, 0.32],
                "frozen": [0.05, 0.1, 0.12, 0.13, 0.13, 0.13],
                "random": [0.04, 0.08, None, 0.1, 0.1, 0.1],
            },
        }
    }
    return {
        "schema": SCHEMA,
        "visae_version": "0.1.0",
        "inputs": {
            "sae": sae,
            "store": store,
            "images": {"n": 500, "rule": "all images of the store"},
            "concepts": {"source": "cub-attributes", "n_scored": 4, "excluded": ["has_rare"]},
            "pairs": {"source": "synCUB", "n_pairs": 40, "dropped": []},
            "encoder": {"name": "clip-b32", "weights_hash": "abc123", "embedding": "image_embeds"},
            "taxonomy": {"source": "cub-taxonomy", "n_with_path": 500},
        },
        "settings": {
            "variants": ["trained", "frozen", "random"],
            "n_resamples": 1000,
            "level": 0.95,
            "seed": 0,
            "k": k,
            "image_codes": "max over patches",
            "top_images": 16,
        },
        "scores": scores,
        "curves": curves,
        "tapa_per_concept": tapa,
        "hierarchy_groups": hierarchy,
        "timings": {"encode": 12.34, "match": 3.21},
    }


def minimal_doc() -> dict:
    doc = full_doc()
    doc["inputs"]["sae"] = {
        "path": "/runs/b/relu",
        "arch": "relu",
        "n_latents": 16,
        "k": None,
        "d": 8,
        "tokens": "cls",
        "layer": 5,
        "matryoshka": None,
    }
    doc["inputs"]["store"] = dict(doc["inputs"]["store"], backbone="clip-b16", fingerprint="beef")
    doc["inputs"]["concepts"] = {"source": "coco-objects", "n_scored": 80, "excluded": []}
    doc["inputs"]["pairs"] = None
    doc["inputs"]["taxonomy"] = None
    doc["settings"]["variants"] = ["trained"]
    m = "monosemanticity"
    doc["scores"] = [
        score(
            "match@1", "MATCHScore@1 (best single latent)", "matching", {"trained": val(0.2)}, {}
        ),
        score("match@3", "MATCHScore@3 (FBMP, beta 1)", "matching", {"trained": val(0.3)}, {}),
        score("ms", "Monosemanticity Score", m, {"trained": val(0.7, 0.65, 0.75)}, {}, chance=0.5),
        score("ms_corrected", "MS, chance-corrected", m, {"trained": val(0.4, 0.3, 0.5)}, {}),
    ]
    for s in doc["scores"][2:]:
        s["over"] = "latents"
    del doc["curves"], doc["tapa_per_concept"], doc["hierarchy_groups"]
    doc["timings"] = {"all": 1.0}
    return doc


def latent_rows(n: int, dead: set[int], no_ms: set[int], no_locality: set[int], seed: int) -> list:
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(n):
        ms = "" if j in dead | no_ms else repr(float(rng.uniform(0.2, 0.9)))
        loc = "" if j in dead | no_locality else repr(float(rng.uniform(0, 1)))
        concept = ["", "has_red_wing", SCRIPT_CONCEPT][j % 3]
        f1 = "" if not concept else repr(float(rng.uniform(0, 1)))
        freq = 0.0 if j in dead else float(rng.uniform(0.001, 0.2))
        row = [j, repr(freq), ms, ms, int(j in dead), concept, f1, loc, "", "bird", "sparrow"]
        rows.append(row)
    return rows


def write_csv(path: Path, header: list[str], rows: list) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


LATENT_HEADER = [
    "latent",
    "frequency",
    "ms",
    "ms_corrected",
    "dead",
    "concept",
    "concept_f1",
    "locality",
    "lca_depth",
    "coarse",
    "fine",
]


def make_folder(root: Path, doc: dict) -> Path:
    """An evaluation folder: `doc` as scores.json and a per-latent table for each variant it
    ran; the full one (frozen among its variants) also gets raw neurons. Live MS counts:
    trained 59, frozen 62, random 63, raw neurons 15; live localities: 56, 62, 64."""
    root.mkdir(parents=True)
    (root / "scores.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    n = doc["inputs"]["sae"]["n_latents"]
    full = "frozen" in doc["settings"]["variants"]
    spec = {
        "trained": ({0, 1, 2, 3}, {4}, set(range(60, 64)) if full else set(range(n))),
        "frozen": ({0, 1}, set(), set()),
        "random": (set(), {5}, set()),
    }
    for seed, v in enumerate(doc["settings"]["variants"]):
        write_csv(root / f"latents_{v}.csv", LATENT_HEADER, latent_rows(n, *spec[v], seed))
    if full:
        rng = np.random.default_rng(9)
        rows = [[i, "" if i == 3 else repr(float(rng.uniform(0, 0.8))), ""] for i in range(D)]
        write_csv(root / "raw_neurons.csv", ["neuron", "ms", "ms_corrected"], rows)
    return root


@pytest.fixture
def full(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "full", full_doc())


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full folder with its report written, shared by the tests that only read it (a
    report draws five plots: about two seconds here)."""
    folder = make_folder(tmp_path_factory.mktemp("report") / "full", full_doc())
    write_report(folder)
    return folder


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "minimal", minimal_doc())


class Page(HTMLParser):
    """What the tests read from a report: each score row's cell texts and class, the images'
    sources, the captions, and the TAPA table's rows."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: dict[str, list[str]] = {}
        self.row_class: dict[str, str] = {}
        self.imgs: list[str] = []
        self.captions: list[str] = []
        self.tapa_rows: list[list[str]] = []
        self._row: str | None = None
        self._caption = False
        self._tapa = False
        self._tapa_cell = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and "data-score" in a:
            self._row = str(a["data-score"])
            self.rows[self._row] = []
            self.row_class[self._row] = str(a["class"])
        elif tag == "td" and self._row is not None:
            self.rows[self._row].append("")
        elif tag in ("span", "br") and self._row is not None and self.rows[self._row]:
            self.rows[self._row][-1] += " "
        elif tag == "img":
            self.imgs.append(str(a["src"]))
        elif tag == "figcaption":
            self.captions.append("")
            self._caption = True
        elif tag == "table" and a.get("id") == "tapa":
            self._tapa = True
        elif tag == "tr" and self._tapa:
            self.tapa_rows.append([])
        elif tag == "td" and self._tapa:
            self.tapa_rows[-1].append("")
            self._tapa_cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None:
            self.rows[self._row][-1] = self.rows[self._row][-1].strip()
        if tag == "tr":
            self._row = None
        elif tag == "figcaption":
            self._caption = False
        elif tag == "td" and self._tapa:
            self._tapa_cell = False
        elif tag == "table":
            self._tapa = False

    def handle_data(self, data: str) -> None:
        if self._row is not None and self.rows[self._row]:
            self.rows[self._row][-1] += data
        elif self._caption:
            self.captions[-1] += data
        elif self._tapa_cell:
            self.tapa_rows[-1][-1] += data


# ---------------------------------------------------------------- the report as HTML


def test_report_of_a_full_evaluation(full_report: Path) -> None:
    text = (full_report / "report.html").read_text(encoding="utf-8")
    page = Page(text)
    assert list(page.rows) == [s["name"] for s in full_doc()["scores"]]
    # columns: score, chance, trained, frozen, random, raw neurons, verdict
    assert page.rows["match@1"] == [
        "MATCHScore@1 (best single latent) match@1 · image level, over concepts",
        "-",
        "0.312 [0.290, 0.335] n = 6",
        "0.100 n = 6",
        "0.095 n = 6",
        "-",
        "separates from frozen SAE  separates from random codes",
    ]
    assert page.rows["match@3"][2:5] == [
        "0.412 [0.390, 0.431] n = 6",
        "0.405 [0.380, 0.430] n = 6",
        "0.200 [0.180, 0.220] n = 6",
    ]
    assert page.rows["match@3"][6] == (
        "⚠ not distinguishable from frozen SAE  separates from random codes"
    )
    assert page.rows["ms"][1:] == [
        "0.310",
        "0.620 [0.600, 0.640] n = 59",
        "0.580 [0.560, 0.600] n = 62",
        "0.500 [0.480, 0.520] n = 63",
        "0.450 [0.400, 0.500] n = 15",
        "separates from frozen SAE  separates from random codes",
    ]
    assert page.rows["tapa"][4:] == ["-", "-", "separates from frozen SAE"]
    assert page.rows["tapa_removal"][0].endswith("no removal pairs: synCUB pairs are swaps")
    assert page.rows["tapa_removal"][2:] == [
        "undefined n = 0",
        "undefined n = 0",
        "-",
        "-",
        "undefined",
    ]
    assert page.rows["hierarchy"][3] == "undefined n = 0"
    assert page.rows["hierarchy"][6] == "no test: frozen SAE undefined  separates from random codes"
    assert page.rows["min_frequency"][2:4] == ["4.00e-04 n = 60", "0.000 n = 62"]
    assert page.rows["min_frequency"][6] == "no interval against frozen SAE"
    classes = {name: c.split()[1] for name, c in page.row_class.items()}
    assert classes == {
        "match@1": "separates",
        "match@3": "indistinct",
        "ms": "separates",
        "tapa": "separates",
        "tapa_removal": "undefined",
        "hierarchy": "separates",
        "min_frequency": "untested",
        "locality": "separates",
    }
    assert text.count("not distinguishable from") == 1
    assert '<td class="num same">0.405 [0.380, 0.430]' in text
    assert (
        "8 scores: 5 separate the trained SAE from every baseline tested; 1 cannot be told from "
        "a baseline; 1 are undefined; 1 have no interval against a baseline." in text
    )
    # inputs and settings
    for shown in ("/runs/a/sae", "/stores/cub", "f00d", "synCUB", "clip-b32", "has_rare"):
        assert shown in text
    assert "<b>matryoshka</b> 0.125, 0.25, 0.5, 1.0" in text
    assert "<b>n_resamples</b> 1000" in text
    assert '<td class="num">12.3 s</td>' in text and '<td class="num">15.6 s</td>' in text
    # every string is escaped; the page runs no script
    assert "<script" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in text
    # TAPA table: the three concepts with pairs, in file order, values and '-' per variant
    assert [r[0] for r in page.tapa_rows[1:]] == ["has_red_wing", SCRIPT_CONCEPT, "price $5"]
    assert page.tapa_rows[2] == [SCRIPT_CONCEPT, "8", "0.250", "0.125", "undefined"]


def test_report_plots(full_report: Path) -> None:
    page = Page((full_report / "report.html").read_text(encoding="utf-8"))
    files = ["ms.png", "match_at_k.png", "tapa.png", "hierarchy.png", "locality.png"]
    assert page.imgs == [f"plots/{f}" for f in files]
    assert sorted(p.name for p in (full_report / "plots").iterdir()) == sorted(files)
    for f in files:
        assert (full_report / "plots" / f).read_bytes()[:8] == PNG_MAGIC
    ms, match, tapa, hierarchy, locality = page.captions
    assert "(trained 59, frozen SAE 62, random codes 63, raw neurons 15;" in ms
    assert "chance level 0.310" in ms
    assert "at the image and patch level" in match
    assert "(3 of 4 concepts)" in tapa and "highest" not in tapa
    assert "with 95% intervals" in hierarchy
    assert "(trained 56, frozen SAE 62, random codes 64;" in locality


def test_report_of_a_minimal_evaluation(minimal: Path) -> None:
    text = write_report(minimal).read_text(encoding="utf-8")
    page = Page(text)
    assert list(page.rows) == ["match@1", "match@3", "ms", "ms_corrected"]
    # score, chance, trained, verdict: no baseline column at all
    assert page.rows["ms"] == [
        "Monosemanticity Score ms · image level, over latents",
        "0.500",
        "0.700 [0.650, 0.750] n = 6",
        "no baseline",
    ]
    assert "<th>frozen SAE</th>" not in text and "not distinguishable" not in text
    assert "<tr><th>pairs</th><td>none</td></tr>" in text
    assert "<b>excluded</b> none" in text
    assert page.imgs == ["plots/ms.png"]
    assert [p.name for p in (minimal / "plots").iterdir()] == ["ms.png"]
    assert "(trained 11; dead and undefined ones left out)" in page.captions[0]
    assert 'id="tapa"' not in text


def test_report_rewrite_drops_stale_plots(full_report: Path, tmp_path: Path) -> None:
    full = shutil.copytree(full_report, tmp_path / "full")
    assert len(list((full / "plots").iterdir())) == 5
    doc = full_doc()
    doc["tapa_per_concept"] = []
    del doc["hierarchy_groups"]
    (full / "scores.json").write_text(json.dumps(doc), encoding="utf-8")
    out = write_report(full)
    assert out == full / "report.html"
    page = Page(out.read_text(encoding="utf-8"))
    assert page.imgs == ["plots/ms.png", "plots/match_at_k.png", "plots/locality.png"]
    assert sorted(p.name for p in (full / "plots").iterdir()) == [
        "locality.png",
        "match_at_k.png",
        "ms.png",
    ]


def test_report_tapa_plot_of_many_concepts(tmp_path: Path) -> None:
    doc = minimal_doc()
    doc["inputs"]["pairs"] = full_doc()["inputs"]["pairs"]
    doc["tapa_per_concept"] = [
        {
            "concept": f"c{i}",
            "n_swap_add": 3,
            "swap_add": {"trained": i / 50, "frozen": 0.0, "random": 0.0},
            "n_removal": 0,
            "removal": {"trained": None, "frozen": None, "random": None},
        }
        for i in range(45)
    ]
    page = Page(write_report(make_folder(tmp_path / "e", doc)).read_text(encoding="utf-8"))
    assert (
        "The swap/add pairs panel shows the 20 highest and 20 lowest trained scores of 45 "
        "concepts; the table below lists all." in page.captions[1]
    )
    assert [r[0] for r in page.tapa_rows[1:]] == [f"c{i}" for i in range(45)]


def _edit(doc: dict, path: str, value: Any) -> dict:
    """A copy of `doc` with the field at the dotted `path` set to `value` (deleted for ...)."""
    out = copy.deepcopy(doc)
    *head, last = path.split(".")
    node: Any = out
    for key in head:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return out


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("schema", "visae.evaluation/2", r"has schema 'visae.evaluation/2', expected"),
        ("scores.0.separates", ..., r"scores\[0\]\.separates is missing"),
        ("scores.1.values.trained.ci", [0.5, 0.1], r"scores\[1\]\.values\.trained\.ci must be"),
        ("scores.1.values.shuffled", val(0.1), r"unknown variant 'shuffled'"),
        ("scores.2.values.trained.n", True, r"scores\[2\]\.values\.trained\.n must be an integer"),
        ("scores.3.name", "match@1", r"scores\[3\]\.name repeats 'match@1'"),
        ("scores.0.level", "token", r"scores\[0\]\.level must be one of image, patch"),
        ("inputs.sae.layer", "10", r'inputs\.sae\.layer must be an integer, got "10"'),
        ("inputs.store", None, r"inputs\.store must be an object"),
        ("settings.variants", ["frozen"], r"settings\.variants must include 'trained'"),
        ("settings.level", 95, r"settings\.level must lie in \(0, 1\), got 95\.0"),
        ("curves.match_at_k.image.frozen", [0.1], r"image\.frozen has 1 values for 6 k"),
        ("timings", ..., r"timings is missing"),
    ],
)
def test_report_refuses_a_bad_scores_json(
    tmp_path: Path, path: str, value: Any, message: str
) -> None:
    folder = make_folder(tmp_path / "e", _edit(full_doc(), path, value))
    with pytest.raises(VisaeError, match=message):
        write_report(folder)
    assert not (folder / "report.html").exists() and not (folder / "plots").exists()


def test_report_refuses_missing_or_broken_files(tmp_path: Path, full: Path) -> None:
    with pytest.raises(VisaeError, match=r"is not an evaluation folder: it has no scores\.json"):
        write_report(tmp_path)
    text = (full / "scores.json").read_text(encoding="utf-8")
    (full / "scores.json").write_text(text.replace("0.412", "NaN"), encoding="utf-8")
    with pytest.raises(VisaeError, match=r"NaN is not allowed \(an undefined value is written"):
        write_report(full)
    (full / "scores.json").write_text(text, encoding="utf-8")
    trained = (full / "latents_trained.csv").read_text(encoding="utf-8").splitlines()
    (full / "latents_trained.csv").write_text("\n".join(trained[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(VisaeError, match=r"has 63 rows, expected 64 \(inputs\.sae\.n_latents\)"):
        write_report(full)
    cells = trained[4].split(",")
    bad = [*trained[:4], ",".join([*cells[:2], "abc", *cells[3:]]), *trained[5:]]
    (full / "latents_trained.csv").write_text("\n".join(bad) + "\n", encoding="utf-8")
    with pytest.raises(VisaeError, match=r"latents_trained\.csv:5: ms 'abc' is not a number"):
        write_report(full)
    (full / "latents_trained.csv").write_text("\n".join(trained) + "\n", encoding="utf-8")
    (full / "latents_frozen.csv").unlink()
    with pytest.raises(VisaeError, match=r"lacks latents_frozen\.csv, though settings\.variants"):
        write_report(full)
    assert not (full / "report.html").exists()


# ---------------------------------------------------------------- the report in Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require(CHROMIUM.exists(), "Debian chromium")
    require(importlib.util.find_spec("playwright") is not None, "playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_report_in_chromium_from_a_copy(browser: Any, full_report: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "evaluation"
    shutil.copytree(full_report, moved)
    page = browser.new_page()
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto((moved / "report.html").as_uri(), wait_until="load")
    imgs = page.eval_on_selector_all(
        "img", "is => is.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    assert len(imgs) == 5
    assert all(done and width > 0 for _, done, width in imgs), imgs
    assert page.evaluate("document.scripts.length") == 0
    mark = page.locator('tr[data-score="match@3"] .indistinct-mark')
    assert mark.is_visible() and mark.inner_text() == "⚠ not distinguishable from frozen SAE"
    assert page.locator(".indistinct-mark").count() == 1
    assert SCRIPT_CONCEPT in page.locator("#tapa").text_content()
    assert requests and all(u.startswith(moved.as_uri() + "/") for u in requests)
    assert not errors, errors
    page.close()


# ---------------------------------------------------------------- compare


def test_compare_two_evaluations(full: Path, minimal: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    c = compare([full, minimal], out)
    big, small = "batchtopk-matryoshka-n64-k8", "relu-n16"
    assert c.names == [big, small]
    assert c.order == [s["name"] for s in full_doc()["scores"]] + ["ms_corrected"]
    assert c.differs == [
        "store.backbone",
        "store.fingerprint",
        "concepts.source",
        "concepts.n_scored",
        "concepts.excluded",
        "pairs",
        "taxonomy",
        "settings.variants",
    ]
    lines = c.table().splitlines()
    assert lines[:4] == [
        "2 evaluations:",
        f"  {big}: {full}",
        f"  {small}: {minimal}",
        "inputs that differ: store.backbone, store.fingerprint, concepts.source, "
        "concepts.n_scored, concepts.excluded, pairs, taxonomy, settings.variants",
    ]
    rows = {ln.split()[0]: [x.split("  ") for x in ln.split(" | ")[1:]] for ln in lines[6:-2]}

    def cells(name: str) -> list[list[str]]:
        return [[x.strip() for x in group if x.strip()] for group in rows[name]]

    assert [h.split() for h in lines[5].split(" | ")] == [
        ["score"],
        ["trained", "[95%]", "frozen", "SAE", "random", "codes", "raw", "neurons"],
        ["trained", "[95%]"],
    ]
    assert [x.strip() for x in lines[4].split(" | ")] == ["", big, small]
    assert cells("match@3") == [["0.412 [0.390, 0.431]*", "0.405", "0.200", "-"], ["0.300"]]
    assert cells("ms") == [
        ["0.620 [0.600, 0.640]", "0.580", "0.500", "0.450"],
        ["0.700 [0.650, 0.750]"],
    ]
    assert cells("tapa") == [["0.250 [0.100, 0.400]", "0.000", "-", "-"], ["-"]]
    assert cells("tapa_removal") == [["undefined", "undefined", "-", "-"], ["-"]]
    assert cells("ms_corrected") == [["-", "-", "-", "-"], ["0.400 [0.300, 0.500]"]]
    assert lines[-2].startswith("* not distinguishable from a baseline")

    # the CSV reads back to the same numbers; '-' where absent, empty where undefined
    text = (out / "compare.csv").read_text(encoding="utf-8")
    assert text == c.csv_text()
    table = {r["score"]: r for r in csv.DictReader(io.StringIO(text))}
    assert list(table) == c.order
    for ev, name in ((full_doc(), big), (minimal_doc(), small)):
        for s in ev["scores"]:
            for v, x in s["values"].items():
                row = table[s["name"]]
                assert row[f"{name} {v}"] == ("" if x["value"] is None else repr(x["value"]))
                if x["ci"] is not None:
                    assert float(row[f"{name} {v} lo"]) == x["ci"][0]
                    assert float(row[f"{name} {v} hi"]) == x["ci"][1]
    assert table["match@3"][f"{big} separates frozen"] == "false"
    assert table["match@3"][f"{big} separates random"] == "true"
    assert table["tapa"][f"{big} separates random"] == ""
    assert table["tapa"][f"{big} random"] == "-"
    assert table["tapa"][f"{small} trained"] == "-"
    assert table["min_frequency"][f"{big} frozen"] == "-0.0"
    assert table["ms_corrected"][f"{big} trained lo"] == "-"
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_names_and_same_inputs(full: Path, tmp_path: Path) -> None:
    other = make_folder(tmp_path / "other", _edit(full_doc(), "inputs.sae.path", "/runs/b/sae"))
    c = compare([full, other])
    assert c.names == ["batchtopk-matryoshka-n64-k8 (a/sae)", "batchtopk-matryoshka-n64-k8 (b/sae)"]
    assert c.differs == []
    assert c.table().splitlines()[3] == (
        "inputs other than the SAE, and settings: the same in every evaluation"
    )
    assert compare([full, full]).names == [
        "batchtopk-matryoshka-n64-k8 #1",
        "batchtopk-matryoshka-n64-k8 #2",
    ]
    assert not (tmp_path / "compare.csv").exists()
    with pytest.raises(VisaeError, match="compare needs at least one evaluation folder"):
        compare([])
    empty = make_folder(tmp_path / "empty", _edit(minimal_doc(), "scores", []))
    with pytest.raises(VisaeError, match=r"the evaluations hold no score: .*empty$"):
        compare([empty], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
    assert load_score_card(other).inputs["sae"]["path"] == "/runs/b/sae"
