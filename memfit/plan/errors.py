"""Typed errors of memfit.plan. Each message says what the user should change."""
from __future__ import annotations


class PlanError(ValueError):
    """Base class: bad input to the planner (the CLI prints the message and exits non-zero)."""


class SizeParseError(PlanError):
    """A byte size such as '1.5MiB' could not be parsed."""


class UnknownModelError(PlanError):
    """A model name is neither a torchvision, timm nor memfit built-in architecture."""


class UnsupportedGraphError(PlanError):
    """The network uses an operator or construct that memfit.plan cannot size."""


class InfeasibleScratchpadError(PlanError):
    """The scratchpad is smaller than some operator's working set (its inputs plus outputs)."""

    def __init__(self, op: str, needed_bytes: int, scratchpad_bytes: int):
        self.op, self.needed_bytes, self.scratchpad_bytes = op, needed_bytes, scratchpad_bytes
        super().__init__(
            f"scratchpad of {scratchpad_bytes} bytes is too small: operator '{op}' needs {needed_bytes} bytes "
            f"resident at once (its inputs and outputs); use --scratchpad {needed_bytes} or more "
            f"(or 'min-feasible')"
        )


class PlanValidationError(PlanError):
    """A plan file breaks the memfit.plan/v1 rules; `problems` lists every rule broken (first ones)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n  - ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"invalid plan ({len(problems)} problem(s)):\n  - {shown}{more}")


class BoundViolationError(PlanError):
    """A lower bound claims more traffic than a validated plan moves: a bug in the bound or the plan's model."""

    def __init__(self, planner: str, bound_bytes: int, plan_bytes: int):
        self.bound_bytes, self.plan_bytes = bound_bytes, plan_bytes
        super().__init__(
            f"lower bound of {bound_bytes} non-compulsory bytes exceeds the {plan_bytes} bytes of a valid "
            f"{planner or 'plan'}: the bound is wrong for this graph; please report it with the plan file "
            f"(run with --planner baseline-topo to get a plan meanwhile)"
        )
