"""`visae intervene` and `visae intervene-study` end to end on EfficientNet-Lite0 and its own
classifier: an SAE on stage 4 of concept scenes, its analysis (latent maxima) and evaluation
(matched latents, frequencies)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import run

pytestmark = pytest.mark.slow  # real EfficientNet-Lite0 extraction, training and forwards


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from visae.cli import main

    root = tmp_path_factory.mktemp("intervene")
    steps = [
        [
            "scenes",
            "--out",
            str(root / "scenes"),
            "--n-scenes",
            "40",
            "--size",
            "96",
            "--objects",
            "shapes",
            "--pairs-per-kind",
            "0",
            "--workers",
            "1",
            "--quiet",
        ],
        [
            "extract",
            "--model",
            "efficientnet-lite0",
            "--dataset",
            f"scenes:{root / 'scenes'}",
            "--layers",
            "4",
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
            "448",
            "--lr",
            "3e-3",
            "--total-tokens",
            "20000",
            "--batch-size",
            "1024",
            "--quiet",
        ],
    ]
    for argv in steps:
        assert main(argv) == 0, argv
    sae = root / "runs" / "topk-n448-k8-lr0.003" / "sae"
    assert (
        main(["analyze", str(sae), str(root / "store"), "--out", str(root / "an"), "--quiet"]) == 0
    )
    assert (
        main(
            [
                "evaluate",
                str(sae),
                "--out",
                str(root / "ev"),
                "--encoder",
                "none",
                "--baselines",
                "",
                "--min-positives",
                "2",
                "--n-resamples",
                "50",
                "--quiet",
            ]
        )
        == 0
    )
    return {
        "root": root,
        "sae": sae,
        "image": root / "scenes" / "images" / "000003.png",
        "analysis": root / "an",
        "eval": root / "ev",
    }


def test_intervene_prints_before_after_and_writes_the_png(
    chain: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = chain["root"] / "x.png"
    code, text, _ = run(
        capsys,
        "intervene",
        str(chain["image"]),
        "--sae",
        str(chain["sae"]),
        "--edit",
        "5=x1",
        "--head",
        "classifier",
        "--out",
        str(out),
    )
    assert code == 0
    lines = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines() if line}
    assert lines["before"] == lines["after"]  # scaling by 1 changes nothing
    assert "written" in text and Image.open(out).size[0] > 500
    code, text, _ = run(
        capsys,
        "intervene",
        str(chain["image"]),
        "--sae",
        str(chain["sae"]),
        "--edit",
        "5=8max",
        "--edit",
        "6=8max",
        "--analysis",
        str(chain["analysis"]),
        "--head",
        "classifier",
        "--out",
        str(out),
    )
    assert code == 0 and "5 set 8 x max" in text
    lines = {line.split()[0]: line.split(None, 1)[1] for line in text.splitlines() if line}
    assert lines["before"] != lines["after"]


def test_intervene_region_mask_and_errors(
    chain: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    size = Image.open(chain["image"]).size
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[: size[1] // 2] = 255
    good, bad = chain["root"] / "mask.png", chain["root"] / "small.png"
    Image.fromarray(mask).save(good)
    Image.fromarray(mask[:10, :10]).save(bad)
    base = [
        "intervene",
        str(chain["image"]),
        "--sae",
        str(chain["sae"]),
        "--head",
        "classifier",
        "--out",
        str(chain["root"] / "y.png"),
    ]
    assert run(capsys, *base, "--edit", "5=3", "--region", str(good))[0] == 0
    for extra, msg in (
        (["--edit", "5=3", "--region", str(bad)], "10x10, the image"),
        (["--edit", "99999=0"], "out of range"),
        (["--edit", "5=2max"], "give an analysis"),
        (["--edit", "5=1", "--region", "cls"], "no CLS"),
    ):
        code, _, err = run(capsys, *base, *extra)
        assert code == 2 and msg in err and err.count("\n") == 1, (extra, err)
    code, _, err = run(
        capsys,
        "intervene",
        str(chain["image"]),
        "--sae",
        str(chain["sae"]),
        "--head",
        "saliency",
        "--edit",
        "5=0",
    )
    last = err.strip().splitlines()[-1]  # after the hub library's own weight-loading bar
    assert code == 2 and last.startswith("visae: error:") and "efficientnet" in last


def test_intervene_study_writes_rates_beside_controls(
    chain: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = chain["root"] / "study"
    code, text, _ = run(
        capsys,
        "intervene-study",
        str(chain["sae"]),
        "--head",
        "classifier",
        "--analysis",
        str(chain["analysis"]),
        "--eval",
        str(chain["eval"]),
        "--images",
        "all",
        "--max-latents",
        "2",
        "--images-per-group",
        "3",
        "--values",
        "0,2",
        "--out",
        str(out),
        "--quiet",
    )
    assert code == 0 and "suppress (v = 0)" in text and "amplify (v = 2)" in text
    doc = json.loads((out / "study.json").read_text())
    matched = [r for r in doc["latents"] if r["control_of"] is None]
    controls = [r for r in doc["latents"] if r["control_of"] is not None]
    assert len(matched) == 2 and len(controls) == 2
    for r in doc["latents"]:
        assert r["n_target"] == 3 and set(r["rates"]) == {"0.0", "2.0"}
        for rate in r["rates"].values():
            assert all(v is None or 0 <= v <= 1 for v in rate.values())
    assert {c["control_of"] for c in controls} == {m["latent"] for m in matched}
    assert (out / "study.html").is_file() and (out / "dose_response.png").is_file()


def test_view_edit_panel_flags_are_checked(
    chain: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    an = str(chain["analysis"])
    for extra, msg in (
        (["--export", str(chain["root"] / "web"), "--model", "efficientnet-lite0"], "read-only"),
        (["--model", "efficientnet-lite0"], "both --model and --head"),
    ):
        code, _, err = run(capsys, "view", an, *extra)
        assert code == 2 and msg in err and err.count("\n") == 1
