"""Typed errors of memfit.plan.cost; each message says what the user should change."""
from __future__ import annotations

from memfit.plan.errors import PlanError

INSTALL_HINT = "pip install 'memfit[cost]'"


class CostModelError(PlanError):
    """Bad input to the cost model: the CLI prints the message and exits 2."""


class IreeMissingError(CostModelError):
    """The IREE compiler or runtime tools are not installed."""

    def __init__(self, tool: str):
        super().__init__(f"{tool} is not installed: the IREE tools come with the cost extra, {INSTALL_HINT}")


class HarnessError(CostModelError):
    """The timing harness failed, not the kernel (taskset could not pin the benchmark): never stored as a
    kernel's label, since a stored failure is not retried (label.py)."""


class CompileError(CostModelError):
    """iree-compile rejected the MLIR; the message is the compiler's."""


class MlirParseError(CostModelError):
    """The MLIR text has no function the cost model can read."""
