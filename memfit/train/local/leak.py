"""Leak-path credit for GRU layers, computed without keeping the sequence's graph (`rnn_credit="leak"`).

A GRU step is h_t = (1 - z_t) * n_t + z_t * h_{t-1}. Exact backprop through time follows every path from
h_{t-1} to h_t (the gates and the candidate n_t read h_{t-1} too). Leak credit keeps only the explicit leak
z_t * h_{t-1}, so the Jacobian dh_t/dh_{t-1} becomes diagonal, diag(z_t): the leak term of the eligibility
traces of e-prop (Bellec et al., 2020) and RFLO (Murray, 2019). No gradient crosses a layer.

With the local loss at the last step only (time weighting `last`), the credit reaching step t is
g_t = l * prod_{s=t+1..T} z_s (elementwise, (B, H)), l = dL/dh_T. It needs the product of the z's, not the
sequence: pass 1 runs the sequence without a graph and keeps, per layer, h_T and log Z_T = sum_t log z_t;
pass 2 recomputes the sequence one step at a time (one step's graph alive, as at window 1) and backwards step
t's output with g_t = l * exp(log Z_T - log Z_t). Memory: window 1's plus three (B, H) buffers per layer
(log Z_T, the running log Z_t, l).
Compute: a second forward pass and the update gate once more per step. Other time weightings would need every
step's z and dL/dh kept (T x B x H each), so leak credit takes `last` only.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .models import RecurrentBlock

# h_T of every layer -> dL/dh_T of every layer ((B, H) each): the rule's signals at the last step
Signals = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def update_gate(cell: nn.GRUCell, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """z = sigmoid(W_iz x + b_iz + W_hz h + b_hz), (B, H): rows H:2H of torch's r|z|n layout."""
    n = cell.hidden_size
    return torch.sigmoid(F.linear(x, cell.weight_ih[n:2 * n], cell.bias_ih[n:2 * n])
                         + F.linear(h, cell.weight_hh[n:2 * n], cell.bias_hh[n:2 * n]))


def _log_z(blk: RecurrentBlock, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # clamp: a gate at exactly 0 cuts the path (exp(-69) ~ 0) without log(0) = -inf
        return update_gate(blk.cell, x, h).clamp_min(1e-30).log()


def leak_forward(blocks: list[RecurrentBlock], seq: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pass 1, no graph: seq (B, T, F) -> (h_T of each layer (B, H), log Z_T of each layer (B, H))."""
    batch, steps = seq.shape[:2]
    states = [blk.init_state(batch, seq) for blk in blocks]
    log_z = [torch.zeros_like(s) for s in states]
    with torch.no_grad():
        for t in range(steps):
            inp = seq[:, t]  # (B, F)
            for i, blk in enumerate(blocks):
                log_z[i] += _log_z(blk, inp, states[i])
                inp, states[i] = blk.step(inp, states[i])
    return states, log_z


def leak_backward(blocks: list[RecurrentBlock], seq: torch.Tensor, log_z_end: list[torch.Tensor],
                  signals: list[torch.Tensor], backward: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
    """Pass 2: recompute step by step; `backward(i, h_t, g_t)` trains layer i from step t's output."""
    batch, steps = seq.shape[:2]
    states = [blk.init_state(batch, seq) for blk in blocks]
    log_z = [torch.zeros_like(s) for s in states]
    for t in range(steps):
        inp = seq[:, t]
        for i, blk in enumerate(blocks):
            log_z[i] += _log_z(blk, inp, states[i])
            out, _ = blk.step(inp.detach(), states[i])  # states are detached: one step's graph
            backward(i, out, signals[i] * torch.exp(log_z_end[i] - log_z[i]))  # g_t = l * prod_{s>t} z_s
            states[i] = inp = out.detach()


def leak_credit_step(blocks: list[RecurrentBlock], seq: torch.Tensor, signals: Signals,
                     backward: Callable[[int, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
    """Both passes; returns the last layer's h_T (B, H) for the head. The signals are computed between them
    (DFA's needs the head's output error, so the head runs inside `signals` there)."""
    last, log_z_end = leak_forward(blocks, seq)
    leak_backward(blocks, seq, log_z_end, signals(last), backward)
    return last[-1]
