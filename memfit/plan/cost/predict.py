"""`predict`: the figures of one MLIR function from the shipped model. Reads text only: no compiler, no
runtime, so it works with IREE uninstalled."""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np

from memfit.plan.cost import dataset, features, tokens
from memfit.plan.cost.errors import CostModelError
from memfit.plan.cost.ops import check_readable
from memfit.plan.cost.parse import pick_function
from memfit.plan.cost.seq import Bundle

log = logging.getLogger(__name__)


def _cpu(desc: str) -> str:
    """iree.host_cpu()'s description without the core count (the same CPU with more cores is the same)."""
    return desc.rsplit(";", 1)[0].strip()


def check_host(bundle: Bundle, path: str | Path) -> bool:
    """Whether the model's labels came from this CPU (model and vector extensions); warns when not: its
    latencies are that CPU's."""
    from memfit.plan.cost.iree import host_cpu

    trained, here = bundle.info.get("host_cpu"), host_cpu()
    if trained and _cpu(trained) != _cpu(here):
        log.warning("cost model %s was trained on labels of another CPU (%s); this CPU is %s: its latencies are "
                    "that CPU's; label and train here (memfit costmodel label / train)", path, trained, here)
        return False
    return True


def check_columns(bundle: Bundle, path: str | Path) -> None:
    """The columns a model reads must be the leading columns of features.ALL_NAMES by name: a column whose
    meaning changed is renamed (paths.PATH_NAMES), so a model of the old meaning fails here rather than
    predicting from inputs read the wrong way round."""
    names = list(features.ALL_NAMES)
    used = [list(bundle.feature_names), list((bundle.blend or {}).get("names") or [])]
    for cols in used:
        if cols != names[:len(cols)]:
            bad = next(c for i, c in enumerate(cols) if i >= len(names) or names[i] != c)
            raise CostModelError(f"cost model {path} reads feature columns this version does not compute "
                                 f"(first mismatch: {bad!r}); retrain it (memfit costmodel train)")


def check_base(bundle: Bundle) -> None:
    """The roofline bases the model reads (the nets' and the blended trees') must be of a kind this version
    knows (roofline.base_of raises otherwise): refused at load, not at the first prediction."""
    from memfit.plan.cost.roofline import base_of

    for base in (bundle.base, (bundle.blend or {}).get("base")):
        if base is not None:
            base_of(base)


def vtile_rules(bundle: Bundle) -> str | None:
    """The name of the vector-tile rules the model's columns were computed with (vtiles.RULES; None: the
    shipped rules, every model trained before the key); a CostModelError for a name this version does not know."""
    from memfit.plan.cost.vtiles import rules_named

    name = bundle.info.get("vtile_rules")
    rules_named(name)
    return name


def trained_on(path: Path) -> str | None:
    """The host_cpu a model file's labels came from (its metadata only: no tensor is read)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("info", "{}")).get("host_cpu")


def cpu_id() -> tuple[str, str] | None:
    """This CPU's (family, model) from /proc/cpuinfo (memory.measure.cpu_fields), or None where it is not there."""
    from memfit.memory.measure import cpu_fields

    f = cpu_fields()
    fam, mod = f.get("cpu family"), f.get("model")
    return (fam, mod) if fam and mod else None


def shipped_model_for(cpu: str, ident: tuple[str, str] | None = None) -> Path:
    """The shipped model whose labels came from `cpu` (iree.host_cpu()'s description; core counts aside) and, for a
    file listed in train.SHIPPED_CPU_IDS, from this family and model (`ident`, as cpu_id() gives); else the default
    one (train.SHIPPED_MODELS)."""
    from memfit.plan.cost.train import DEFAULT_MODEL, SHIPPED_CPU_IDS, SHIPPED_MODELS

    for p in SHIPPED_MODELS:
        trained = trained_on(p)
        if trained and _cpu(trained) == _cpu(cpu) and SHIPPED_CPU_IDS.get(p.name, ident) == ident:
            return p
    return DEFAULT_MODEL


@lru_cache(maxsize=4)
def load_model(path: str | None = None) -> Bundle:
    """The model at `path`, or the shipped one trained on this CPU (the default one where none was)."""
    if path:
        p = Path(path)
    else:
        from memfit.plan.cost.iree import host_cpu

        p = shipped_model_for(host_cpu(), cpu_id())
    if not p.exists():
        raise CostModelError(f"no cost model at {p}: train one with `memfit costmodel train --db DB --out {p}`")
    try:
        bundle = Bundle.load(str(p))
    except Exception as exc:  # not safetensors (SafetensorError), or safetensors without a cost model's metadata
        raise CostModelError(f"{p} is not a cost model file memfit can read ({type(exc).__name__}: {exc}); give one "
                             f"written by `memfit costmodel train`, or leave --model out for the shipped one") from exc
    check_columns(bundle, p)
    check_base(bundle)
    vtile_rules(bundle)  # rules of a name this version does not know: refused at load
    check_host(bundle, p)
    return bundle


def predict_many(mlirs: list[str], function: str | None = None, model: str | None = None) -> list[dict]:
    bundle = load_model(model)
    fns = [pick_function(m, function) for m in mlirs]
    for f in fns:  # a model, not a compiler: still, what it cannot read is refused, not predicted from a guess
        check_readable(f)
    from memfit.plan.cost.vtiles import rules_named

    rules = rules_named(vtile_rules(bundle))
    X = np.array([features.full_vector(f, rules) for f in fns])
    pred = dataset.from_log(bundle.predict_log([tokens.tokenize(f) for f in fns], X))
    return [{"function": f.name, "latency_us": float(p[0]), "instructions": int(round(p[1])),
             "vector_fma": int(round(p[2])), "spills": int(round(p[3]))} for f, p in zip(fns, pred)]


def predict(mlir: str, function: str | None = None, model: str | None = None) -> dict:
    return predict_many([mlir], function, model)[0]
