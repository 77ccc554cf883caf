"""Typed errors for `memfit quant`: each message says what the user should change."""
from __future__ import annotations


class QuantError(ValueError):
    """Bad input to a quantization command (sizes, flags, files)."""


class UnknownArchitectureError(QuantError):
    """The checkpoint or --arch names an architecture memfit.quant does not support."""


class InfeasibleBudgetError(QuantError):
    """No assignment of bits meets the requested average; the message names the smallest feasible one."""
