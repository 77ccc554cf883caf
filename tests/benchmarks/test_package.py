"""benchmarks/ is a package: every module imports (without running), none edits sys.path, and each script's
docstring gives the command that runs it (`python -m benchmarks.NAME`)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _modules() -> list[str]:
    names = []
    for path in sorted(BENCH.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__main__":  # importing it would run the benchmark
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


def _scripts() -> list[str]:
    """Modules a user runs: a top-level module with a main(), or a folder with a __main__.py."""
    out = []
    for path in sorted(BENCH.glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            out.append(f"benchmarks.{path.stem}")
    out += [f"benchmarks.{p.parent.name}" for p in sorted(BENCH.glob("*/__main__.py"))]
    return out


def test_the_package_has_the_benchmarks():
    scripts = _scripts()
    assert {"benchmarks.decode_throughput", "benchmarks.kv_cache", "benchmarks.train_local"} <= set(scripts)
    assert "benchmarks.common" not in scripts


@pytest.mark.parametrize("name", _modules())
def test_every_module_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} needs a docstring saying what it measures"


@pytest.mark.parametrize("name", _scripts())
def test_each_script_documents_its_command(name):
    doc = importlib.import_module(name + (".cli" if name == "benchmarks.train_local" else "")).__doc__
    assert f"python -m {name}" in doc


def test_no_file_under_benchmarks_edits_sys_path():
    offenders = [str(p.relative_to(ROOT)) for p in BENCH.rglob("*") if p.is_file() and p.suffix in (".py", ".sh")
                 and "sys.path" in p.read_text()]
    assert offenders == []
    assert not list(BENCH.glob("train_local_*.py")), "train_local's parts live in benchmarks/train_local/"


def test_results_follow_the_naming_scheme():
    """<benchmark>[_<variant>].json, each PNG beside the JSON of its stem (<stem>.png or <stem>.<plot>.png), and
    the JSON names the benchmark its file is named after."""
    import json

    results = ROOT / "benchmarks" / "results"
    scripts = {name.split(".")[1] for name in _scripts()}
    for png in results.rglob("*.png"):
        # <stem>.png, or <stem>.<plot>.png; a variant may itself hold a dot (finetune_offload_0.1b.png)
        stems = {png.name.removesuffix(".png"), png.name.removesuffix(".png").rpartition(".")[0]} - {""}
        assert any((png.parent / f"{s}.json").exists() for s in stems), f"{png.relative_to(ROOT)} has no JSON beside it"
    for path in results.rglob("*.json"):
        benchmark = json.loads(path.read_text())["benchmark"]
        assert benchmark in scripts or benchmark == "train_local_seeds", path
        assert path.stem == benchmark or path.stem.startswith(benchmark.removesuffix("_seeds") + "_"), path


def test_the_benchmarks_page_points_at_files_that_exist():
    """Every result, plot and module docs/benchmarks.md names is there (a rename must update the page), and every
    benchmark with a committed result has its command there."""
    import re

    page = (ROOT / "docs" / "benchmarks.md").read_text()
    paths = set(re.findall(r"benchmarks/results/[\w./-]+\.(?:json|png)", page))
    assert len(paths) >= 10
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert missing == []
    import json

    modules = set(re.findall(r"python -m (benchmarks\.[a-z0-9_]+)", page))
    assert modules <= set(_scripts()), "the page runs only modules that exist"
    committed = {"benchmarks." + json.loads(p.read_text())["benchmark"].removesuffix("_seeds")
                 for p in (ROOT / "benchmarks" / "results").rglob("*.json")}
    assert committed <= modules, "every benchmark with a committed result has its command on the page"
