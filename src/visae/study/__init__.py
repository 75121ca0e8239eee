"""Human interpretability studies (Colin et al.'s localizability and nameability): study specs
(JSON/YAML, checked), feature sampling by frequency strata and trial construction from
analyses (`visae study plan`), the study server with its database (`visae study serve`:
participant flow, tokens, counterbalanced assignment, admin page), the chance-anchored scoring
with two-level bootstrap intervals and the typed names against concept labels (`visae study
score`, its report), and simulated participants that check all of it over HTTP."""

from visae.study.scoring import Interval, aggregate, anchored, localization_trial, naming_trial
from visae.study.spec import StudySpec, load_spec, parse_spec
from visae.study.trials import (
    Feature,
    FeatureTrials,
    Plan,
    build_plan,
    build_trials,
    sample_features,
)

__all__ = [
    "Feature",
    "FeatureTrials",
    "Interval",
    "Plan",
    "StudySpec",
    "aggregate",
    "anchored",
    "build_plan",
    "build_trials",
    "load_spec",
    "localization_trial",
    "naming_trial",
    "parse_spec",
    "sample_features",
]
