"""Analysis pass: per-latent statistics, top images with patch maps, and the per-patch codes
of a bounded set of images, written as an artifact that the browser, the evaluation suite and
the human-study server read through `Analysis.load`."""

from visae.analysis.accumulate import HistogramSpec, LatentStats, TopN
from visae.analysis.artifact import SCHEMA_VERSION, Analysis, TopEntry
from visae.analysis.run import AnalysisConfig, run_analysis, stream_pass

__all__ = [
    "SCHEMA_VERSION",
    "Analysis",
    "AnalysisConfig",
    "HistogramSpec",
    "LatentStats",
    "TopEntry",
    "TopN",
    "run_analysis",
    "stream_pass",
]
