"""Evaluation: the baselines, accuracy tables with confidence intervals, paired comparisons, plots.

Library entry points: `load_split`, `load_neighbours`, `evaluate` (everything `geotoken evaluate` writes),
the baselines in `geotoken.evaluate.baselines` and the statistics in `geotoken.evaluate.metrics`.
"""

from geotoken.evaluate.baselines import Predictions, Split
from geotoken.evaluate.evaluate import (
    BASELINES,
    METHODS,
    EvalConfig,
    EvalResult,
    GeoTokenMethodConfig,
    evaluate,
    load_neighbours,
    load_split,
)
from geotoken.evaluate.metrics import (
    Estimate,
    MethodMetrics,
    PairedComparison,
    bootstrap_metrics,
    paired_comparison,
)

__all__ = [
    "BASELINES",
    "METHODS",
    "Estimate",
    "EvalConfig",
    "EvalResult",
    "GeoTokenMethodConfig",
    "MethodMetrics",
    "PairedComparison",
    "Predictions",
    "Split",
    "bootstrap_metrics",
    "evaluate",
    "load_neighbours",
    "load_split",
    "paired_comparison",
]
