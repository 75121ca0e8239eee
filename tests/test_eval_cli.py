"""`visae evaluate` and `visae compare` on the real models: DINOv2-S activations of a few
concept scenes, an SAE trained on them, EfficientNet-Lite0 as the image encoder E, the scores
added to the analysis, and the report card opened in Chromium."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_cli import run
from test_eval_report import browser  # noqa: F401  (the shared Chromium fixture)

from visae.analysis import Analysis
from visae.eval import Evaluation

pytestmark = pytest.mark.slow  # real DINOv2-S extraction, training, EfficientNet embeddings


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """scenes -> DINOv2-S store -> SAE -> analysis, through the CLI (module-wide: one chain)."""
    from visae.cli import main

    root = tmp_path_factory.mktemp("evalcli")
    steps = [
        [
            "scenes",
            "--out",
            str(root / "scenes"),
            "--n-scenes",
            "48",
            "--size",
            "112",
            "--objects",
            "shapes",
            "--pairs-per-kind",
            "4",
            "--workers",
            "1",
            "--quiet",
        ],
        [
            "extract",
            "--dataset",
            f"scenes:{root / 'scenes'}",
            "--layers",
            "10",
            "--out",
            str(root / "store"),
            "--quiet",
        ],
        [
            "train",
            str(root / "store"),
            "--out",
            str(root / "runs"),
            "--k",
            "8",
            "--n-latents",
            "256",
            "--lr",
            "3e-3",
            "--total-tokens",
            "30000",
            "--batch-size",
            "1024",
            "--quiet",
        ],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    sae = root / "runs" / "topk-n256-k8-lr0.003" / "sae"
    assert (
        main(["analyze", str(sae), str(root / "store"), "--out", str(root / "an"), "--quiet"]) == 0
    )
    return {"root": root, "sae": sae, "store": root / "store", "analysis": root / "an"}


@pytest.fixture(scope="module")
def evaluated(chain: dict[str, Path]) -> tuple[Path, str]:
    """One `visae evaluate` of the chain's SAE with every default (its own store, E, baselines),
    adding the scores to the analysis: (evaluation folder, what it printed)."""
    import contextlib
    import io

    from visae.cli import main

    out = chain["root"] / "ev"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            [
                "evaluate",
                str(chain["sae"]),
                "--out",
                str(out),
                "--analysis",
                str(chain["analysis"]),
                "--min-positives",
                "2",
                "--n-resamples",
                "200",
                "--quiet",
            ]
        )
    assert code == 0
    return out, printed.getvalue()


def test_evaluate_writes_scores_beside_baselines_and_fills_the_analysis(
    chain: dict[str, Path], evaluated: tuple[Path, str]
) -> None:
    out, text = evaluated
    assert "ms " in text and "match@3" in text and "raw neurons" in text and "report.html" in text
    ev = Evaluation.load(out)
    s = ev.scores
    assert s["inputs"]["encoder"]["name"] == "efficientnet-lite0"
    assert s["inputs"]["store"]["path"] == str(chain["store"].resolve())
    assert s["inputs"]["pairs"]["n_pairs"] > 0 and s["inputs"]["taxonomy"]["n_with_path"] > 0
    ms = next(r for r in s["scores"] if r["name"] == "ms")
    assert set(ms["values"]) == {"trained", "frozen", "random", "raw_neurons"}
    assert 0 < ms["chance"] < 1 and ms["values"]["trained"]["n"] > 10
    assert all(r["separates"].keys() == {"frozen", "random"} for r in s["scores"])
    a = Analysis.load(chain["analysis"])
    assert {"ms", "ms_corrected", "concept_f1", "locality"} <= set(a.metrics)
    concepts = [c for c in a.texts["concept"] if c]
    assert concepts and all(
        c.split(":")[0] in {"object", "count", "size", "position", "background", "hue"}
        for c in concepts
    )
    assert a.sources["ms"] == str(out.resolve())


def test_compare_two_evaluations_of_one_sae(
    chain: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = chain["root"] / "ev-any", chain["root"] / "ev-q"
    for out, rule in ((first, "any"), (second, "quantile:0.8")):
        code, _, _ = run(
            capsys,
            "evaluate",
            str(chain["sae"]),
            str(chain["store"]),
            "--out",
            str(out),
            "--image-rule",
            rule,
            "--encoder",
            "none",
            "--baselines",
            "frozen",
            "--min-positives",
            "2",
            "--n-resamples",
            "100",
            "--pairs",
            "none",
            "--quiet",
            "--cache",
            str(chain["root"] / "shared-cache"),
        )
        assert code == 0
    # one code pass of the trained SAE (and of its twin) served both evaluations
    assert len(list((chain["root"] / "shared-cache").glob("codes-trained-*.npz"))) == 1
    code, table, _ = run(
        capsys, "compare", str(first), str(second), "--out", str(chain["root"] / "cmp")
    )
    assert code == 0 and "match@3" in table and "image_rule" in table
    assert (chain["root"] / "cmp" / "compare.png").stat().st_size > 1000
    code, _, err = run(
        capsys,
        "compare",
        str(first),
        str(second),
        "--out",
        str(chain["root"] / "cmp2"),
        "--plot-scores",
        "match@3,nope",
    )
    assert code == 2 and "'nope'" in err and err.count("\n") == 1
    rows = (chain["root"] / "cmp" / "compare.csv").read_text().splitlines()
    assert rows[0].startswith("score") and any(r.startswith("match@3,") for r in rows)


def test_bad_evaluate_inputs_are_one_line(
    chain: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        capsys,
        "evaluate",
        str(chain["sae"]),
        "--out",
        str(chain["root"] / "bad"),
        "--concepts",
        "wordnet",
        "--quiet",
    )
    assert code == 2 and err.count("\n") == 1 and "wordnet" in err
    pairs = chain["root"] / "pairs.csv"
    pairs.write_text("image_a,image_b,old,new\nimages/000001.png,nowhere.png,,count:1\n")
    code, _, err = run(
        capsys,
        "evaluate",
        str(chain["sae"]),
        "--out",
        str(chain["root"] / "bad"),
        "--pairs",
        f"csv:{pairs}",
        "--quiet",
    )
    assert code == 2 and err.count("\n") == 1 and "nowhere.png" in err and "pairs.csv:2" in err


def test_real_report_opens_in_chromium(
    evaluated: tuple[Path, str],
    browser: Any,  # noqa: F811
) -> None:
    out, _ = evaluated
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((out / "report.html").as_uri(), wait_until="load")
    imgs = page.eval_on_selector_all("img", "is => is.map(i => [i.complete, i.naturalWidth])")
    assert len(imgs) >= 4 and all(done and width > 0 for done, width in imgs), imgs
    names = page.eval_on_selector_all("tr[data-score]", "rs => rs.map(r => r.dataset.score)")
    scores = json.loads((out / "scores.json").read_text())["scores"]
    assert names == [r["name"] for r in scores] or set(names) == {r["name"] for r in scores}
    assert not errors, errors
    page.close()
