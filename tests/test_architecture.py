"""The seams the architecture promises, checked on the source: no import cycles, the memory layer never imports
upward, step data and request state load without torch, and the CLI parsers build without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "memfit"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _import_graph() -> dict[str, set[str]]:
    """Edges module -> memfit module it imports, lazy (function-level) imports included: a cycle through a
    lazy import is still a cycle in the design."""
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("memfit"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges[mod].add(sub if sub in mods else node.module)  # type: ignore[arg-type]
            elif isinstance(node, ast.Import):
                edges[mod].update(a.name for a in node.names if a.name.startswith("memfit"))
    return {m: {t for t in ts if t in mods and t != m} for m, ts in edges.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative enough for this size)."""
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert _cycles(_import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_memory_layer_never_imports_upward():
    upward = ("memfit.llm", "memfit.train", "memfit.plan", "memfit.quant")
    bad = {m: sorted(t for t in ts if t.startswith(upward))
           for m, ts in _import_graph().items() if m.startswith("memfit.memory")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_server_reaches_the_engine_only_through_its_facade():
    allowed = {"memfit.llm.engine", "memfit.llm.engine.protocol", "memfit.llm.engine.params",
               "memfit.llm.engine.outputs", "memfit.llm.engine.errors", "memfit.llm.engine.llm_engine", "memfit.llm.engine.config"}
    used = {t for m, ts in _import_graph().items()
            if m.startswith("memfit.llm.server") and m != "memfit.llm.server.__main__" for t in ts
            if t.startswith("memfit.llm.") and not t.startswith("memfit.llm.server")}
    assert used <= allowed | {"memfit.llm.models.tokenizer"}, used - allowed


def _loads_torch(code: str) -> bool:
    probe = f"import sys\n{code}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_step_data_and_request_state_load_without_torch():
    assert not _loads_torch("import memfit.llm.engine.params, memfit.llm.engine.request, memfit.llm.engine.step, "
                            "memfit.llm.engine.config, memfit.llm.engine.scheduler, memfit.llm.engine.errors, "
                            "memfit.llm.engine.protocol")
    assert _loads_torch("import memfit.llm.engine.sampling")  # the probe itself can see torch load


def test_cli_parsers_build_without_torch():
    assert not _loads_torch("from memfit.cli import build_parser; build_parser()")
