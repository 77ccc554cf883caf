"""Training loop of the sequence model (CPU is enough: a few hundred thousand parameters, a few thousand
kernels). Early stopping keeps the epoch with the lowest validation latency MAPE."""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

from memfit.plan.cost import tokens as tk
from memfit.plan.cost.dataset import Examples, from_log, to_log
from memfit.plan.cost.features import NAMES
from memfit.plan.cost.metrics import mape
from memfit.plan.cost.seq import Bundle, CostNet, Normaliser, SeqConfig, batch


@dataclass
class FitConfig:
    epochs: int = 40
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 12
    seed: int = 0
    d: int = 48
    layers: int = 3
    latency_weight: float = 3.0  # latency is the figure `predict` is judged on; the counts help as side tasks


def fit_seq(train: Examples, val: Examples, cfg: FitConfig, verbose: bool = True) -> Bundle:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    vocab_list = tk.build_vocab(t for t, _ in train.toks)
    vocab = {t: i for i, t in enumerate(vocab_list)}
    Zt = to_log(train.Y)
    norm = Normaliser.fit(train.X, Zt)
    net = CostNet(SeqConfig(vocab=len(vocab_list), n_global=train.X.shape[1], n_out=Zt.shape[1], d=cfg.d,
                            layers=cfg.layers))
    Xn = torch.tensor(norm.x(train.X), dtype=torch.float32)
    Zn = torch.tensor(norm.z(Zt), dtype=torch.float32)
    w = torch.tensor([cfg.latency_weight] + [1.0] * (Zt.shape[1] - 1))
    enc = [batch([t], vocab, net.cfg.max_len) for t in train.toks]  # tokenised once
    lengths = np.array([e[0].shape[1] for e in enc])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    bundle = Bundle(net, vocab_list, norm, list(NAMES), {})
    best, best_state, since = math.inf, None, 0
    for epoch in range(cfg.epochs):
        net.train()
        total = 0.0
        for idx in _buckets(rng, lengths, cfg.batch_size):
            ids, vals = _stack([enc[i] for i in idx])
            pred = net(ids, vals, Xn[idx])
            loss = (torch.nn.functional.smooth_l1_loss(pred, Zn[idx], reduction="none", beta=0.5) * w).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        val_mape = mape(from_log(bundle.predict_log(val.toks, val.X))[:, 0], val.Y[:, 0]) if len(val) else 0.0
        if verbose:
            print(f"epoch {epoch + 1}: loss {total / len(train):.4f}, val latency MAPE {val_mape:.3f}",
                  file=sys.stderr, flush=True)
        if val_mape < best:
            best, best_state, since = val_mape, copy.deepcopy(net.state_dict()), 0
        else:
            since += 1
            if since >= cfg.patience:
                break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    bundle.info = {"val_latency_mape": best, "train_kernels": len(train), "val_kernels": len(val)}
    return bundle


def _buckets(rng: np.random.Generator, lengths: np.ndarray, size: int) -> list[np.ndarray]:
    """Shuffled batches of similar length (sorted within windows of 16 batches): little padding, so an epoch
    costs about the tokens it has rather than batches x the longest program."""
    order = rng.permutation(len(lengths))
    window = 16 * size
    batches = []
    for s in range(0, len(order), window):
        chunk = order[s:s + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _stack(encoded: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(e[0].shape[1] for e in encoded)
    ids = torch.zeros(len(encoded), L, dtype=torch.long)
    vals = torch.zeros(len(encoded), L)
    for r, (i, v) in enumerate(encoded):
        ids[r, :i.shape[1]] = i[0]
        vals[r, :v.shape[1]] = v[0]
    return ids, vals
