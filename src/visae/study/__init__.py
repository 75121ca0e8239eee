"""Human interpretability studies (issue 13, started): study specs (JSON/YAML, checked), feature
sampling by frequency strata and trial construction from analyses (`visae study plan`), the
chance-anchored scoring of localizability and nameability trials with two-level bootstrap
intervals, offline scoring of a responses CSV with the spec's exclusions (`visae study score`),
and simulated observers that check it. The web server and its database are not built yet."""

from visae.study.scoring import Interval, aggregate, anchored, localization_trial, naming_trial
from visae.study.spec import StudySpec, load_spec, parse_spec
from visae.study.trials import Feature, FeatureTrials, build_trials, sample_features

__all__ = [
    "Feature",
    "FeatureTrials",
    "Interval",
    "StudySpec",
    "aggregate",
    "anchored",
    "build_trials",
    "load_spec",
    "localization_trial",
    "naming_trial",
    "parse_spec",
    "sample_features",
]
