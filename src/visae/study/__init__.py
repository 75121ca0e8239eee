"""Human interpretability studies (issue 13, started): the chance-anchored scoring of
localizability and nameability trials with two-level bootstrap intervals, and simulated
observers that check it. The study spec, trial construction from analyses, the web server and
its database are not built yet."""

from visae.study.scoring import Interval, aggregate, anchored, localization_trial, naming_trial

__all__ = ["Interval", "aggregate", "anchored", "localization_trial", "naming_trial"]
