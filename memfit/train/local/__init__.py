"""Backprop-free training with local targets (tpSGD), with bp / DRTP / DFA baselines in one harness."""
from __future__ import annotations

from .errors import DatasetMissingError, LocalTrainingError

__all__ = ["DatasetMissingError", "LocalTrainingError"]
