"""Simulated participants that take a served study over HTTP as a browser would (the same
requests, images included): the scoring's validity check end to end, the load test, and the
demo's study. Their skill is an observer's (`visae.study.observers`): 0 answers at random, 1 is
an oracle that reads the true activation map, the right image and the feature's label from the
study's database and analyses, which a person cannot see.
"""

from __future__ import annotations

import http.client
import json
import secrets
import time
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np

from visae.errors import VisaeError
from visae.study.names import feature_labels
from visae.study.observers import click, pick
from visae.study.session import Study

FILLER_NAMES = ("thing", "stuff", "texture", "colour", "shape", "pattern", "object", "edge")


def request_kind(path: str) -> str:
    """What a request is for, to report latencies by kind: image, answer, state or flow."""
    if "/img/" in path:
        return "image"
    if "/trial/" in path:
        return "answer"
    return "state" if path.endswith("/state") else "flow"


class Client:
    """One participant's keep-alive HTTP connection, timing every request."""

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        self.latencies: list[tuple[str, float]] = []  # (kind of request, seconds)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, dict]:
        """(status, JSON or bytes, headers with lower-case names); `raw`: a body sent as is."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        headers = dict(headers or {})
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
        try:
            response, payload, seconds = self._exchange(method, path, data, headers)
        except (ConnectionError, http.client.HTTPException):  # the server closed keep-alive
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            response, payload, seconds = self._exchange(method, path, data, headers)
        self.latencies.append((request_kind(path), seconds))
        kind = response.getheader("Content-Type", "")
        value = json.loads(payload) if kind.startswith("application/json") else payload
        return response.status, value, {k.lower(): v for k, v in response.getheaders()}

    def _exchange(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[http.client.HTTPResponse, bytes, float]:
        start = time.perf_counter()
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        return response, payload, time.perf_counter() - start

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, value, _ = self.request(method, path, body)
        if status != 200:
            raise VisaeError(f"{method} {path} answered {status}: {value}")
        return value

    def close(self) -> None:
        self.conn.close()


@dataclass
class Outcome:
    """What one simulated participant did: its token, code, acknowledged answers, latencies."""

    token: str
    completion_code: str = ""
    acknowledged: list[int] = field(default_factory=list)
    latencies: list[tuple[str, float]] = field(default_factory=list)


class Oracle:
    """The true answers of a served study's trials, read from its database and analyses."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.labels = {name: feature_labels(a) for name, a in study.plan.analyses.items()}

    def answer(
        self, token: str, position: int, skill: float, attentive: bool, seed: int
    ) -> dict[str, Any]:
        """The answer of an observer of this skill. Its randomness depends on `seed` and the
        trial's feature and protocol only, not on the order trials come in, so a set of
        simulated participants who take every trial scores the same whatever their arrival
        order."""
        trial, _ = self.study.trial(token, position)
        payload = json.loads(trial.payload)
        what = f"{trial.kind}#{trial.sae}#{trial.latent}#{trial.protocol}#{payload.get('seed')}"
        rng = np.random.default_rng([seed, zlib.crc32(what.encode())])
        if trial.kind == "check":
            cx, cy, _r = payload["circle"]
            spot = [cx, cy] if attentive else [float(rng.random()), float(rng.random())]
            return {"clicks": [spot]}
        if trial.protocol == "localize":
            activation = self.study.activation(trial.sae, payload["query"], trial.latent)
            return {"clicks": [list(click(activation, skill, rng))]}
        good = rng.random() < skill
        label = self.labels[trial.sae][trial.latent]
        name = label if good and label else str(rng.choice(FILLER_NAMES))
        picked = pick(payload["correct"], len(payload["choices"]), skill, rng)
        return {"name": name, "pick": picked}


def take_study(
    base_url: str,
    oracle: Oracle,
    skill: float,
    seed: int,
    attentive: bool = True,
    params: dict[str, str] | None = None,
    think: float = 0.0,
    images: bool = True,
) -> Outcome:
    """One participant from the invitation link to the completion code. `think`: seconds spent
    on each page, the invitation included (drawn uniformly up to twice it), so that many
    participants overlap as people do rather than hammering the server in lockstep."""
    rng = np.random.default_rng(seed)
    client = Client(base_url)

    def pause() -> None:
        if think > 0:
            time.sleep(float(rng.uniform(0, 2 * think)))

    try:
        pause()  # people do not all arrive in the same instant
        query = "?" + urlencode(params) if params else ""
        status, _, headers = client.request("POST", "/enter" + query)
        if status != 303:
            raise VisaeError(f"POST /enter answered {status}")
        token = headers["location"].rsplit("/", 1)[-1]
        out = Outcome(token)
        api = f"/api/s/{token}"
        client.ok("GET", f"/s/{token}")
        client.ok("POST", f"{api}/consent", {"agree": True})
        pause()
        state = client.ok("POST", f"{api}/start", {})
        while state["stage"] == "trials":
            trial = state["trial"]
            if images:
                for url in [*trial.get("references", []), *trial.get("choices", [])]:
                    client.ok("GET", url)
                if "query" in trial:
                    client.ok("GET", trial["query"])
            pause()
            answer = oracle.answer(token, trial["position"], skill, attentive, seed)
            client.ok("POST", f"{api}/trial/{trial['position']}", answer)
            out.acknowledged.append(trial["position"])
            state = client.ok("GET", f"{api}/state")
        state = client.ok("POST", f"{api}/finish", {"comments": ""})
        out.completion_code = state["completion_code"]
        out.latencies = client.latencies
        return out
    finally:
        client.close()


def simulated_study(
    study: Study,
    skills: list[float],
    attentive: list[bool] | None = None,
    workers: int = 16,
    images: bool = True,
) -> list[Outcome]:
    """Serve `study` on a loopback port and let one simulated participant per skill take it,
    `workers` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from visae.study.server import running

    oracle = Oracle(study)
    attentive = attentive or [True] * len(skills)
    with running(study, secrets.token_urlsafe(24)) as url, ThreadPoolExecutor(workers) as pool:
        return list(
            pool.map(
                lambda i: take_study(
                    url, oracle, skills[i], seed=i, attentive=attentive[i], images=images
                ),
                range(len(skills)),
            )
        )
