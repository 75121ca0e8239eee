"""`visae study plan SPEC`: the features and trials a study spec gives, before anyone runs it."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from visae.atomic import write_text


def add_study_arguments(sub: Any) -> None:
    study = sub.add_parser("study", help="human interpretability studies: plan one from a spec")
    ssub = study.add_subparsers(dest="study_command", required=True, metavar="ACTION")
    p = ssub.add_parser(
        "plan",
        help="sample a spec's features and build their trials (references, query, choices)",
    )
    p.add_argument("spec", help="study spec, .json or .yaml (see docs/studies.md)")
    p.add_argument("--out", help="write the plan as JSON here")
    p.set_defaults(handler=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from visae.study.spec import load_spec
    from visae.study.trials import build_trials

    spec = load_spec(args.spec)
    trials = build_trials(spec)
    by_sae = Counter(t.feature.sae for t in trials)
    for sae, n in by_sae.items():
        strata = Counter(t.feature.stratum for t in trials if t.feature.sae == sae)
        shares = ", ".join(f"stratum {k}: {strata[k]}" for k in sorted(strata))
        print(f"{sae}: {n} features ({shares})")
    if args.out:
        plan = {
            "spec": spec.to_dict(),
            "features": [asdict(t) for t in trials],
        }
        write_text(Path(args.out), json.dumps(plan, indent=2) + "\n")
        print(f"plan written to {args.out}")
    return 0
