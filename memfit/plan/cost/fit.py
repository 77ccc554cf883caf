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
from memfit.plan.cost.features import NAMES, columns
from memfit.plan.cost.metrics import mape
from memfit.plan.cost.roofline import BASES, base_of, fit_base
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
    # latency loss: "mape", |predicted / measured - 1| (the figure it is judged on), or "smooth_l1" on
    # standardised log latency (the counts always use smooth-L1)
    loss: str = "mape"
    # latency learned as a residual of a roofline fitted to the training labels: "roofline" (roofline.LogBase,
    # the shipped recipe), "pipes" (roofline.PipeBase: no better on the held-out shapes, docs/costmodel.md), or
    # "none" (learned whole)
    base: str = "roofline"
    seeds: int = 3              # an ensemble of this many nets (seeds seed, seed+1, ...), log outputs averaged
    # the nets' global input: "all" (features.DEFAULT_NAMES, with the work and path features; chosen on
    # validation; features.ALL_NAMES, the pipe columns too, with the pipe base) or "names" (features.NAMES, the
    # columns of the models shipped before)
    features: str = "all"

    def __post_init__(self) -> None:
        if self.loss not in ("smooth_l1", "mape") or self.base not in ("none", *BASES) or self.seeds < 1 \
                or self.features not in ("names", "all"):
            raise ValueError(f"bad FitConfig: loss {self.loss!r}, base {self.base!r}, seeds {self.seeds}, "
                             f"features {self.features!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return NAMES if self.features == "names" else columns(self.base)


def fit_seq(train: Examples, val: Examples, cfg: FitConfig, verbose: bool = True) -> Bundle:
    vocab_list = tk.build_vocab(t for t, _ in train.toks)
    base = None
    Zt = to_log(train.Y)
    if cfg.base != "none":
        base = fit_base(cfg.base, train.X, train.Y[:, 0])
        Zt[:, 0] -= base_of(base).log_us(train.X)  # (n,) log(latency / roofline estimate)
    norm = Normaliser.fit(train.X[:, :len(cfg.names)], Zt)  # the nets read the leading columns of X
    nets, vals = [], []
    for i in range(cfg.seeds):
        net, best = _fit_one(train, val, cfg, cfg.seed + i, vocab_list, norm, Zt, base, verbose)
        nets.append(net)
        vals.append(best)
    bundle = Bundle(nets, vocab_list, norm, list(cfg.names), {}, base)
    val_mape = _val_mape(bundle, val)
    bundle.info = {"val_latency_mape": val_mape, "val_latency_mape_each": vals, "train_kernels": len(train),
                   "val_kernels": len(val), "loss": cfg.loss, "base": cfg.base, "seeds": cfg.seeds}
    return bundle


def _val_mape(bundle: Bundle, val: Examples) -> float:
    return mape(from_log(bundle.predict_log(val.toks, val.X))[:, 0], val.Y[:, 0]) if len(val) else 0.0


def _fit_one(train: Examples, val: Examples, cfg: FitConfig, seed: int, vocab_list: list[str], norm: Normaliser,
             Zt: np.ndarray, base: dict | None, verbose: bool) -> tuple[CostNet, float]:
    """One net from `seed`, early-stopped on the validation latency MAPE; returns it and that MAPE."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vocab = {t: i for i, t in enumerate(vocab_list)}
    net = CostNet(SeqConfig(vocab=len(vocab_list), n_global=len(cfg.names), n_out=Zt.shape[1], d=cfg.d,
                            layers=cfg.layers))
    Xn = torch.tensor(norm.x(train.X[:, :len(cfg.names)]), dtype=torch.float32)
    Zn = torch.tensor(norm.z(Zt), dtype=torch.float32)
    z_std = float(norm.z_std[0])  # standardised latency units -> natural log units
    w = torch.tensor([cfg.latency_weight] + [1.0] * (Zt.shape[1] - 1))
    enc = [batch([t], vocab, net.cfg.max_len) for t in train.toks]  # tokenised once
    lengths = np.array([e[0].shape[1] for e in enc])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    one = Bundle([net], vocab_list, norm, list(cfg.names), {}, base)
    best, best_state, since = math.inf, None, 0
    for epoch in range(cfg.epochs):
        net.train()
        total = 0.0
        for idx in _buckets(rng, lengths, cfg.batch_size):
            ids, vals = _stack([enc[i] for i in idx])
            pred = net(ids, vals, Xn[idx])                                         # (B, n_out)
            per = torch.nn.functional.smooth_l1_loss(pred, Zn[idx], reduction="none", beta=0.5)
            if cfg.loss == "mape":  # latency: |exp(log ratio) - 1|, the ratio capped at e^3 against blow-ups
                ratio = torch.exp(((pred[:, 0] - Zn[idx, 0]) * z_std).clamp(max=3.0))
                per = torch.cat([(ratio - 1).abs().unsqueeze(1), per[:, 1:]], dim=1)
            loss = (per * w).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        val_mape = _val_mape(one, val)
        if verbose:
            print(f"seed {seed} epoch {epoch + 1}: loss {total / len(train):.4f}, val latency MAPE {val_mape:.3f}",
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
    return net, best


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
