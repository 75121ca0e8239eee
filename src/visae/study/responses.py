"""Scoring collected responses offline (`visae study score SPEC RESPONSES.csv`): the spec's
pre-specified exclusions first (participants who failed more attention checks than allowed;
trials answered faster than `min_seconds`), reported with their counts; then every main trial's
chance-anchored score, localizability against the feature's true activation map from its
analysis; then per SAE and protocol the mean with its two-level bootstrap interval, and, where
the analysis carries evaluation proxies (locality, MS), their Spearman correlation with the
per-feature human scores.

Responses CSV, one row per trial: participant, kind (main, practice, check), protocol (localize,
name), sae (the analysis's name), latent, image (the localization query), clicks
("x,y;x,y" in [0, 1)), pick and correct (indices into the choices), choices (their number),
seconds, passed (checks: 1 or 0).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visae.errors import VisaeError
from visae.study.scoring import aggregate, anchored, localization_trial, naming_trial
from visae.study.spec import StudySpec
from visae.study.trials import activation_map

COLUMNS = (
    "participant",
    "kind",
    "protocol",
    "sae",
    "latent",
    "image",
    "clicks",
    "pick",
    "correct",
    "choices",
    "seconds",
    "passed",
)
# what the server's export adds: the typed name, the trial's place, its scores as stored, and
# the recruiting platform's ids
EXPORT_COLUMNS = (
    *COLUMNS,
    "name",
    "position",
    "raw",
    "chance",
    "prolific_pid",
    "study_id",
    "session_id",
)
PROXIES = ("locality", "ms", "concept_f1")


def read_responses(path: str | Path) -> list[dict[str, str]]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise VisaeError(f"responses {path} lack the column {missing[0]!r}")
            return list(reader)
    except OSError as e:
        raise VisaeError(f"cannot read responses {path}: {e.strerror}") from None


def parse_clicks(text: str, where: str) -> list[tuple[float, float]]:
    try:
        points = [tuple(float(v) for v in p.split(",")) for p in text.split(";") if p.strip()]
    except ValueError:
        raise VisaeError(f"{where}: clicks {text!r} are not x,y;x,y numbers") from None
    if any(len(p) != 2 for p in points):
        raise VisaeError(f"{where}: clicks {text!r} are not x,y pairs")
    return [(p[0], p[1]) for p in points]


def load_analyses(spec: StudySpec) -> dict[str, Any]:
    from visae.analysis import Analysis

    out = {}
    for folder in spec.analyses:
        a = Analysis.load(folder)
        out[a.name] = a
    return out


@dataclass(frozen=True)
class Exclusion:
    participants: tuple[str, ...]
    fast_trials: int


def exclusions(rows: list[dict[str, str]], spec: StudySpec) -> Exclusion:
    failed: dict[str, int] = {}
    for r in rows:
        if r["kind"] == "check" and r["passed"] not in ("1", "true", "True"):
            failed[r["participant"]] = failed.get(r["participant"], 0) + 1
    out = tuple(sorted(p for p, n in failed.items() if n > spec.exclusions.max_failed_checks))
    fast = sum(
        1
        for r in rows
        if r["kind"] == "main"
        and r["participant"] not in out
        and float(r["seconds"]) < spec.exclusions.min_seconds
    )
    return Exclusion(out, fast)


def score_responses(
    spec: StudySpec,
    rows: list[dict[str, str]],
    boot: int = 2000,
    analyses: dict[str, Any] | None = None,
    encoder: Any = None,
) -> dict[str, Any]:
    """Scores per SAE and protocol, per feature, exclusions and proxy correlations
    (`analyses`: the spec's analyses by name, when already open); with a sentence `encoder`,
    the typed names against the features' concept labels too (`visae.study.names`)."""
    from scipy.stats import spearmanr

    if analyses is None:
        analyses = load_analyses(spec)
    excluded = exclusions(rows, spec)
    trials = []
    names = []
    for line, r in enumerate(rows, start=2):
        if r["kind"] != "main" or r["participant"] in excluded.participants:
            continue
        if float(r["seconds"]) < spec.exclusions.min_seconds:
            continue
        where = f"responses line {line}"
        a = analyses.get(r["sae"])
        if a is None:
            raise VisaeError(f"{where}: sae {r['sae']!r} is not an analysis of this study")
        latent = int(r["latent"])
        if r["protocol"] == "localize":
            activation = activation_map(a, latent, int(r["image"]))
            raw, chance = localization_trial(activation, parse_clicks(r["clicks"], where))
        elif r["protocol"] == "name":
            raw, chance = naming_trial(int(r["pick"]), int(r["correct"]), int(r["choices"]))
            if r.get("name", "").strip():
                names.append((r["sae"], latent, r["participant"], r["name"].strip()))
        else:
            raise VisaeError(f"{where}: protocol {r['protocol']!r} is not localize or name")
        trials.append(
            (r["sae"], r["protocol"], latent, r["participant"], float(anchored(raw, chance)))
        )
    if not trials:
        raise VisaeError("no main trial is left to score after the exclusions")
    result: dict[str, Any] = {"exclusions": asdict(excluded), "scores": [], "features": []}
    if encoder is not None and names:
        from visae.study.names import name_scores

        result["names"] = name_scores(names, analyses, encoder, seed=spec.seed, boot=boot)
    for sae in analyses:
        for protocol in spec.protocols:
            mine = [t for t in trials if t[0] == sae and t[1] == protocol]
            if not mine:
                continue
            scores = np.asarray([t[4] for t in mine])
            interval = aggregate(
                scores, [t[3] for t in mine], [str(t[2]) for t in mine], boot=boot, seed=spec.seed
            )
            per_feature = {}
            for t in mine:
                per_feature.setdefault(t[2], []).append(t[4])
            latents = sorted(per_feature)
            human = np.asarray([np.nanmean(per_feature[j]) for j in latents])
            correlations = {}
            metrics = analyses[sae].metrics  # the evaluation's columns (visae evaluate --analysis)
            for proxy in PROXIES:
                if proxy in metrics and len(latents) >= 3:
                    values = np.asarray(metrics[proxy], float)[latents]
                    keep = np.isfinite(values) & np.isfinite(human)
                    if keep.sum() >= 3:
                        varies = np.ptp(human[keep]) > 0 and np.ptp(values[keep]) > 0
                        rho = spearmanr(human[keep], values[keep]).statistic if varies else None
                        # None: one side is constant (an oracle's scores), rho is undefined
                        correlations[proxy] = {
                            "spearman": None if rho is None else float(rho),
                            "n": int(keep.sum()),
                        }
            result["scores"].append(
                {"sae": sae, "protocol": protocol, "proxy_correlation": correlations}
                | asdict(interval)
            )
            for j, h in zip(latents, human, strict=True):
                result["features"].append(
                    {"sae": sae, "protocol": protocol, "latent": j, "score": float(h)}
                )
    return result
