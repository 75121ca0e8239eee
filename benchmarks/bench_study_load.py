"""The study server under 200 participants at once (issue 13's target: p99 latency < 200 ms
on SQLite here). The server runs as its own process (`python -m visae study serve`), the
participants as 200 threads of this one, each a keep-alive HTTP connection taking the whole
study as a browser would: the invitation link, consent, every trial's images, its answer, the
next state, the completion code. Two paces: people's (each page takes `--think` seconds on
average, already faster than people answer) and none at all (the server's capacity).
Afterwards the database must hold every acknowledged answer exactly once.

    python benchmarks/bench_study_load.py --analysis demo-out/analysis
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import load_note, report, write_section

from visae.study.db import StudyDB
from visae.study.session import Study
from visae.study.simulate import Oracle, take_study
from visae.study.spec import parse_spec
from visae.study.trials import build_plan

SECTION = "study-load"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(spec_path: Path, db: str, participants: int, think: float) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "visae", "study", "serve", str(spec_path), "--db", db]
    server = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        plan = build_plan(parse_spec(json.loads(spec_path.read_text())))
        oracle = Oracle(Study(plan, StudyDB(db)))
        url = f"http://127.0.0.1:{port}"

        def one(i: int):
            return take_study(url, oracle, (0.0, 1.0, 0.5)[i % 3], seed=i, think=think)

        start = time.perf_counter()
        with ThreadPoolExecutor(participants) as pool:
            outcomes = list(pool.map(one, range(participants)))
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait()
    rows = StudyDB(db).rows()
    acked = sum(len(o.acknowledged) for o in outcomes)
    per = Counter((r["participant"], r["position"]) for r in rows)
    by_kind: dict[str, list[float]] = {}
    for o in outcomes:
        for kind, seconds in o.latencies:
            by_kind.setdefault(kind, []).append(seconds)
    every = np.concatenate([np.asarray(v) for v in by_kind.values()])
    return {
        "participants": participants,
        "completed": sum(bool(o.completion_code) for o in outcomes),
        "think": think,
        "wall": wall,
        "requests": len(every),
        "answers": acked,
        "stored": len(rows),
        "duplicates": sum(n - 1 for n in per.values()),
        "all": np.percentile(every, [50, 99]),
        "kinds": {k: (len(v), *np.percentile(v, [50, 99])) for k, v in sorted(by_kind.items())},
    }


def lines(r: dict) -> list[str]:
    pace = f"{r['think']:.1f} s per page" if r["think"] else "no pause"
    out = [
        f"{r['participants']} participants, {pace}: {r['completed']} completed in "
        f"{r['wall']:.1f} s; {r['requests']} requests ({r['requests'] / r['wall']:.0f}/s), "
        f"{r['answers']} answers acknowledged, {r['stored']} stored, {r['duplicates']} twice",
        f"  all requests  p50 {1000 * r['all'][0]:7.1f} ms  p99 {1000 * r['all'][1]:7.1f} ms",
    ]
    for kind, (n, p50, p99) in r["kinds"].items():
        out.append(f"  {kind:<12}  p50 {1000 * p50:7.1f} ms  p99 {1000 * p99:7.1f} ms  ({n})")
    return out


def main() -> None:
    # the 200 participants are threads of this process: a short GIL switch interval keeps a
    # thread whose answer has arrived from waiting 5 ms turns to read it, which would count
    # as server latency
    sys.setswitchinterval(2e-4)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--analysis", default="demo-out/analysis", help="a real analysis folder")
    ap.add_argument("--participants", type=int, default=200)
    ap.add_argument("--think", type=float, default=3.0, help="mean seconds per page")
    ap.add_argument("--trials", type=int, default=16, help="main trials per participant")
    ap.add_argument(
        "--repeats", type=int, default=3, help="paced runs (this 2-core VM's speed varies)"
    )
    args = ap.parse_args()
    if not (Path(args.analysis) / "analysis.json").is_file():
        raise SystemExit(f"{args.analysis} is not an analysis: run `make demo` first or pass one")
    note = load_note()
    spec = {
        "name": "load",
        "analyses": [str(Path(args.analysis).resolve())],
        "features_per_sae": 8,
        "trials_per_participant": args.trials,
        "exclusions": {"max_failed_checks": 0, "min_seconds": 0.0},
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for k, think in enumerate([args.think] * args.repeats + [0.0]):
            r = run(spec_path, str(Path(tmp) / f"load{k}.sqlite"), args.participants, think)
            print("\n".join(lines(r)), flush=True)
            results.append(r)
    block = [line for r in results for line in [*lines(r), ""]][:-1]
    paced = sorted(results[:-1], key=lambda r: r["all"][1])[len(results[:-1]) // 2]
    p99s = ", ".join(f"{1000 * r['all'][1]:.0f}" for r in results[:-1])
    verdict = "met" if paced["all"][1] < 0.2 else "missed"
    over = [k for k, (_, _, p99) in paced["kinds"].items() if p99 >= 0.2]
    by_kind = (
        f" By kind, in that run, {', '.join(over)} stay above it (p99 "
        + ", ".join(f"{1000 * paced['kinds'][k][2]:.0f} ms" for k in over)
        + "): answers and the flow (invitation, consent, start, finish) are the writes, "
        "which queue one at a time."
        if over
        else " Every kind of request meets it in that run."
    )
    command = "python benchmarks/bench_study_load.py --analysis demo-out/analysis"
    text = report(
        "Study server: 200 participants at once on SQLite (bench_study_load.py)",
        command,
        block,
        detail=f"({note}; server and participants share the machine's {os.cpu_count()} cores)",
        before=[
            f"Each participant takes the whole study ({args.trials} main trials, 2 practice, "
            "2 attention checks, every image fetched) over its own keep-alive connection; "
            "the server is one uvicorn process on a SQLite file (WAL). The demo's analysis "
            "(DINOv2-S layer 10, TopK 6,144 latents) provides the trials."
        ],
        after=[
            f"Target p99 < 200 ms at people's pace: {verdict} in the median of "
            f"{args.repeats} paced runs (p99 over every request per run: {p99s} ms)."
            f"{by_kind} The unpaced run is the capacity: it queues by design, so its latencies "
            "measure the queue, not a target. The latencies are the participants' (client "
            "threads of one Python process, on the same 2 cores as the server)."
        ],
    )
    write_section(SECTION, text)


if __name__ == "__main__":
    main()
