"""Time and losses of `visae vlm build` (the packaged VLM's projector training), target: at most
~20 minutes on the 2-core CPU machine.

    .venv/bin/python benchmarks/bench_vlm_build.py            # train into a temporary folder
    .venv/bin/python benchmarks/bench_vlm_build.py --record   # report the committed projector's
                                                               # own record (projector.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_note, report, write_section

from visae.vlm.build import BuildConfig, build
from visae.vlm.packaged import DEFAULT_PROJECTOR, PROJECTOR_INFO, PROJECTOR_WEIGHTS

SECTION = "bench_vlm_build"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="read the committed projector")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    note = load_note()
    if args.record:
        folder = DEFAULT_PROJECTOR
        source = "the committed projector's projector.json, written by `visae vlm build`"
    else:
        folder = build(Path(tempfile.mkdtemp()) / "projector", BuildConfig())
        source = "a fresh build"
    info = json.loads((folder / PROJECTOR_INFO).read_text(encoding="utf-8"))
    size = (folder / PROJECTOR_WEIGHTS).stat().st_size
    block = [
        f"build time {info['seconds']:.0f} s ({info['seconds'] / 60:.1f} min; tower features "
        f"{info['feature_seconds']:.0f} s), projector file {size / 1e6:.2f} MB",
        f"settings {json.dumps(info['config'])}",
    ]
    for name, stage in info["stages"].items():
        steps = stage.get("steps", stage.get("epochs"))
        unit = "steps" if "steps" in stage else "epochs"
        block.append(
            f"stage {name:<7} {steps} {unit}: loss {stage['first_loss']:.4f} -> "
            f"{stage['last_loss']:.4f}"
        )
    print("\n".join(block))
    if args.no_write:
        return
    write_section(
        SECTION,
        report(
            "Packaged VLM: projector training time (bench_vlm_build.py)",
            "python benchmarks/bench_vlm_build.py" + (" --record" if args.record else ""),
            block,
            detail=f"({source}; {note})",
            before=[
                "Target: at most ~20 minutes here. Stages: align (patch tokens regressed onto "
                "their object's word embedding, MSE), caption (LLaVA stage 1), answer (one-word "
                "answers); the last two are the language model's cross-entropy on the answer "
                "tokens, mean of the last 10 steps."
            ],
        ),
    )


if __name__ == "__main__":
    main()
