"""The participant's path through a study, on top of its database: arrive (with the recruiting
platform's ids) -> consent -> instructions -> trials (practice with feedback, main trials,
attention checks) -> debrief -> completion code.

A participant is known only by an unguessable token (`secrets.token_urlsafe`, stored hashed),
so they reach only their own trials; their place is in the database, so a refresh, a reconnect
or a restarted server resumes where they were. Every answer is checked (the trial is theirs and
is the current one, clicks inside the image, a name of sensible length, a pick among the
choices) and stored once: a second answer to a trial is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from typing import Any

import numpy as np
from PIL import Image

from visae.errors import VisaeError
from visae.study.assign import circle_hit, participant_trials
from visae.study.db import RECRUITMENT, StudyDB
from visae.study.render import check_image, png, with_heatmap
from visae.study.scoring import anchored, localization_trial, naming_trial
from visae.study.trials import Plan, activation_map

STAGES = ("consent", "instructions", "trials", "debrief", "done")
MAX_NAME = 60
MAX_COMMENTS = 2000
MAX_PARAM = 128


class StudyError(VisaeError):
    """A refused request, with the HTTP status it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def token_sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


INSTRUCTIONS = {
    "localize": "These images show where a feature of the model fires (highlighted). Click on "
    "the new image where you expect it to fire most.",
    "name": "These images show where a feature of the model fires (highlighted). Name what it "
    "responds to in a few words, then pick the new image where it fires.",
    "check": "Attention check: click inside the green circle.",
}


class Study:
    """One study served from one database (the plan is checked against it on open)."""

    def __init__(self, plan: Plan, db: StudyDB) -> None:
        self.plan = plan
        self.db = db
        spec = plan.spec
        db.open(spec.name, plan.fingerprint, spec.to_dict())
        self._maps: dict[tuple[str, int, int], np.ndarray] = {}
        self._pngs: dict[tuple[Any, ...], bytes] = {}
        self._trials: dict[tuple[str, int], Any] = {}  # (token sha, position) -> trial row
        self.n_trials = len(plan.practice) + spec.trials_per_participant + spec.attention_checks

    # --- arrival ---

    def enter(self, params: dict[str, str]) -> str:
        """A new participant's token; a participant arriving again with the same recruitment
        id gets a fresh token to the same place (the old link stops working)."""
        from sqlalchemy.exc import IntegrityError

        params = {k: v for k, v in params.items() if k in RECRUITMENT}
        for k, v in params.items():
            if len(v) > MAX_PARAM or not v.isprintable():
                raise StudyError(400, f"URL parameter {k} is not a short printable id")
        external = params.get("PROLIFIC_PID") or None
        token = secrets.token_urlsafe(24)
        if external is not None and self._retoken(external, token):
            return token
        t = self.db.t
        code = self.plan.spec.completion_code or secrets.token_hex(4).upper()
        try:
            with self.db.begin() as conn:
                pid = conn.execute(
                    t.participants.insert().values(
                        token_sha=token_sha(token),
                        external_id=external,
                        params=json.dumps(params),
                        stage=STAGES[0],
                        completion_code=code,
                        created_at=time.time(),
                    )
                ).inserted_primary_key[0]
                trials = participant_trials(self.plan, int(pid) - 1)
                conn.execute(
                    t.trials.insert(),
                    [
                        {
                            "participant_id": pid,
                            "position": k,
                            "kind": tr.kind,
                            "protocol": tr.protocol,
                            "sae": tr.sae,
                            "latent": tr.latent,
                            "payload": json.dumps(tr.payload),
                        }
                        for k, tr in enumerate(trials)
                    ],
                )
        except IntegrityError:  # the same recruitment id arrived twice at once
            if external is None or not self._retoken(external, token):
                raise
        return token

    def _retoken(self, external: str, token: str) -> bool:
        """Give the participant with this recruitment id the new token (the old one stops
        working, cached images included); False when there is no such participant."""
        from sqlalchemy import select, update

        t = self.db.t
        with self.db.begin() as conn:
            old = conn.execute(
                select(t.participants.c.token_sha).where(t.participants.c.external_id == external)
            ).scalar()
            if old is None:
                return False
            conn.execute(
                update(t.participants)
                .where(t.participants.c.external_id == external)
                .values(token_sha=token_sha(token))
            )
        for key in [k for k in self._trials if k[0] == old]:
            self._trials.pop(key, None)
        return True

    def _participant(self, conn: Any, token: str) -> Any:
        from sqlalchemy import select

        t = self.db.t
        row = conn.execute(
            select(t.participants).where(t.participants.c.token_sha == token_sha(token))
        ).first()
        if row is None:
            raise StudyError(404, "unknown session: open the study from your invitation link")
        return row

    def _current(self, conn: Any, pid: int) -> Any:
        """The participant's first unanswered trial, or None."""
        from sqlalchemy import select

        t = self.db.t
        return conn.execute(
            select(t.trials)
            .outerjoin(t.responses, t.responses.c.trial_id == t.trials.c.id)
            .where(t.trials.c.participant_id == pid, t.responses.c.trial_id.is_(None))
            .order_by(t.trials.c.position)
            .limit(1)
        ).first()

    # --- the flow ---

    def state(self, token: str) -> dict[str, Any]:
        """Where the participant is, and the current trial as shown (never its answer)."""
        from sqlalchemy import update

        t = self.db.t
        with self.db.read() as conn:
            p = self._participant(conn, token)
            trial = self._current(conn, p.id) if p.stage == "trials" else None
        # answers are given in order, so the current trial's position is how many are done
        done = (
            trial.position if trial is not None else 0 if p.stage in STAGES[:3] else self.n_trials
        )
        out: dict[str, Any] = {"stage": p.stage, "study": self.plan.spec.name}
        out["progress"] = {"done": done, "total": self.n_trials}
        if trial is not None:
            if trial.shown_at is None:  # the clock of its time starts now, once
                with self.db.begin() as conn:
                    conn.execute(
                        update(t.trials)
                        .where(t.trials.c.id == trial.id, t.trials.c.shown_at.is_(None))
                        .values(shown_at=time.time())
                    )
            out["trial"] = self._shown(token, trial)
        if p.stage == "done":
            out["completion_code"] = p.completion_code
            url = self.plan.spec.completion_url
            if url:
                out["completion_url"] = url + p.completion_code
        return out

    def _shown(self, token: str, trial: Any) -> dict[str, Any]:
        payload = json.loads(trial.payload)
        base = f"/s/{token}/img/{trial.position}"
        shown: dict[str, Any] = {
            "position": trial.position,
            "kind": trial.kind,
            "protocol": trial.protocol,
            "instruction": INSTRUCTIONS["check" if trial.kind == "check" else trial.protocol],
            "max_clicks": 1 if trial.kind == "check" else self.plan.spec.max_clicks,
        }
        if trial.kind == "check":
            shown["query"] = f"{base}/check"
            return shown
        shown["references"] = [f"{base}/r{k}" for k in range(len(payload["references"]))]
        if trial.protocol == "localize":
            shown["query"] = f"{base}/q"
        else:
            shown["choices"] = [f"{base}/c{k}" for k in range(len(payload["choices"]))]
            shown["max_name"] = MAX_NAME
        return shown

    def advance(self, token: str, to: str) -> dict[str, Any]:
        """consent -> instructions -> trials, one step at a time (repeating a step is a no-op,
        so a double click or a retried request does no harm)."""
        from sqlalchemy import update

        t = self.db.t
        if to not in ("instructions", "trials"):
            raise StudyError(400, f"cannot move to stage {to!r}")
        before = STAGES[STAGES.index(to) - 1]
        with self.db.begin() as conn:
            p = self._participant(conn, token)
            if p.stage == before:
                conn.execute(
                    update(t.participants).where(t.participants.c.id == p.id).values(stage=to)
                )
            elif STAGES.index(p.stage) < STAGES.index(to):
                raise StudyError(409, f"this session is at the {p.stage} stage")
        return self.state(token)

    def submit(self, token: str, position: int, answer: Any) -> dict[str, Any]:
        """Store one answer; practice answers get their feedback back."""
        from sqlalchemy import update
        from sqlalchemy.exc import IntegrityError

        t = self.db.t
        if not isinstance(answer, dict):
            raise StudyError(400, "an answer is a JSON object")
        try:
            with self.db.begin() as conn:
                p = self._participant(conn, token)
                if p.stage != "trials":
                    raise StudyError(409, f"this session is at the {p.stage} stage, not trials")
                trial = self._current(conn, p.id)
                if trial is None or trial.position != position:
                    answered = trial.position if trial is not None else self.n_trials
                    if 0 <= position < answered:
                        raise StudyError(409, f"trial {position} is already answered")
                    raise StudyError(
                        409,
                        f"trial {position} is not this session's current trial"
                        + ("" if trial is None else f" ({trial.position} is)"),
                    )
                payload = json.loads(trial.payload)
                scored = self._score(trial, payload, answer)
                now = time.time()
                conn.execute(
                    t.responses.insert().values(
                        trial_id=trial.id,
                        participant_id=p.id,
                        created_at=now,
                        seconds=max(0.0, now - (trial.shown_at or now)),
                        **scored,
                    )
                )
                if position + 1 == self.n_trials:
                    conn.execute(
                        update(t.participants)
                        .where(t.participants.c.id == p.id)
                        .values(stage="debrief")
                    )
                elif trial.kind != "practice":  # the next trial is on screen from now
                    conn.execute(
                        update(t.trials)
                        .where(t.trials.c.participant_id == p.id)
                        .where(t.trials.c.position == position + 1)
                        .values(shown_at=now)
                    )
        except IntegrityError:  # a second answer to the trial, raced in from elsewhere
            raise StudyError(409, f"trial {position} is already answered") from None
        out: dict[str, Any] = {"ok": True}
        if trial.kind == "practice":
            if trial.protocol == "localize":
                out["feedback"] = {
                    "score": float(anchored(scored["raw"], scored["chance"])),
                    "heatmap": f"/s/{token}/img/{position}/fb",
                }
            else:
                out["feedback"] = {"correct": payload["correct"], "right": bool(scored["raw"])}
        return out

    def _score(self, trial: Any, payload: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        """The stored columns of a valid answer (raw score and chance where one is defined)."""
        if trial.kind == "check" or trial.protocol == "localize":
            clicks = _clicks(
                answer.get("clicks"), 1 if trial.kind == "check" else self.plan.spec.max_clicks
            )
            text = ";".join(f"{x:.5f},{y:.5f}" for x, y in clicks)
            if trial.kind == "check":
                passed = int(circle_hit(payload["circle"], *clicks[0]))
                return {"clicks": text, "passed": passed, "raw": float(passed), "chance": None}
            raw, chance = localization_trial(
                self.activation(trial.sae, payload["query"], trial.latent), clicks
            )
            return {"clicks": text, "raw": raw, "chance": chance}
        name = answer.get("name")
        if not isinstance(name, str) or not name.strip():
            raise StudyError(400, "name: write a short name for the feature")
        name = " ".join(name.split())
        if len(name) > MAX_NAME or not name.isprintable():
            raise StudyError(400, f"name: at most {MAX_NAME} printable characters")
        picked = answer.get("pick")
        n = len(payload["choices"])
        if isinstance(picked, bool) or not isinstance(picked, int) or not 0 <= picked < n:
            raise StudyError(400, f"pick: one of the {n} images (0 to {n - 1})")
        raw, chance = naming_trial(picked, payload["correct"], n)
        return {"clicks": "", "name": name, "pick": picked, "raw": raw, "chance": chance}

    def activation(self, sae: str, image: int, latent: int) -> np.ndarray:
        key = (sae, int(image), int(latent))
        if key not in self._maps:
            self._maps[key] = activation_map(self.plan.analyses[sae], key[2], key[1])
        return self._maps[key]

    def finish(self, token: str, comments: Any) -> dict[str, Any]:
        """debrief -> done: the optional comments stored, the completion code shown."""
        from sqlalchemy import update

        t = self.db.t
        if comments is None:
            comments = ""
        if not isinstance(comments, str) or len(comments) > MAX_COMMENTS:
            raise StudyError(400, f"comments: at most {MAX_COMMENTS} characters of text")
        with self.db.begin() as conn:
            p = self._participant(conn, token)
            if p.stage == "debrief":
                conn.execute(
                    update(t.participants)
                    .where(t.participants.c.id == p.id)
                    .values(stage="done", comments=comments, completed_at=time.time())
                )
            elif p.stage != "done":
                raise StudyError(409, f"this session is at the {p.stage} stage")
        return self.state(token)

    # --- images ---

    def trial(self, token: str, position: int) -> tuple[Any, bool]:
        """(the token's trial at `position`, whether it is answered)."""
        from sqlalchemy import select

        t = self.db.t
        with self.db.read() as conn:
            p = self._participant(conn, token)
            trial = conn.execute(
                select(t.trials).where(
                    t.trials.c.participant_id == p.id, t.trials.c.position == position
                )
            ).first()
            if trial is None:
                raise StudyError(404, f"no trial {position} in this session")
            answered = conn.execute(
                select(t.responses.c.trial_id).where(t.responses.c.trial_id == trial.id)
            ).first()
        return trial, answered is not None

    def image(self, token: str, position: int, slot: str) -> bytes:
        """A trial's image as PNG: references `r0..` (with the feature's heatmap), the query
        `q`, choices `c0..`, a check's `check`, a practice trial's feedback `fb` (the query's
        true map, only once answered). Only the token's own trials."""
        cached = self.cached_image(token, position, slot)
        if cached is not None:
            return cached
        trial, answered = self.trial(token, position)
        self._trials[(token_sha(token), position)] = trial
        return self._render(trial, slot, answered)

    def cached_image(self, token: str, position: int, slot: str) -> bytes | None:
        """The image without touching the database, when this token's trial was looked up
        before (a trial never changes; the feedback slot, which depends on the answer, is
        never served from here); else None."""
        trial = self._trials.get((token_sha(token), position))
        if trial is None or slot == "fb":
            return None
        return self._render(trial, slot, answered=False)

    def _render(self, trial: Any, slot: str, answered: bool) -> bytes:
        payload = json.loads(trial.payload)
        shown = _slot(payload, slot, trial.kind, answered)
        if shown is None:
            raise StudyError(404, f"trial {trial.position} has no image {slot!r}")
        if trial.kind == "check":
            return check_image(int(payload["seed"]), *payload["circle"])
        image, heat = shown
        key = (trial.sae, image, trial.latent if heat else -1)
        if key not in self._pngs:
            analysis = self.plan.analyses[trial.sae]
            with Image.open(analysis.thumbnail(image)) as im:
                shown_image = im.convert("RGB")
            if heat:
                shown_image = with_heatmap(
                    shown_image, self.activation(trial.sae, image, trial.latent)
                )
            self._pngs[key] = png(shown_image)
        return self._pngs[key]

    def progress(self) -> dict[str, Any]:
        """For the admin page: participants per stage, answers per kind, and how evenly the
        main trials are covered so far."""
        from sqlalchemy import func, select

        t = self.db.t
        with self.db.read() as conn:
            stages = dict(
                conn.execute(
                    select(t.participants.c.stage, func.count()).group_by(t.participants.c.stage)
                ).all()
            )
            kinds = dict(
                conn.execute(
                    select(t.trials.c.kind, func.count())
                    .join(t.responses, t.responses.c.trial_id == t.trials.c.id)
                    .group_by(t.trials.c.kind)
                ).all()
            )
            per_unit = conn.execute(
                select(func.count())
                .select_from(t.responses)
                .join(t.trials, t.responses.c.trial_id == t.trials.c.id)
                .where(t.trials.c.kind == "main")
                .group_by(t.trials.c.sae, t.trials.c.latent, t.trials.c.protocol)
            ).all()
        counts = [int(c) for (c,) in per_unit]
        n_units = len(self.plan.units)
        counts += [0] * (n_units - len(counts))
        return {
            "participants": {s: int(stages.get(s, 0)) for s in STAGES},
            "answers": {k: int(kinds.get(k, 0)) for k in ("practice", "main", "check")},
            "units": n_units,
            "answers_per_unit": {"min": min(counts), "max": max(counts)},
        }


def _slot(payload: dict[str, Any], slot: str, kind: str, answered: bool) -> tuple[int, bool] | None:
    """(image, with heatmap) of a slot name, or None when the trial has no such slot."""
    if kind == "check":
        return (-1, False) if slot == "check" else None
    if slot == "q" and "query" in payload:
        return int(payload["query"]), False
    if slot == "fb" and "query" in payload and kind == "practice" and answered:
        return int(payload["query"]), True
    for prefix, key, heat in (("r", "references", True), ("c", "choices", False)):
        if slot.startswith(prefix) and slot[1:].isdigit() and key in payload:
            k = int(slot[1:])
            if k < len(payload[key]):
                return int(payload[key][k]), heat
    return None


def _clicks(value: Any, most: int) -> list[tuple[float, float]]:
    if not isinstance(value, list) or not 1 <= len(value) <= most:
        raise StudyError(400, f"clicks: 1 to {most} [x, y] points")
    out = []
    for point in value:
        ok = isinstance(point, list) and len(point) == 2
        ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) for v in point)
        if not ok or not all(math.isfinite(v) for v in point):
            raise StudyError(400, "clicks: each point is [x, y], two numbers")
        x, y = float(point[0]), float(point[1])
        if not (0 <= x < 1 and 0 <= y < 1):
            raise StudyError(400, f"clicks: ({x:.3f}, {y:.3f}) is outside the image")
        out.append((x, y))
    return out
