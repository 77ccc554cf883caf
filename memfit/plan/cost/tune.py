"""The cost model in the loop: rank candidate compilation choices of a kernel by predicted latency instead of
measuring them all. The choices are the vector tile sizes of the kernel's matmul, set through IREE's
lowering config (families.TILES), beside IREE's own default. The tile ranker (memfit.plan.cost.ranker)
orders them when it is shipped; the sequence model otherwise."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.families import TILES
from memfit.plan.cost.kernels import compilation_info

_MATMUL = re.compile(r"linalg\.matmul\s+ins\(")


def candidates(mlir: str) -> dict[str, str]:
    """name -> program: 'default' (IREE chooses) and one per candidate tile, set on the first linalg.matmul."""
    if not _MATMUL.search(mlir):
        raise CostModelError("tune needs a linalg.matmul without attributes (its tile sizes are the choices)")
    out = {"default": mlir}
    for t in TILES:
        out["tile_%dx%dx%d" % tuple(t)] = _MATMUL.sub(f"linalg.matmul {compilation_info(t)} ins(", mlir, count=1)
    return out


@dataclass
class Outcome:
    """One kernel's ranking: the model's pick against IREE's default and the exhaustive best (measured)."""

    pick: str
    pick_us: float
    default_us: float
    best: str
    best_us: float
    worst_us: float
    candidates: int = 0  # candidates that compiled (and were measured)

    @property
    def speedup_over_default(self) -> float:
        return self.default_us / self.pick_us

    @property
    def gap_to_best(self) -> float:
        return self.pick_us / self.best_us - 1.0

    @property
    def spread(self) -> float:
        return self.worst_us / self.best_us

    def as_dict(self) -> dict:
        return {**self.__dict__, "speedup_over_default": self.speedup_over_default,
                "gap_to_best": self.gap_to_best, "spread": self.spread}


def outcome(predicted: dict[str, float], measured: dict[str, float], with_default: bool = False) -> Outcome:
    """The model picks the candidate tile with the lowest predicted latency (the default is the reference).
    `with_default` (the tile-or-default switch): IREE's default is a candidate too, for the pick and for the
    exhaustive best."""
    tiles = [k for k in predicted if k != "default"]
    choice = tiles + ["default"] if with_default else tiles
    pick = min(choice, key=lambda k: predicted[k])
    best = min(choice, key=lambda k: measured[k])
    return Outcome(pick, measured[pick], measured["default"], best, measured[best], max(measured[k] for k in tiles),
                   len(tiles))


def summarise(outcomes: list[Outcome], within: float = 0.05) -> dict:
    if not outcomes:
        return {"kernels": 0}
    gaps = np.array([o.gap_to_best for o in outcomes])
    sp = np.array([o.speedup_over_default for o in outcomes])
    return {"kernels": len(outcomes), "candidates": len(TILES),
            "compiled_candidates_min": min(o.candidates for o in outcomes),
            "within_5pct_of_best": float(np.mean(gaps <= within)),
            "median_gap_to_best": float(np.median(gaps)),
            "geomean_speedup_over_default": float(np.exp(np.mean(np.log(sp)))),
            "geomean_best_over_default": float(np.exp(np.mean([np.log(o.default_us / o.best_us) for o in outcomes]))),
            "median_spread": float(np.median([o.spread for o in outcomes]))}


def rank_candidates(cands: dict[str, str], function: str | None = None, model: str | None = None,
                    ranker: str | None = None, use_ranker: bool = True) -> tuple[dict[str, float], dict[str, float], str]:
    """Order the candidates: (sort key per candidate, lower = faster; predicted latency per candidate; what
    ranked them). The tile ranker orders the tiles when its asset exists (the sequence model still gives
    the level, so predicted_us = the model's geometric mean over the tiles x the ranker's relative factor);
    without it, the sequence model's predicted latency alone. IREE's default has a sort key only when the
    ranker carries the tile-or-default switch."""
    from pathlib import Path

    from memfit.plan.cost import tiles
    from memfit.plan.cost.parse import pick_function
    from memfit.plan.cost.predict import predict_many
    from memfit.plan.cost.ranker import DEFAULT_RANKER, TileRanker, candidate_matrix

    seq = {k: p["latency_us"] for k, p in zip(cands, predict_many(list(cands.values()), function, model))}
    path = Path(ranker) if ranker else DEFAULT_RANKER
    if not use_ranker or not path.exists():
        if ranker:
            raise CostModelError(f"no tile ranker at {ranker}")
        return seq, seq, "sequence model"
    names = [k for k in cands if k != "default"]
    r = TileRanker.load(path)
    X, _ = candidate_matrix([pick_function(cands[k], function) for k in names], r.host)
    scores = dict(zip(names, r.scores(X).tolist()))
    gate = r.default_scores(np.array([tiles.shape_vector(*tiles.shape_and_tile(pick_function(cands["default"],
                                                                                            function))[0])]))
    if r.objective == "relative":
        level = float(np.mean([np.log(seq[k]) for k in names]))
        pred = {k: float(np.exp(level + scores[k])) for k in names}
    else:
        pred = {k: seq[k] for k in names}
    pred["default"] = seq["default"] if gate is None else float(np.exp(level + gate[0]))
    if gate is None:
        return scores, pred, f"tile ranker ({path.name})"
    return {**scores, "default": float(gate[0])}, pred, f"tile ranker with the tile-or-default switch ({path.name})"


def tune(mlir: str, function: str | None = None, model: str | None = None, measure: bool = False,
         ranker: str | None = None, use_ranker: bool = True) -> dict:
    """Rank the candidates of one program; with `measure`, also compile and time every one (IREE needed)."""
    cands = candidates(mlir)
    keys, preds, by = rank_candidates(cands, function, model, ranker, use_ranker)
    # IREE's default is ranked only by a ranker with the tile-or-default switch (its key is in `keys`)
    with_default = "default" in keys and by.startswith("tile ranker")
    ranking = sorted((k for k in cands if k != "default" or with_default), key=lambda k: keys[k])
    out: dict = {"ranked_by": by, "ranking": [{"candidate": k, "predicted_us": preds[k]} for k in ranking],
                 "pick": ranking[0], "predicted_default_us": preds["default"], "pick_program": cands[ranking[0]]}
    if measure:
        from memfit.plan.cost.label import measure as run

        from memfit.plan.cost.errors import CompileError

        measured, failed = {}, {}
        for k, m in cands.items():
            try:
                measured[k] = run(m, function).latency_us
            except CompileError as exc:
                failed[k] = str(exc).splitlines()[1] if "\n" in str(exc) else str(exc)
        out["measured_us"], out["failed"] = measured, failed
        keys = {k: v for k, v in keys.items() if k in measured and (k != "default" or with_default)}
        out["outcome"] = outcome({**keys, "default": keys.get("default", 0.0)}, measured, with_default).as_dict()
    return out


def dataset_outcomes(rows: list[dict], predicted: dict[str, float], with_default: bool = False) -> list[Outcome]:
    """Outcomes over the dataset's tuned kernels: rows of family TUNED grouped by shape, every candidate
    labelled; `predicted` maps a row key to its predicted latency."""
    groups: dict[str, dict[str, tuple[float, float]]] = {}
    for r in rows:
        tile = r["params"].get("tile")
        name = "default" if not tile else "tile_%dx%dx%d" % tuple(tile)
        groups.setdefault(r["shape_key"], {})[name] = (predicted[r["key"]], r["latency_us"])
    # a candidate the compiler rejected has no label: a tuner whose pick fails to compile takes the next one
    # in the model's ranking, which is what picking among the compiled candidates does
    return [outcome({k: v[0] for k, v in g.items()}, {k: v[1] for k, v in g.items()}, with_default)
            for g in groups.values() if "default" in g and len(g) > 2]
