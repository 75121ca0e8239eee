"""`visae study plan SPEC` (the features and trials a spec gives, before anyone runs it),
`visae study serve SPEC` (the study as a web application with its database) and
`visae study score SOURCE` (the scores once responses are in, from the database or an
export)."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from visae.atomic import write_text


def add_study_commands(sub: Any) -> None:
    study = sub.add_parser(
        "study", help="human interpretability studies: plan, serve and score them"
    )
    ssub = study.add_subparsers(dest="study_command", required=True, metavar="ACTION")
    p = ssub.add_parser(
        "plan",
        help="sample a spec's features and build their trials (references, query, choices)",
    )
    p.add_argument("spec", help="study spec, .json or .yaml (see docs/studies.md)")
    p.add_argument("--out", help="write the plan as JSON here")
    p.set_defaults(handler=run_plan)
    p = ssub.add_parser(
        "serve",
        help="run the study as a web application: participants' pages, admin page, database",
    )
    p.add_argument("spec", help="study spec, .json or .yaml")
    p.add_argument(
        "--db",
        default="study.sqlite",
        help="SQLite file (default study.sqlite) or postgresql://user@host/dbname",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--admin-token",
        help="token of the admin page and API (default: $VISAE_ADMIN_TOKEN, else a random one, "
        "printed)",
    )
    p.set_defaults(handler=run_serve)
    p = ssub.add_parser(
        "score",
        help="chance-anchored scores of collected responses, exclusions applied first",
    )
    p.add_argument(
        "source",
        help="the study's database (SQLite file or postgresql:// URL), its JSON export, or a "
        "responses CSV (with --spec)",
    )
    p.add_argument("--spec", help="the study's spec (default: the one the database holds)")
    p.add_argument("--out", help="write every score as JSON here")
    p.add_argument("--report", help="write report.html with its plots into this folder")
    p.add_argument(
        "--no-names",
        action="store_true",
        help="skip scoring typed names with the sentence encoder",
    )
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


def run_serve(args: argparse.Namespace) -> int:
    import os
    import secrets

    from visae.study.db import StudyDB
    from visae.study.server import serve
    from visae.study.session import Study
    from visae.study.spec import load_spec
    from visae.study.trials import build_plan

    token = args.admin_token or os.environ.get("VISAE_ADMIN_TOKEN") or secrets.token_urlsafe(24)
    study = Study(build_plan(load_spec(args.spec)), StudyDB(args.db))
    serve(study, token, args.host, args.port)
    return 0


def load_source(source: str, spec_path: str | None) -> tuple[Any, list[dict[str, str]]]:
    """(spec, responses) from a database, a JSON export or a CSV; a given spec must be the
    study's own."""
    from visae.errors import VisaeError
    from visae.study.db import StudyDB
    from visae.study.responses import read_responses
    from visae.study.spec import load_spec, parse_spec

    given = load_spec(spec_path) if spec_path else None
    path = Path(source)
    if path.suffix == ".csv":
        if given is None:
            raise VisaeError(f"responses CSV {source}: give the study's spec with --spec")
        return given, read_responses(path)
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            stored, rows = data["spec"], data["responses"]
        except (OSError, ValueError, KeyError, TypeError):
            raise VisaeError(f"{source} is not a study export (visae's export.json)") from None
    else:
        if "://" not in source and not path.is_file():
            raise VisaeError(f"no study database at {source}")
        db = StudyDB(source)
        stored = json.loads(db.existing()["spec"])
        rows = db.rows()
    spec = parse_spec(stored)
    if given is not None and given.name != spec.name:
        raise VisaeError(f"{source} holds study {spec.name!r}, not the spec's {given.name!r}")
    return given or spec, rows


def run_score(args: argparse.Namespace) -> int:
    from visae.study.responses import load_analyses, score_responses

    spec, rows = load_source(args.source, args.spec)
    analyses = load_analyses(spec)
    encoder = None
    if not args.no_names:
        from visae.text import INSTALL_HINT, installed, packaged_encoder

        if installed():
            encoder = packaged_encoder()
        else:
            print(f"names not scored: the sentence encoder is not installed ({INSTALL_HINT})")
    result = score_responses(spec, rows, analyses=analyses, encoder=encoder)
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
    for n in result.get("names", []):
        d = n["difference"]
        print(
            f"{n['sae']} names ({n['n_names']}): MiniLM cosine to their feature's label "
            f"{n['own_label']['mean']:.3f}, to another feature's {n['other_label']['mean']:.3f}, "
            f"difference {d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}] ({n['verdict']})"
        )
    if args.out:
        write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
        print(f"scores written to {args.out}")
    if args.report:
        from visae.study.report import write_report

        page = write_report(result, analyses, args.report, spec.name)
        print(f"report written to {page}")
    return 0
