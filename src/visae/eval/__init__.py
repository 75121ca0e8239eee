"""Interpretability scores of SAE latents, each beside its sanity baselines.

The scores are exact, vectorised functions of image-level codes, each with a slow reference
used by the tests: the Monosemanticity Score (Pach et al.) with its chance level, concept
matching (FBMP and the one-to-one baselines, MATCHScore, DeltaMATCH; Klotz et al.), TAPAScore
on image pairs, LCA depth per Matryoshka group, locality and coarse/fine proxies (Colin et al.),
and bootstrap intervals. `evaluate` reads the codes from a store in one pass per variant
(trained SAE, untrained twin, random codes) and writes scores.json, per-latent tables and a
report card; `compare` sets several evaluations side by side. See docs/evaluation.md.
"""

from visae.eval.bootstrap import bootstrap_ci, difference_ci, separates
from visae.eval.compare import Comparison, compare
from visae.eval.config import EvalConfig
from visae.eval.evaluate import Evaluation, evaluate
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
from visae.eval.report import write_report
from visae.eval.sources import ConceptLabels, PairSet, load_concepts, load_pairs
from visae.eval.tapa import TapaResult, tapa_score

__all__ = [
    "Comparison",
    "ConceptLabels",
    "EvalConfig",
    "Evaluation",
    "MSResult",
    "MatchResult",
    "PairSet",
    "TapaResult",
    "bootstrap_ci",
    "chance_level",
    "compare",
    "delta_match",
    "difference_ci",
    "evaluate",
    "fbmp",
    "fbmp_reference",
    "latent_scores",
    "load_concepts",
    "load_pairs",
    "match_concepts",
    "monosemanticity",
    "monosemanticity_pairs",
    "nn_omp",
    "separates",
    "tapa_score",
    "write_report",
]
