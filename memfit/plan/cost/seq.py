"""The learned model: a convolutional sequence encoder over normalised MLIR tokens (each token's numeric
value, such as a tensor dimension, beside its embedding), pooled, joined with the hand-built global
features, and a head that predicts log latency, instructions, vector FMAs and spills at once."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from memfit.plan.cost import tokens as tk


@dataclass
class SeqConfig:
    vocab: int
    n_global: int
    n_out: int = 4
    d: int = 64
    layers: int = 4
    kernel: int = 5
    max_len: int = tk.MAX_LEN
    dropout: float = 0.1


class CostNet(nn.Module):
    def __init__(self, cfg: SeqConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d
        self.emb = nn.Embedding(cfg.vocab, d, padding_idx=0)
        self.num = nn.Linear(1, d)
        self.pos = nn.Embedding(cfg.max_len, d)
        # dilated convolutions: 4 layers of kernel 5 see ~60 tokens, an op with its operand types
        self.convs = nn.ModuleList(nn.Conv1d(d, d, cfg.kernel, padding=(cfg.kernel // 2) * 2 ** i, dilation=2 ** i)
                                   for i in range(cfg.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg.layers))
        self.glob = nn.Sequential(nn.Linear(cfg.n_global, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.GELU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(2 * d, cfg.n_out))

    def forward(self, ids: torch.Tensor, vals: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).unsqueeze(-1).float()                                   # (B, L, 1)
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.emb(ids) + self.num(vals.unsqueeze(-1)) + self.pos(pos)          # (B, L, d)
        for conv, norm in zip(self.convs, self.norms):
            h = h + torch.nn.functional.gelu(conv(norm(h).transpose(1, 2)).transpose(1, 2))
            h = h * mask
        mean = h.sum(1) / mask.sum(1).clamp(min=1)                                # (B, d)
        mx = (h - 1e4 * (1 - mask)).max(1).values                                 # (B, d)
        return self.head(torch.cat([mean, mx, self.glob(g)], dim=-1))             # (B, n_out)


@dataclass
class Normaliser:
    """Train-set statistics: global features and log targets are standardised with them."""

    x_mean: list[float]
    x_std: list[float]
    z_mean: list[float]
    z_std: list[float]

    @classmethod
    def fit(cls, X: np.ndarray, Z: np.ndarray) -> "Normaliser":
        return cls(X.mean(0).tolist(), (X.std(0) + 1e-6).tolist(), Z.mean(0).tolist(), (Z.std(0) + 1e-6).tolist())

    def x(self, X: np.ndarray) -> np.ndarray:
        # a feature constant in training (say, no depthwise conv when convs are held out) has std ~0: scale it
        # by 1, not 1e6; and clip, so an input unlike any training kernel cannot swamp the network
        std = np.array(self.x_std)
        std = np.where(std < 1e-3, 1.0, std)
        return np.clip((X - np.array(self.x_mean)) / std, -10.0, 10.0)

    def z(self, Z: np.ndarray) -> np.ndarray:
        return (Z - np.array(self.z_mean)) / np.array(self.z_std)

    def z_inv(self, Zn: np.ndarray) -> np.ndarray:
        return Zn * np.array(self.z_std) + np.array(self.z_mean)


def batch(tok_lists: list[tuple[list[str], list[float]]], vocab: dict[str, int], max_len: int) \
        -> tuple[torch.Tensor, torch.Tensor]:
    enc = [tk.encode(t, v, vocab, max_len) for t, v in tok_lists]
    L = max(len(i) for i, _ in enc)
    ids = torch.zeros(len(enc), L, dtype=torch.long)
    vals = torch.zeros(len(enc), L)
    for r, (i, v) in enumerate(enc):
        ids[r, :len(i)] = torch.tensor(i)
        vals[r, :len(v)] = torch.tensor(v)
    return ids, vals


@dataclass
class Bundle:
    """A trained model with what it needs to read new MLIR: vocabulary, normaliser, feature names. `nets`
    holds one network or an ensemble (trained from different seeds; their log predictions are averaged);
    `base` (roofline.LogBase's fields, or PipeBase's with kind "pipes": roofline.base_of), when set, is a
    roofline estimate the latency output is a residual of."""

    nets: list[CostNet]
    vocab: list[str]
    norm: Normaliser
    feature_names: list[str]
    info: dict
    base: dict | None = None
    # a blend with roofline-residual trees (gbm.ResidualGBM.to_json, plus "weight": the nets' share of the log
    # latency, and "shift": a constant added to the blended log latency); None: the nets alone
    blend: dict | None = None

    @property
    def net(self) -> CostNet:
        return self.nets[0]

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        meta = {"config": json.dumps(asdict(self.net.cfg)), "vocab": json.dumps(self.vocab),
                "norm": json.dumps(asdict(self.norm)), "features": json.dumps(self.feature_names),
                "info": json.dumps(self.info), "n_nets": str(len(self.nets)), "base": json.dumps(self.base)}
        if self.blend is not None:
            meta["blend"] = json.dumps(self.blend)
        # one net keeps the unprefixed names of the files shipped before ensembles
        prefix = (lambda i: "") if len(self.nets) == 1 else (lambda i: f"m{i}.")
        state = {prefix(i) + k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
                 for i, net in enumerate(self.nets) for k, v in net.state_dict().items()}
        save_file(state, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "Bundle":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata()
            state = {k: f.get_tensor(k).float() for k in f.keys()}
        n = int(meta.get("n_nets", "1"))
        nets = []
        for i in range(n):
            net = CostNet(SeqConfig(**json.loads(meta["config"])))
            pre = "" if n == 1 else f"m{i}."
            net.load_state_dict({k[len(pre):]: v for k, v in state.items() if k.startswith(pre)})
            net.eval()
            nets.append(net)
        return cls(nets, json.loads(meta["vocab"]), Normaliser(**json.loads(meta["norm"])),
                   json.loads(meta["features"]), json.loads(meta["info"]), json.loads(meta.get("base", "null")),
                   json.loads(meta.get("blend", "null")))

    def with_nets_of(self, *others: "Bundle") -> "Bundle":
        """This bundle with the nets of `others` appended (an ensemble of all; log predictions averaged), the
        blend dropped (fit it again: train.fit_blend). The others must read kernels alike: the same vocabulary,
        normaliser, feature columns, network shape and roofline base (nets trained on the same split from other
        seeds, e.g. `benchmarks.costmodel --seed 3 --split-seed 0`: 3 + 3 nets are the recipe's `--seeds 6`)."""
        from memfit.plan.cost.errors import CostModelError

        for o in others:
            for what, mine, theirs in (("vocabulary", self.vocab, o.vocab), ("normaliser", self.norm, o.norm),
                                       ("feature columns", self.feature_names, o.feature_names),
                                       ("network shape", self.net.cfg, o.net.cfg), ("roofline base", self.base, o.base)):
                if mine != theirs:
                    raise CostModelError(f"cannot ensemble these models: their {what} differ (train them on the "
                                         "same data set and split)")
        nets = [*self.nets, *(n for o in others for n in o.nets)]
        return Bundle(nets, list(self.vocab), self.norm, list(self.feature_names),
                      {**self.info, "seeds": len(nets)}, self.base, None)

    @torch.no_grad()
    def predict_log(self, tok_lists: list, X: np.ndarray, chunk: int = 64) -> np.ndarray:
        """Log-scale predictions (dataset.to_log's scale), one row per kernel: the mean over the ensemble."""
        from memfit.plan.cost.roofline import base_of

        vocab = {t: i for i, t in enumerate(self.vocab)}
        X = np.atleast_2d(np.asarray(X, float))
        k = len(self.feature_names)  # the nets' columns lead X (features.ALL_NAMES starts with NAMES)
        out = []
        for s in range(0, len(tok_lists), chunk):
            ids, vals = batch(tok_lists[s:s + chunk], vocab, self.net.cfg.max_len)
            g = torch.tensor(self.norm.x(X[s:s + chunk, :k]), dtype=torch.float32)
            out.append(np.mean([net.eval()(ids, vals, g).numpy() for net in self.nets], axis=0))
        if not out:
            return np.zeros((0, self.net.cfg.n_out))
        # a program unlike any seen in training can push the head far out; beyond 4 standard deviations of
        # the training targets (a factor of ~e^8 in latency) the prediction is clamped rather than overflowing
        Z = self.norm.z_inv(np.clip(np.concatenate(out), -4.0, 4.0))
        if self.base is not None:
            Z[:, 0] += base_of(self.base).log_us(X)
        if self.blend is not None:
            from memfit.plan.cost.gbm import ResidualGBM

            w = float(self.blend["weight"])
            trees = ResidualGBM.from_json(self.blend).predict_log(X) if w < 1.0 else 0.0
            Z[:, 0] = w * Z[:, 0] + (1 - w) * trees + float(self.blend.get("shift", 0.0))
        return Z
