"""MLIR text -> normalised tokens for the sequence model.

SSA names become %0, %1, ... in order of first use (so `%arg0`/`%mm4` and a user's `%lhs` read alike);
numeric literals become <num> and tensor dimensions <dim>, each carrying its value in a numeric channel
(log-scaled) beside the token id: the model sees shapes as numbers, not as a vocabulary of sizes."""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from memfit.plan.cost.parse import Function

MAX_LEN = 512
# Separators that carry no information once the op structure is tokenised; dropping them halves the length.
DROP = {",", ":", "(", ")"}
PAD, UNK = "<pad>", "<unk>"
_TOKEN = re.compile(r"""
    (?P<tensor>tensor<(?P<dims>[^>]*)>)
  | (?P<ssa>%[A-Za-z_0-9$.#]+)
  | (?P<sym>@[A-Za-z_0-9$.]+)
  | (?P<num>-?\d+\.\d*(?:[eE][-+]?\d+)?|-?\d+(?:[eE][-+]?\d+)?|0x[0-9A-Fa-f]+)
  | (?P<word>[A-Za-z_][A-Za-z_0-9.]*)
  | (?P<str>"[^"]*")
  | (?P<arrow>->)
  | (?P<punct>[^\sA-Za-z_0-9])
""", re.VERBOSE)


def _dim_value(d: int) -> float:
    return math.log2(d + 1) / 12.0


def _num_value(x: float) -> float:
    return math.copysign(math.log1p(abs(x)), x) / 10.0


def tokenize(fn: Function) -> tuple[list[str], list[float]]:
    """Tokens of `fn` (signature and body) and each token's numeric value (0 for plain tokens)."""
    args = ", ".join(f"%a{i}: tensor<{'x'.join([*map(str, a.shape), a.dtype])}>" for i, a in enumerate(fn.args))
    res = ", ".join(f"tensor<{'x'.join([*map(str, r.shape), r.dtype])}>" for r in fn.results)
    text = f"func.func ({args}) -> ({res}) {{ {fn.body} }}"
    names: dict[str, int] = {}
    toks: list[str] = []
    vals: list[float] = []
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup if m.lastgroup != "dims" else "tensor"
        if m.group("tensor"):
            toks.append("tensor<")
            vals.append(0.0)
            parts = m.group("dims").split("x")
            for p in parts[:-1]:
                toks.append("<dim>")
                vals.append(_dim_value(int(p)) if p.strip().isdigit() else 0.0)
            toks += [parts[-1].strip(), ">"]
            vals += [0.0, 0.0]
        elif kind == "ssa":
            idx = names.setdefault(m.group("ssa"), len(names))
            toks.append(f"%{min(idx, 63)}")
            vals.append(0.0)
        elif kind == "sym":
            toks.append("@sym")
            vals.append(0.0)
        elif kind == "num":
            text_num = m.group("num")
            try:
                x = float(int(text_num, 16)) if text_num.startswith("0x") else float(text_num)
            except ValueError:
                x = 0.0
            toks.append("<num>")
            vals.append(_num_value(x))
        elif m.group(0) not in DROP:
            toks.append(m.group(0))
            vals.append(0.0)
    return toks, vals


def build_vocab(token_lists: Iterable[list[str]], min_count: int = 2) -> list[str]:
    counts = Counter(t for toks in token_lists for t in toks)
    return [PAD, UNK, *sorted(t for t, c in counts.items() if c >= min_count and t not in (PAD, UNK))]


def encode(toks: list[str], vals: list[float], vocab: dict[str, int], max_len: int = MAX_LEN) \
        -> tuple[list[int], list[float]]:
    """Token ids and values, cut to max_len: the head (signature, first ops) and the tail (last ops and the
    return) both matter, so a long program keeps both ends."""
    ids = [vocab.get(t, 1) for t in toks]
    if len(ids) > max_len:
        h = max_len // 2
        ids, vals = ids[:h] + ids[-(max_len - h):], vals[:h] + vals[-(max_len - h):]
    return ids, list(vals)
