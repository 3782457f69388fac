"""Metrics: rank 0's sinks (logger.py), the rule combining per-microbatch shares (combine.py) and the gate a
nightly run is checked with (check.py: `python -m automodel_mimo.metrics.check FILE "loss@last < 0.3"`)."""

from automodel_mimo.metrics.combine import combine_metrics
from automodel_mimo.metrics.logger import MetricsLogger

__all__ = ["MetricsLogger", "combine_metrics"]
