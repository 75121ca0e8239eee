"""The study in the Debian Chromium, driven by Playwright as a person would take it: the
invitation link, consent, practice with feedback, trials (clicks on the image, a typed name and
a picked image), a refresh midway, the debrief and the completion code; then the admin page
behind its token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from study_helpers import spec_dict
from test_viewer import CHROMIUM, CHROMIUM_ARGS

from visae.study.db import StudyDB
from visae.study.server import running
from visae.study.session import Study
from visae.study.simulate import Oracle
from visae.study.spec import parse_spec
from visae.study.trials import build_plan

pytestmark = pytest.mark.slow
ADMIN = "browser-admin-token"


@pytest.fixture
def page(study_analysis: Path, tmp_path: Path) -> Iterator[tuple[Any, Study, str]]:
    assert CHROMIUM.exists(), "Debian chromium is not installed (`make test` installs it)"
    from playwright.sync_api import sync_playwright

    spec = parse_spec(spec_dict(study_analysis, trials_per_participant=4, attention_checks=1))
    study = Study(build_plan(spec), StudyDB(str(tmp_path / "study.sqlite")))
    with running(study, ADMIN) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1100, "height": 1400})
        p = context.new_page()
        errors: list[str] = []
        p.on("pageerror", lambda e: errors.append(str(e)))
        yield p, study, url
        browser.close()
        assert errors == []


def _answer_in_page(p: Any, study: Study, token: str, oracle: Oracle) -> str:
    """Answer the trial on screen as the oracle would, with the mouse and keyboard."""
    trial = p.locator("#trial")
    position, kind = int(trial.get_attribute("data-position")), trial.get_attribute("data-kind")
    answer = oracle.answer(token, position, 1.0, True, 0)
    if "clicks" in answer:
        image = p.locator("#query-image")
        image.wait_for()
        p.wait_for_function("document.getElementById('query-image').complete")
        box = image.bounding_box()
        x, y = answer["clicks"][0]
        p.mouse.click(box["x"] + x * box["width"], box["y"] + y * box["height"])
        assert p.locator(".mark").count() == 1
    else:
        p.fill("#name", answer["name"])
        p.click("#name-next")
        p.locator(".choice").nth(answer["pick"]).click()
    p.click("#submit")
    if kind == "practice":
        p.locator("#feedback").wait_for()
        p.click("#continue")
    p.wait_for_function(
        f"!document.getElementById('trial') || "
        f"document.getElementById('trial').dataset.position !== '{position}'"
    )
    return kind


def test_a_person_takes_the_study_in_chromium(page: tuple[Any, Study, str]) -> None:
    p, study, url = page
    p.goto(f"{url}/?PROLIFIC_PID=pw-1&STUDY_ID=st&SESSION_ID=se")
    p.click("#begin")
    p.wait_for_url("**/s/*")
    token = p.url.rsplit("/", 1)[-1]
    p.click("#consent-continue")
    assert "tick the box" in p.locator("#error").inner_text()
    p.check("#consent-agree")
    p.click("#consent-continue")
    p.click("#start")
    p.locator("#trial").wait_for()
    oracle = Oracle(study)
    kinds = []
    while p.locator("#trial").count():
        if len(kinds) == 3:  # a refresh midway shows the same trial again
            before = p.locator("#trial").get_attribute("data-position")
            p.reload()
            p.locator("#trial").wait_for()
            assert p.locator("#trial").get_attribute("data-position") == before
        kinds.append(_answer_in_page(p, study, token, oracle))
    assert kinds.count("practice") == 2 and kinds.count("main") == 4 and kinds.count("check") == 1
    p.fill("#comments", "clear instructions")
    p.click("#finish")
    code = p.locator("#code").inner_text()
    rows = study.db.rows()
    assert code == study.state(token)["completion_code"] and len(rows) == 7
    assert {r["prolific_pid"] for r in rows} == {"pw-1"}
    # the browser's click geometry is the server's: the oracle's clicks at the peak patch
    # score 1 and hit the check's circle
    for r in rows:
        if r["protocol"] == "localize" and r["kind"] != "check":
            assert float(r["raw"]) == pytest.approx(1.0), r
        if r["kind"] == "check":
            assert r["passed"] == "1"
    names = [r["name"] for r in rows if r["protocol"] == "name"]
    assert all(names) and all(float(r["raw"]) == 1 for r in rows if r["protocol"] == "name")


def test_the_admin_page_is_behind_its_token(page: tuple[Any, Study, str], tmp_path: Path) -> None:
    p, study, url = page
    from visae.study.simulate import take_study

    oracle = Oracle(study)
    for i in range(3):
        take_study(url, oracle, 1.0, seed=i, images=False)
    p.goto(f"{url}/admin")
    p.locator("#login").wait_for()
    assert p.locator("#panel").is_hidden()
    p.fill("#admin-token", "wrong")
    p.click("#admin-login")
    p.wait_for_function("document.getElementById('error').textContent.includes('admin token')")
    assert p.locator("#panel").is_hidden()
    p.goto("about:blank")
    p.goto(f"{url}/admin#{ADMIN}")
    p.locator("#panel").wait_for()
    assert "done3" in p.locator("#progress").inner_text().replace("\t", "").replace(" ", "")
    p.wait_for_function("document.getElementById('plot').naturalWidth > 0")
    assert "above chance" in p.locator("#scores").inner_text()
    with p.expect_download() as download:
        p.click("#export-csv")
    saved = tmp_path / "responses.csv"
    download.value.save_as(saved)
    assert len(saved.read_text().splitlines()) == 1 + 3 * 7
    with p.expect_download() as download:
        p.click("#export-json")
    download.value.save_as(tmp_path / "study.json")
    assert json.loads((tmp_path / "study.json").read_text())["fingerprint"] == (
        study.plan.fingerprint
    )
