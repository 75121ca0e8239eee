"""From analyses to trials: which features a study shows (sampled with a seed, equally from
frequency strata, dead and near-dense latents excluded) and what each trial holds.

A feature's references are its top images by activation (with their heatmaps); its
localization query is its next top image, held out from the references; its naming choices are
its next image after that (where it fires) among `choices - 1` images of the analysis's coded
sample where it does not fire, in a seeded random order. "Does not fire" is read from the
per-patch codes (the latent is among no patch's `patch_codes_k` strongest) and the image is not
among its top images: a latent weaker than that everywhere on an image may still be slightly
active there.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from visae.errors import VisaeError
from visae.study.spec import StudySpec


@dataclass(frozen=True)
class Feature:
    sae: str  # the analysis's name
    analysis: str  # its folder
    latent: int
    frequency: float
    stratum: int

    @property
    def key(self) -> str:
        return f"{self.sae}#{self.latent}"


def sample_features(
    analysis: Any,
    n: int,
    strata: int,
    max_frequency: float,
    seed: int,
    min_images: int = 1,
    exclude: frozenset[int] = frozenset(),
) -> list[Feature]:
    """`n` live latents of `analysis` that fire on at least `min_images` images and on at most
    `max_frequency` of them, drawn equally (as far as each holds enough) from `strata` quantile
    bins of log frequency; latents in `exclude` are never drawn."""
    freq = np.asarray(analysis.table["freq_image"], float)
    dead = np.asarray(analysis.dead, bool)
    enough = freq * analysis.n_images >= min_images - 1e-9
    ok = np.flatnonzero(~dead & (freq > 0) & enough & (freq <= max_frequency))
    ok = ok[~np.isin(ok, sorted(exclude))]
    if len(ok) < n:
        raise VisaeError(
            f"analysis {analysis.path} has {len(ok)} live latents firing on {min_images} to "
            f"{max_frequency:.0%} of its images, fewer than the {n} features asked for"
        )
    rng = np.random.default_rng(seed)
    edges = np.quantile(np.log(freq[ok]), np.linspace(0, 1, strata + 1))
    bins = np.clip(np.searchsorted(edges, np.log(freq[ok]), side="right") - 1, 0, strata - 1)
    pools = [list(rng.permutation(ok[bins == b])) for b in range(strata)]
    chosen: list[tuple[int, int]] = []
    while len(chosen) < n:
        for b, pool in enumerate(pools):
            if pool and len(chosen) < n:
                chosen.append((int(pool.pop()), b))
    return [
        Feature(analysis.name, str(analysis.path), j, float(freq[j]), b) for j, b in sorted(chosen)
    ]


def activation_map(analysis: Any, latent: int, image: int) -> np.ndarray:
    """The latent's `[h, w]` activation on an image, exact: from the latent's own top-image maps
    when the image is one of them (every reference, query and naming target is), else from the
    per-patch codes, which keep only each patch's strongest latents and so miss a latent that
    is weaker than those everywhere on the image."""
    for entry in analysis.top(latent):
        if entry.image == image:
            return np.asarray(entry.map, np.float32)
    return analysis.latent_map(image, latent)


@dataclass(frozen=True)
class FeatureTrials:
    """What a participant is shown for one feature (image indices of the analysis)."""

    feature: Feature
    references: tuple[int, ...]
    query: int  # localization: the held-out image where the feature fires
    choices: tuple[int, ...]  # naming: one image where it fires, the others where it does not
    correct: int  # index into `choices`


def feature_trials(analysis: Any, feature: Feature, spec: StudySpec, seed: int) -> FeatureTrials:
    top = [e.image for e in analysis.top(feature.latent) if e.value > 0]
    need = spec.references + 2
    if len(top) < need:
        raise VisaeError(
            f"latent {feature.latent} of {analysis.path} fires on {len(top)} top images; the "
            f"study needs {need} ({spec.references} references, a query and a naming target)"
        )
    references, query, target = tuple(top[: spec.references]), top[spec.references], top[need - 1]
    silent = [
        int(i)
        for i in analysis.code_images
        if not analysis.latent_map(int(i), feature.latent).any()
    ]
    silent = [i for i in silent if i not in top]
    if len(silent) < spec.choices - 1:
        raise VisaeError(
            f"latent {feature.latent} of {analysis.path}: {len(silent)} coded images where it "
            f"does not fire, fewer than the {spec.choices - 1} naming distractors asked for"
        )
    rng = np.random.default_rng(seed)
    distractors = [int(x) for x in rng.choice(silent, spec.choices - 1, replace=False)]
    choices = [target, *distractors]
    order = rng.permutation(len(choices))
    shuffled = tuple(choices[k] for k in order)
    return FeatureTrials(feature, references, query, shuffled, int(np.flatnonzero(order == 0)[0]))


def build_trials(spec: StudySpec) -> list[FeatureTrials]:
    """Every sampled feature of every analysis in the spec, with its trials."""
    return build_plan(spec).features


@dataclass(frozen=True)
class Plan:
    """What a study shows: its main features' trials and the practice trials' features (drawn
    from the first analysis, never among the main ones), with a fingerprint that ties a
    database of responses to exactly this plan."""

    spec: StudySpec
    features: list[FeatureTrials]
    practice: list[FeatureTrials]
    analyses: dict[str, Any]  # name -> Analysis

    @property
    def fingerprint(self) -> str:
        """sha256 of the spec (minus where the analyses lie) and every trial's images."""
        spec = self.spec.to_dict() | {"analyses": sorted(self.analyses)}
        trials = [_trial_key(t) for t in self.features + self.practice]
        text = json.dumps({"spec": spec, "trials": trials}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def units(self) -> list[tuple[int, str]]:
        """(feature index, protocol) pairs: each is one main trial for some participant."""
        return [(i, p) for i in range(len(self.features)) for p in self.spec.protocols]


def _trial_key(t: FeatureTrials) -> list[Any]:
    return [t.feature.sae, t.feature.latent, list(t.references), t.query, list(t.choices)]


def build_plan(spec: StudySpec) -> Plan:
    """Load the spec's analyses, sample their features and build every trial."""
    from visae.analysis import Analysis

    out = []
    names = set()
    analyses = {}
    for k, folder in enumerate(spec.analyses):
        analysis = Analysis.load(folder)
        need = spec.references + 2
        if need > analysis.top_n:
            raise VisaeError(
                f"analysis {folder} keeps {analysis.top_n} top images per latent; the study "
                f"needs {need} ({spec.references} references, a query and a naming target)"
            )
        if analysis.name in names:
            raise VisaeError(f"study spec: two analyses are named {analysis.name!r}")
        names.add(analysis.name)
        features = sample_features(
            analysis, spec.features_per_sae, spec.strata, spec.max_frequency, spec.seed + k, need
        )
        for f in features:
            out.append(feature_trials(analysis, f, spec, spec.seed * 1_000_003 + f.latent))
        analyses[analysis.name] = analysis
    units = len(out) * len(spec.protocols)
    if spec.trials_per_participant > units:
        raise VisaeError(
            f"study spec: trials_per_participant ({spec.trials_per_participant}) exceeds the "
            f"study's {units} feature x protocol trials"
        )
    first = analyses[next(iter(analyses))]
    practice = []
    if spec.practice:
        main = frozenset(t.feature.latent for t in out if t.feature.sae == first.name)
        need = spec.references + 2
        drawn = sample_features(
            first, spec.practice, 1, spec.max_frequency, spec.seed + 7919, need, exclude=main
        )
        practice = [feature_trials(first, f, spec, spec.seed + f.latent) for f in drawn]
    return Plan(spec, out, practice, analyses)
