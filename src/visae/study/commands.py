"""`visae study plan SPEC` (the features and trials a spec gives, before anyone runs it) and
`visae study score SPEC RESPONSES` (their scores once responses are in)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from visae.atomic import write_text


def add_study_commands(sub: Any) -> None:
    study = sub.add_parser("study", help="human interpretability studies: plan one from a spec")
    ssub = study.add_subparsers(dest="study_command", required=True, metavar="ACTION")
    p = ssub.add_parser(
        "plan",
        help="sample a spec's features and build their trials (references, query, choices)",
    )
    p.add_argument("spec", help="study spec, .json or .yaml (see docs/studies.md)")
    p.add_argument("--out", help="write the plan as JSON here")
    p.set_defaults(handler=run_plan)
    p = ssub.add_parser(
        "score",
        help="chance-anchored scores of collected responses (a CSV), exclusions applied first",
    )
    p.add_argument("spec", help="the study's spec")
    p.add_argument("responses", help="responses CSV (columns: see docs/studies.md)")
    p.add_argument("--out", help="write every score as JSON here")
    p.set_defaults(handler=run_score)


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


def run_score(args: argparse.Namespace) -> int:
    from visae.study.responses import read_responses, score_responses
    from visae.study.spec import load_spec

    spec = load_spec(args.spec)
    result = score_responses(spec, read_responses(args.responses))
    ex = result["exclusions"]
    print(
        f"excluded: {len(ex['participants'])} participants (failed checks), "
        f"{ex['fast_trials']} trials faster than {spec.exclusions.min_seconds:g} s"
    )
    for s in result["scores"]:
        proxies = ", ".join(
            f"{k} rho "
            + ("undefined (constant)" if v["spearman"] is None else f"{v['spearman']:.2f}")
            + f" (n {v['n']})"
            for k, v in s["proxy_correlation"].items()
        )
        print(
            f"{s['sae']} {s['protocol']}: S {s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}] "
            f"({s['n_participants']} participants, {s['n_features']} features)"
            + (f"; {proxies}" if proxies else "")
        )
    if args.out:
        write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
        print(f"scores written to {args.out}")
    return 0
