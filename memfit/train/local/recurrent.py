"""Recurrent blocks under the local rules: time weighting of the per-step losses, and the step loops.

- `local_recurrent_step` (tpSGD, DRTP): every layer gets its local target at every time step, weighted by
  `time_weights`; gradients add up over the T steps and each layer's optimizer steps once per sequence.
  rnn_window 1 (no backprop through time) runs time-major: step t of every layer, then step t+1, so nothing
  but the states is held between steps (streaming). With rnn_window k > 1 (`local_layer_major`) a layer's
  state is detached only every k steps and the local losses of a window flow back through its k steps of that
  one layer (truncated BPTT inside the layer, never into another layer); the layers run one after the other
  over the whole sequence, so only one layer's window graph is alive at a time.
- rnn_credit "leak" (GRU, time weighting `last`) is in `leak.py`: h_T's signal sent back along the leak path.
- `dfa_recurrent_outputs` (DFA): the forward pass keeping every weighted step output for the feedback, which
  exists only once the output error is known.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import LocalTrainingError
from .models import detach_state

if TYPE_CHECKING:  # pragma: no cover
    from .rules import DFA, LocalTargetRule

TIME_WEIGHTINGS = ("square", "linear", "uniform", "last")


def time_weights(kind: str, steps: int) -> list[float]:
    """Weight of each time step's local loss for recurrent blocks, summing to 1.

    square: (t+1)^2, linear: t+1, uniform: 1, last: only the final step. Early steps have seen only the
    first rows of the image and cannot know the class yet, so later steps weigh more by default."""
    if kind not in TIME_WEIGHTINGS:
        raise LocalTrainingError(f"unknown time weighting {kind!r}; choose one of {', '.join(TIME_WEIGHTINGS)}")
    raw = {"square": lambda t: (t + 1) ** 2, "linear": lambda t: t + 1, "uniform": lambda t: 1,
           "last": lambda t: float(t == steps - 1)}[kind]
    w = [float(raw(t)) for t in range(steps)]
    total = sum(w)
    return [v / total for v in w]


def local_recurrent_step(rule: LocalTargetRule, seq: torch.Tensor, y: torch.Tensor,
                         y_onehot: torch.Tensor) -> tuple[float, torch.Tensor]:
    """seq (B, T, F), y (B,), y_onehot (B, K) -> (head loss, logits); time-major when rnn_window is 1."""
    if rule.rnn_window > 1:
        return local_layer_major(rule, seq, y, y_onehot)
    blocks = rule.net.blocks
    batch, steps = seq.shape[:2]
    states = [blk.init_state(batch, seq) for blk in blocks]
    weights = time_weights(rule.time_weighting, steps)
    inp = seq[:, 0]
    for t in range(steps):
        inp = seq[:, t]  # (B, F)
        for i, blk in enumerate(blocks):
            out, state = blk.step(inp.detach(), states[i])  # out (B, H)
            if weights[t] > 0:
                rule.hidden_backward(i, out, y_onehot, weights[t])
            states[i] = detach_state(state)  # no gradient crosses a time step
            inp = out.detach()
    for i in range(len(blocks)):
        rule.step_layer(i)
    return rule.head_step(inp, y)


def local_layer_major(rule: LocalTargetRule, seq: torch.Tensor, y: torch.Tensor,
                      y_onehot: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Backprop through time in windows of rule.rnn_window steps inside each layer, one layer after another."""
    batch, steps = seq.shape[:2]
    weights = time_weights(rule.time_weighting, steps)
    inputs = [seq[:, t] for t in range(steps)]  # T x (B, F)
    for i, blk in enumerate(rule.net.blocks):
        state = blk.init_state(batch, seq)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (root, dL/droot) of the current window
        outs = []
        for t in range(steps):
            out, state = blk.step(inputs[t].detach(), state)  # out (B, H)
            if weights[t] > 0:
                pending.append(rule.hidden_signal(i, out, y_onehot, weights[t]))
            if (t + 1) % rule.rnn_window == 0 or t == steps - 1:
                if pending:
                    rule.local_backward(i, [r for r, _ in pending], [g for _, g in pending])
                    pending = []
                state = detach_state(state)
            outs.append(out.detach())
        rule.step_layer(i)  # the next layer reads outputs computed before this update, as time-major does
        inputs = outs
    return rule.head_step(inputs[-1], y)


def dfa_recurrent_outputs(rule: DFA, seq: torch.Tensor, outs: list[tuple[int, torch.Tensor, float]]) -> torch.Tensor:
    """Run every layer over seq (B, T, F), appending (layer, output (B, H), weight) of each weighted step to
    `outs` (their graphs stay alive for the feedback); returns the last layer's last output (B, H)."""
    batch, steps = seq.shape[:2]
    states = [blk.init_state(batch, seq) for blk in rule.net.blocks]
    weights = time_weights(rule.time_weighting, steps)
    inp = seq[:, 0]
    for t in range(steps):
        inp = seq[:, t]
        for i, blk in enumerate(rule.net.blocks):
            out, state = blk.step(inp.detach(), states[i])
            if weights[t] > 0:
                outs.append((i, out, weights[t]))
            # detach every rnn_window steps, like tpSGD/DRTP (1: no backprop through time)
            end = (t + 1) % rule.rnn_window == 0 or t == steps - 1
            states[i] = detach_state(state) if end else state
            inp = out.detach()
    return inp
