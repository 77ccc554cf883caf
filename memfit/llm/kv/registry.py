"""The KV-manager registry: `{kind: class}`. A manager is one file in `memfit/llm/kv/` whose class is
decorated with `@register_kv_cache("kind")`; nothing outside `kv/` changes to add one.

Every module of the package is imported on the first lookup, so a new file registers itself without being
listed anywhere.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Callable, TypeVar

from memfit.llm.kv.base import KVCacheManager, KVLayout
from memfit.memory.budget import MemoryBudget

_REGISTRY: dict[str, type[KVCacheManager]] = {}
_NOT_MANAGERS = {"base", "registry"}
_loaded = False
M = TypeVar("M", bound=type[KVCacheManager])


def register_kv_cache(kind: str) -> Callable[[M], M]:
    """Class decorator: make `kind` build this manager (`create_kv_cache(kind, ...)`, `--kv-cache kind`)."""

    def add(cls: M) -> M:
        if not (inspect.isclass(cls) and issubclass(cls, KVCacheManager)):
            raise TypeError(f"{cls!r} is not a KVCacheManager")
        if _REGISTRY.get(kind, cls) is not cls:
            raise ValueError(f"KV cache kind {kind!r} is already registered by {_REGISTRY[kind].__qualname__}")
        _REGISTRY[kind] = cls
        cls.kind = kind
        return cls

    return add


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    package = __name__.rpartition(".")[0]  # memfit.llm.kv, found by path: this module never imports its package
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in _NOT_MANAGERS and not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")
    _loaded = True


def kv_kinds() -> tuple[str, ...]:
    """Registered kinds, in registration order."""
    _load_all()
    return tuple(_REGISTRY)


def kv_cache_class(kind: str) -> type[KVCacheManager]:
    _load_all()
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown KV cache kind {kind!r}; choose one of {', '.join(_REGISTRY)}") from None


def create_kv_cache(kind: str, layout: KVLayout, budget: MemoryBudget, **opts: object) -> KVCacheManager:
    """Build a KV cache of a registered `kind` ("virtual", "paged", ...).

    Options are the manager's own constructor keywords (virtual: max_seqs, eager_pages, prefault, owner,
    token_major; paged: block_size, num_blocks, max_seqs, owner); an unknown one is refused with the list.
    """
    cls = kv_cache_class(kind)
    params = inspect.signature(cls.__init__).parameters
    unknown = sorted(set(opts) - set(params) - {"self", "layout", "budget"})
    if unknown:
        allowed = [p for p in params if p not in ("self", "layout", "budget")]
        raise ValueError(f"unknown option(s) {unknown} for the {kind} KV cache; it takes {allowed}")
    return cls(layout, budget, **opts)  # type: ignore[arg-type]
