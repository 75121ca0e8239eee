"""Interpretability scores of SAE latents as exact, vectorised functions of image-level codes,
each with a slow reference used by the tests: the Monosemanticity Score (Pach et al.) with its
chance level, concept matching (FBMP and the one-to-one baselines, MATCHScore; Klotz et al.),
TAPAScore on image pairs, and bootstrap intervals. Reading codes from a store, the baselines
run beside every score and the `visae evaluate` command are not built yet (issue 10)."""

from visae.eval.bootstrap import bootstrap_ci, difference_ci, separates
from visae.eval.matching import (
    MatchResult,
    delta_match,
    fbmp,
    fbmp_reference,
    latent_scores,
    match_concepts,
    nn_omp,
)
from visae.eval.monosemanticity import (
    MSResult,
    chance_level,
    monosemanticity,
    monosemanticity_pairs,
)
from visae.eval.tapa import TapaResult, tapa_score

__all__ = [
    "MSResult",
    "MatchResult",
    "TapaResult",
    "bootstrap_ci",
    "chance_level",
    "delta_match",
    "difference_ci",
    "fbmp",
    "fbmp_reference",
    "latent_scores",
    "match_concepts",
    "monosemanticity",
    "monosemanticity_pairs",
    "nn_omp",
    "separates",
    "tapa_score",
]
