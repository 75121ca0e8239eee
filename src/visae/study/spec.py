"""A study's specification (JSON or YAML): which analyses, how many features per SAE and how
they are sampled, what each trial shows, and the exclusion rules fixed before any response
comes in. Every field is checked on load, with a one-line error naming it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from visae.errors import VisaeError, first_line

PROTOCOLS = ("localize", "name")


@dataclass(frozen=True)
class Exclusions:
    """Pre-specified: participants who fail more attention checks than allowed, and trials
    answered faster than a person can, are excluded before scoring (and reported)."""

    max_failed_checks: int = 0
    min_seconds: float = 1.0


@dataclass(frozen=True)
class StudySpec:
    name: str
    analyses: tuple[str, ...]
    features_per_sae: int = 20
    references: int = 6
    choices: int = 4  # images per naming pick: one where the feature fires, the rest where not
    protocols: tuple[str, ...] = PROTOCOLS
    trials_per_participant: int = 20
    practice: int = 2
    attention_checks: int = 2
    strata: int = 4  # frequency strata the features are drawn from, equally
    max_frequency: float = 0.5  # near-dense latents (firing on more images) are excluded
    seed: int = 0
    max_clicks: int = 3  # localization: a response is 1 to max_clicks clicks
    completion_code: str = ""  # the recruiting platform's code; empty: one per participant
    completion_url: str = ""  # where the debrief sends participants (the code appended)
    exclusions: Exclusions = field(default_factory=Exclusions)

    def __post_init__(self) -> None:
        if not self.name or not str(self.name).strip():
            raise VisaeError("study spec: name must be a non-empty string")
        if not self.analyses:
            raise VisaeError("study spec: analyses must list at least one analysis folder")
        for key in (
            "features_per_sae",
            "references",
            "trials_per_participant",
            "strata",
            "max_clicks",
        ):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise VisaeError(f"study spec: {key} must be a positive integer")
        for key in ("practice", "attention_checks"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise VisaeError(f"study spec: {key} must be a non-negative integer")
        if not isinstance(self.choices, int) or self.choices < 2:
            raise VisaeError("study spec: choices must be an integer >= 2")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise VisaeError(f"study spec: protocols must be among {', '.join(PROTOCOLS)}")
        if not 0 < self.max_frequency <= 1:
            raise VisaeError("study spec: max_frequency must be in (0, 1]")
        for key in ("completion_code", "completion_url"):
            if not isinstance(getattr(self, key), str):
                raise VisaeError(f"study spec: {key} must be a string")
        if self.completion_url and not self.completion_url.startswith(("https://", "http://")):
            raise VisaeError("study spec: completion_url must be an http(s) URL")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"analyses": list(self.analyses), "protocols": list(self.protocols)}


def parse_spec(data: Any, base: Path | None = None) -> StudySpec:
    """A spec from its parsed JSON/YAML; relative analysis paths are read from `base`."""
    if not isinstance(data, dict):
        raise VisaeError("study spec: expected a mapping of fields")
    known = {f.name for f in fields(StudySpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VisaeError(f"study spec: unknown field {unknown[0]!r}")
    for key in ("name", "analyses"):
        if key not in data:
            raise VisaeError(f"study spec: missing field {key!r}")
    values = dict(data)
    analyses = values["analyses"]
    if isinstance(analyses, str) or not isinstance(analyses, list):
        raise VisaeError("study spec: analyses must be a list of folders")
    values["analyses"] = tuple(
        str((base / a) if base is not None and not Path(a).is_absolute() else Path(a))
        for a in analyses
    )
    if "protocols" in values:
        values["protocols"] = tuple(values["protocols"])
    if "exclusions" in values:
        ex = values["exclusions"]
        if not isinstance(ex, dict) or set(ex) - {f.name for f in fields(Exclusions)}:
            raise VisaeError("study spec: exclusions takes max_failed_checks and min_seconds")
        values["exclusions"] = Exclusions(**ex)
    try:
        return StudySpec(**values)
    except TypeError as e:
        raise VisaeError(f"study spec: {e}") from None


def load_spec(path: str | Path) -> StudySpec:
    """Read a `.json`, `.yaml` or `.yml` spec file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise VisaeError(f"cannot read study spec {path}: {e.strerror}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise VisaeError(f"study spec {path} is not valid YAML: {first_line(e)}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise VisaeError(f"study spec {path} is not valid JSON: {e}") from None
    return parse_spec(data, path.parent)
