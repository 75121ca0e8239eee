"""The study server as its own process: 200 simulated participants at once over loopback (none
lost, none duplicated, scores where the observers' skills put them), and a kill -9 mid-study
(every acknowledged answer still there after the restart, participants resume)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from study_helpers import spec_dict

from visae.study.db import StudyDB
from visae.study.responses import score_responses
from visae.study.session import Study
from visae.study.simulate import Client, Oracle, take_study
from visae.study.spec import parse_spec
from visae.study.trials import build_plan

pytestmark = pytest.mark.slow
ADMIN = "load-test-admin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(spec: Path, db: str) -> Iterator[tuple[str, subprocess.Popen]]:
    port = _free_port()
    cmd = [sys.executable, "-m", "visae", "study", "serve", str(spec), "--db", db]
    cmd += ["--port", str(port), "--admin-token", ADMIN]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"server did not start: {proc.stdout.read()}") from None
            time.sleep(0.1)
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def spec_file(study_analysis: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("load") / "spec.json"
    path.write_text(json.dumps(spec_dict(study_analysis)))
    return path


SKILLS = (0.0, 1.0, 0.5)  # participant i answers as SKILLS[i % 3]: random, oracle, noisy


def test_200_participants_at_once(spec_file: Path, tmp_path: Path) -> None:
    from visae.text import TextEncoder

    db = str(tmp_path / "load.sqlite")
    plan = build_plan(parse_spec(json.loads(spec_file.read_text())))
    with server_process(spec_file, db) as (url, _):
        oracle = Oracle(Study(plan, StudyDB(db)))

        def one(i: int) -> Any:
            return take_study(
                url,
                oracle,
                SKILLS[i % 3],
                seed=i,
                params={"PROLIFIC_PID": f"P{i}"},
                think=0.02,
                images=False,
            )

        start = time.perf_counter()
        with ThreadPoolExecutor(200) as pool:
            outcomes = list(pool.map(one, range(200), timeout=600))
        took = time.perf_counter() - start
    assert took < 600
    assert all(o.completion_code for o in outcomes) and len({o.token for o in outcomes}) == 200
    rows = StudyDB(db).rows()
    assert len(rows) == sum(len(o.acknowledged) for o in outcomes) == 200 * 20
    per = Counter((r["participant"], r["position"]) for r in rows)
    assert max(per.values()) == 1  # no answer twice
    by_pid = {r["prolific_pid"]: r["participant"] for r in rows}
    for i, o in enumerate(outcomes):  # every acknowledged answer is stored
        mine = {int(r["position"]) for r in rows if r["participant"] == by_pid[f"P{i}"]}
        assert mine == set(o.acknowledged) == set(range(20))
    # every participant took all 16 main trials, each answered as its seed and skill decide:
    # the scores do not depend on arrival order
    groups = {s: [r for r in rows if SKILLS[int(r["prolific_pid"][1:]) % 3] == s] for s in SKILLS}
    encoder = TextEncoder()
    scored = {
        s: score_responses(plan.spec, g, boot=300, analyses=plan.analyses, encoder=encoder)
        for s, g in groups.items()
    }
    mean = {s: {x["protocol"]: x["mean"] for x in r["scores"]} for s, r in scored.items()}
    for protocol in ("localize", "name"):
        assert abs(mean[0.0][protocol]) < 0.05, mean
        assert mean[1.0][protocol] == pytest.approx(1.0, abs=0.05)
        assert 0.2 < mean[0.5][protocol] < 0.8
    names = {s: r["names"][0] for s, r in scored.items()}
    assert names[1.0]["difference"]["lo"] > 0.2  # the oracle types the feature's label
    assert abs(names[0.0]["difference"]["mean"]) < 0.1  # filler words say nothing


def test_kill_9_mid_study_loses_no_acknowledged_answer(spec_file: Path, tmp_path: Path) -> None:
    db = str(tmp_path / "kill.sqlite")
    plan = build_plan(parse_spec(json.loads(spec_file.read_text())))
    acknowledged: dict[str, list[int]] = {}
    stop = threading.Event()

    def participant(url: str, i: int, oracle: Oracle) -> None:
        client = Client(url, timeout=10)
        try:
            status, _, headers = client.request("POST", f"/enter?PROLIFIC_PID=K{i}")
            token = headers["location"].rsplit("/", 1)[-1]
            acknowledged[token] = []
            api = f"/api/s/{token}"
            client.ok("POST", f"{api}/consent", {"agree": True})
            state = client.ok("POST", f"{api}/start", {})
            while state["stage"] == "trials" and not stop.is_set():
                position = state["trial"]["position"]
                answer = oracle.answer(token, position, 1.0, True, i)
                status, _, _ = client.request("POST", f"{api}/trial/{position}", answer)
                if status == 200:
                    acknowledged[token].append(position)
                state = client.ok("GET", f"{api}/state")
        except (OSError, Exception):  # the server died under it: what it was told is in acked
            return
        finally:
            client.close()

    with server_process(spec_file, db) as (url, proc):
        oracle = Oracle(Study(plan, StudyDB(db)))
        threads = [threading.Thread(target=participant, args=(url, i, oracle)) for i in range(12)]
        [t.start() for t in threads]
        while sum(len(v) for v in acknowledged.values()) < 60:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        [t.join(timeout=30) for t in threads]
    acked = {tok: list(v) for tok, v in acknowledged.items()}
    assert sum(len(v) for v in acked.values()) >= 60
    with server_process(spec_file, db) as (url, _):
        study = Study(plan, StudyDB(db))
        for token, positions in acked.items():
            stored = {int(r) for r in _positions(study, token)}
            assert set(positions) <= stored  # nothing acknowledged is lost
            assert len(stored - set(positions)) <= 1  # at most the answer in flight at the kill
            client = Client(url)
            state = client.ok("GET", f"/api/s/{token}/state")  # they resume where they were
            if state["stage"] == "trials":
                assert state["trial"]["position"] == len(stored) == max(stored, default=-1) + 1
            client.close()


def _positions(study: Study, token: str) -> list[int]:
    from sqlalchemy import select

    from visae.study.session import token_sha

    t = study.db.t
    with study.db.begin() as conn:
        return [
            r.position
            for r in conn.execute(
                select(t.trials.c.position)
                .join(t.responses, t.responses.c.trial_id == t.trials.c.id)
                .join(t.participants, t.participants.c.id == t.trials.c.participant_id)
                .where(t.participants.c.token_sha == token_sha(token))
            )
        ]
