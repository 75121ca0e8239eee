"""The study server over real HTTP on loopback, the same suite on SQLite and on a throwaway
PostgreSQL cluster: the participant flow, what a token reaches, every refused input, resuming,
counterbalancing, and databases of other studies."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from study_helpers import spec_dict

from visae.errors import VisaeError
from visae.study.assign import participant_trials
from visae.study.db import StudyDB
from visae.study.render import png, with_heatmap
from visae.study.responses import EXPORT_COLUMNS
from visae.study.server import running
from visae.study.session import Study
from visae.study.simulate import Client, Oracle
from visae.study.spec import parse_spec
from visae.study.trials import build_plan

pytestmark = pytest.mark.slow  # the shared real analysis; PostgreSQL runs a cluster
ADMIN = "admin-secret-token"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plan(study_analysis: Path) -> Any:
    return build_plan(parse_spec(spec_dict(study_analysis)))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "study.sqlite")
    return request.getfixturevalue("postgres")()


@pytest.fixture
def served(plan: Any, db_url: str) -> Iterator[tuple[Study, Client]]:
    study = Study(plan, StudyDB(db_url))
    with running(study, ADMIN) as url:
        client = Client(url)
        yield study, client
        client.close()


def _enter(client: Client, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    status, _, headers = client.request("POST", "/enter" + (f"?{query}" if query else ""))
    assert status == 303
    return headers["location"].rsplit("/", 1)[-1]


def _begin(client: Client, token: str) -> dict[str, Any]:
    client.ok("POST", f"/api/s/{token}/consent", {"agree": True})
    return client.ok("POST", f"/api/s/{token}/start", {})


def test_a_participant_from_invitation_to_completion_code(served: tuple[Study, Client]) -> None:
    study, client = served
    token = _enter(client, PROLIFIC_PID="abc123", STUDY_ID="s1", SESSION_ID="x9", other="y")
    api = f"/api/s/{token}"
    assert client.ok("GET", f"{api}/state")["stage"] == "consent"
    status, body, _ = client.request("POST", f"{api}/consent", {"agree": False})
    assert status == 400 and "agree must be true" in body["error"]
    status, body, _ = client.request("POST", f"{api}/start", {})
    assert status == 409 and "consent stage" in body["error"]
    assert client.ok("POST", f"{api}/consent", {"agree": True})["stage"] == "instructions"
    assert client.ok("POST", f"{api}/consent", {"agree": True})["stage"] == "instructions"
    state = client.ok("POST", f"{api}/start", {})
    oracle = Oracle(study)
    kinds, feedback = [], []
    while state["stage"] == "trials":
        trial = state["trial"]
        assert "correct" not in json.dumps(trial) and "latent" not in trial  # nothing given away
        kinds.append(trial["kind"])
        for url in [*trial.get("references", []), *trial.get("choices", []), trial.get("query")]:
            if url:
                assert client.ok("GET", url).startswith(PNG)
        if trial["kind"] == "practice" and trial["protocol"] == "localize":
            status, _, _ = client.request("GET", f"/s/{token}/img/{trial['position']}/fb")
            assert status == 404  # the true map only after answering
        out = client.ok(
            "POST",
            f"{api}/trial/{trial['position']}",
            oracle.answer(token, trial["position"], 1.0, True, 0),
        )
        if trial["kind"] == "practice":
            feedback.append(out["feedback"])
            if "heatmap" in out["feedback"]:
                assert client.ok("GET", out["feedback"]["heatmap"]).startswith(PNG)
        else:
            assert "feedback" not in out
        state = client.ok("GET", f"{api}/state")
    assert kinds[:2] == ["practice", "practice"] and kinds[2] == "main"
    assert Counter(kinds) == {"practice": 2, "main": 16, "check": 2}
    assert feedback[0]["score"] == pytest.approx(1.0) and feedback[1]["right"] is True
    assert state["stage"] == "debrief"
    done = client.ok("POST", f"{api}/finish", {"comments": "fine"})
    assert done["stage"] == "done" and len(done["completion_code"]) == 8
    assert client.ok("GET", f"{api}/state")["completion_code"] == done["completion_code"]
    rows = study.db.rows()
    assert len(rows) == 20 and sorted(int(r["position"]) for r in rows) == list(range(20))
    assert {r["prolific_pid"] for r in rows} == {"abc123"} and rows[0]["session_id"] == "x9"
    assert all(r["passed"] == "1" for r in rows if r["kind"] == "check")
    status, scores, _ = client.request(
        "GET", "/api/admin/scores", headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert status == 200
    assert [s["mean"] for s in scores["scores"]] == pytest.approx([1.0, 1.0])


def _answer_until(
    study: Study, client: Client, token: str, trial: dict[str, Any], protocol: str
) -> dict[str, Any]:
    """Answer (as the oracle) until the current trial is a non-check trial of `protocol`."""
    while trial["protocol"] != protocol or trial["kind"] == "check":
        answer = Oracle(study).answer(token, trial["position"], 1.0, True, 0)
        client.ok("POST", f"/api/s/{token}/trial/{trial['position']}", answer)
        trial = client.ok("GET", f"/api/s/{token}/state")["trial"]
    return trial


def test_every_bad_answer_is_refused(served: tuple[Study, Client]) -> None:
    study, client = served
    token = _enter(client)
    trial = _begin(client, token)["trial"]
    api = f"/api/s/{token}"
    trial = _answer_until(study, client, token, trial, "localize")
    here = f"{api}/trial/{trial['position']}"
    for answer, message in (
        ({"clicks": [[1.0, 0.5]]}, "outside the image"),
        ({"clicks": [[-0.1, 0.5]]}, "outside the image"),
        ({"clicks": [[0.1, 0.1]] * 4}, "1 to 3"),
        ({"clicks": []}, "1 to 3"),
        ({"clicks": [["a", 0.5]]}, "two numbers"),
        ({"clicks": [[True, 0.5]]}, "two numbers"),
        ({"clicks": "0.5,0.5"}, "1 to 3"),
        ([1, 2], "JSON object"),
    ):
        status, body, _ = client.request("POST", here, answer)
        assert status == 400 and message in body["error"], (answer, body)
    for raw, status_wanted in ((b"{not json", 400), (b"x" * 20_000, 413)):
        status, _, _ = client.request("POST", here, raw=raw)
        assert status == status_wanted
    status, body, _ = client.request("POST", f"{api}/trial/{trial['position'] + 1}", {})
    assert status == 409 and "not this session's current trial" in body["error"]
    # the same answer sent eight times at once: one is stored, seven refused
    statuses: list[int] = []
    barrier = threading.Barrier(8)

    def send() -> None:
        c = Client(f"http://{client.host}:{client.port}")
        barrier.wait()
        statuses.append(c.request("POST", here, {"clicks": [[0.5, 0.5]]})[0])
        c.close()

    threads = [threading.Thread(target=send) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(statuses) == [200] + [409] * 7
    status, body, _ = client.request("POST", here, {"clicks": [[0.5, 0.5]]})
    assert status == 409 and "already answered" in body["error"]
    trial = _answer_until(study, client, token, client.ok("GET", f"{api}/state")["trial"], "name")
    here = f"{api}/trial/{trial['position']}"
    for answer, message in (
        ({"name": "", "pick": 0}, "write a short name"),
        ({"name": "x" * 61, "pick": 0}, "at most 60"),
        ({"name": "dog\x00", "pick": 0}, "printable"),
        ({"name": "dog", "pick": 4}, "one of the 4 images"),
        ({"name": "dog", "pick": True}, "one of the 4 images"),
        ({"name": "dog"}, "one of the 4 images"),
    ):
        status, body, _ = client.request("POST", here, answer)
        assert status == 400 and message in body["error"], (answer, body)
    assert client.ok("POST", here, {"name": "  a   dog ", "pick": 1})["ok"] is True
    assert [r["name"] for r in study.db.rows() if r["protocol"] == "name"][-1] == "a dog"
    status, body, _ = client.request("POST", f"{api}/finish", {})
    assert status == 409 and "trials stage" in body["error"]


def test_a_token_reaches_only_its_own_trials_and_admin_needs_its_token(
    served: tuple[Study, Client],
) -> None:
    study, client = served
    a, b = _enter(client), _enter(client)
    assert a != b and len(a) >= 32
    for token in (a, b):
        _begin(client, token)
    for path in ("/api/s/nope/state", "/s/nope/img/0/r0"):
        status, body, _ = client.request("GET", path)
        assert status == 404 and "unknown session" in body["error"]
    status, _, _ = client.request("POST", "/api/s/nope/trial/0", {"clicks": [[0.5, 0.5]]})
    assert status == 404
    # each token's image is its own trial's first reference with that feature's heatmap
    for token in (a, b):
        trial, _ = study.trial(token, 2)
        first = json.loads(trial.payload)["references"][0]
        analysis = study.plan.analyses[trial.sae]
        with Image.open(analysis.thumbnail(first)) as im:
            expected = png(
                with_heatmap(im.convert("RGB"), analysis.latent_map(first, trial.latent))
            )
        assert client.ok("GET", f"/s/{token}/img/2/r0") == expected
    status, body, _ = client.request("GET", f"/s/{a}/img/99/r0")
    assert status == 404 and "no trial 99" in body["error"]
    status, body, _ = client.request("GET", f"/s/{a}/img/0/z1")
    assert status == 404
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}):
        for path in ("progress", "scores", "export.csv", "export.json", "scores.png"):
            status, _, _ = client.request("GET", f"/api/admin/{path}", headers=headers)
            assert status == 401, (headers, path)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    progress = client.request("GET", "/api/admin/progress", headers=auth)[1]
    assert progress["participants"]["trials"] == 2 and progress["units"] == 16
    status, csv_text, headers = client.request("GET", "/api/admin/export.csv", headers=auth)
    assert status == 200 and csv_text.decode().splitlines()[0] == ",".join(EXPORT_COLUMNS)
    export = client.request("GET", "/api/admin/export.json", headers=auth)[1]
    assert export["fingerprint"] == study.plan.fingerprint and export["responses"] == []
    assert client.request("GET", "/api/admin/scores.png", headers=auth)[1].startswith(PNG)


def test_reconnecting_resumes_where_the_participant_was(
    served: tuple[Study, Client], plan: Any, db_url: str
) -> None:
    study, client = served
    old = _enter(client, PROLIFIC_PID="p-42")
    _begin(client, old)
    oracle = Oracle(study)
    for position in range(3):
        client.ok(
            "POST", f"/api/s/{old}/trial/{position}", oracle.answer(old, position, 1, True, 0)
        )
    before = client.ok("GET", f"/api/s/{old}/state")
    new = _enter(client, PROLIFIC_PID="p-42")  # the same person from another device
    assert new != old and client.request("GET", f"/api/s/{old}/state")[0] == 404
    after = client.ok("GET", f"/api/s/{new}/state")
    assert after["trial"]["position"] == before["trial"]["position"] == 3
    assert after["progress"] == before["progress"] == {"done": 3, "total": 20}
    # a restarted server (a new Study on the same database) resumes them as well
    again = Study(plan, StudyDB(db_url))
    assert again.state(new)["trial"]["position"] == 3
    assert len(study.db.rows()) == 3


def test_assignment_is_counterbalanced(study_analysis: Path) -> None:
    plan = build_plan(parse_spec(spec_dict(study_analysis, trials_per_participant=5)))
    counts: Counter = Counter()
    for n in range(40):
        trials = participant_trials(plan, n)
        kinds = [t.kind for t in trials]
        assert kinds[:2] == ["practice", "practice"] and kinds[2] != "check"
        main = [(t.sae, t.latent, t.protocol) for t in trials if t.kind == "main"]
        assert len(main) == len(set(main)) == 5
        counts.update(main)
        assigned = [
            counts[(plan.features[f].feature.sae, plan.features[f].feature.latent, p)]
            for f, p in plan.units
        ]
        assert max(assigned) - min(assigned) <= 1, n
    assert participant_trials(plan, 3) == participant_trials(plan, 3)
    practice = {t.feature.latent for t in plan.practice}
    assert len(practice) == 2 and not practice & {t.feature.latent for t in plan.features}
    with pytest.raises(VisaeError, match=r"trials_per_participant \(17\) exceeds the study's 16"):
        build_plan(parse_spec(spec_dict(study_analysis, trials_per_participant=17)))


def test_a_database_of_another_study_is_refused(
    plan: Any, db_url: str, study_analysis: Path, tmp_path: Path
) -> None:
    Study(plan, StudyDB(db_url))
    other = build_plan(parse_spec(spec_dict(study_analysis, seed=5)))
    with pytest.raises(VisaeError, match=r"holds study 'pilot' \(plan [0-9a-f]{12}\), not this"):
        Study(other, StudyDB(db_url))
    Study(plan, StudyDB(db_url))  # its own study opens again
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE participants (x INTEGER)")
    with pytest.raises(VisaeError, match="is not a visae study database"):
        Study(plan, StudyDB(str(foreign)))
    old = tmp_path / "old.sqlite"
    Study(plan, StudyDB(str(old)))
    with sqlite3.connect(old) as c:
        c.execute("UPDATE visae_study SET value = '0' WHERE key = 'schema_version'")
    with pytest.raises(VisaeError, match="schema version 0; this visae reads 1"):
        Study(plan, StudyDB(str(old)))
    with pytest.raises(VisaeError, match="give a file path \\(SQLite\\) or a postgresql"):
        StudyDB("mysql://x/y")


def test_scoring_a_database_or_its_exports_offline(
    plan: Any, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import csv

    from visae.cli import main
    from visae.study.simulate import simulated_study

    study = Study(plan, StudyDB(db_url))
    simulated_study(study, [1.0, 1.0, 1.0, 0.0, 0.0, 1.0], [True] * 5 + [False], images=False)
    out, report = tmp_path / "scores.json", tmp_path / "report"
    assert main(["study", "score", db_url, "--out", str(out), "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "excluded: 1 participants (failed checks)" in printed
    assert "names (" in printed and "MiniLM cosine to their feature's label" in printed
    from_db = json.loads(out.read_text())
    assert {s["n_participants"] for s in from_db["scores"]} == {5}
    page = (report / "report.html").read_text()
    assert "human interpretability scores" in page and (report / "scores.png").is_file()
    assert (report / "proxy_locality.png").is_file() and "Names against" in page
    # the same scores from the server's two exports
    rows = study.db.rows()
    export = tmp_path / "study.json"
    export.write_text(json.dumps({"spec": plan.spec.to_dict(), "responses": rows}))
    table = tmp_path / "responses.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=EXPORT_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(plan.spec.to_dict()))
    for source in (
        ["study", "score", str(export)],
        ["study", "score", str(table), "--spec", str(spec_file)],
    ):
        assert main([*source, "--out", str(out), "--no-names"]) == 0
        again = json.loads(out.read_text())
        assert again["scores"] == from_db["scores"] and "names" not in again
    capsys.readouterr()
    other = tmp_path / "other.json"
    other.write_text(json.dumps(plan.spec.to_dict() | {"name": "other"}))
    for argv, message in (
        (["study", "score", str(table)], "give the study's spec with --spec"),
        (["study", "score", db_url, "--spec", str(other)], "holds study 'pilot', not the spec's"),
        (["study", "score", str(tmp_path / "none.sqlite")], "no study database at"),
        (["study", "score", str(spec_file)], "is not a study export"),
    ):
        assert main(argv) == 2
        assert message in capsys.readouterr().err, argv
