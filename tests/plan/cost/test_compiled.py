"""The compiled-module store: compile once (in parallel, no timing), time later without compiling again."""
import json

import pytest

from memfit.cli import main
from memfit.plan.cost import compiled, families, iree, label, store
from memfit.plan.cost.compiled import CompiledStore
from memfit.plan.cost.errors import CompileError

from .conftest import TINY_MATMUL, needs_iree

SPECS = [families.KernelSpec("elementwise", "f32", {"shape": [64], "ops": ["relu"], "fused": True}),
         families.KernelSpec("matmul", "f32", {"M": 16, "K": 16, "N": 16}),
         families.KernelSpec("matmul", "f32", {"M": 8, "K": 32, "N": 16})]


def _compiles(monkeypatch) -> list[str]:
    """Count iree-compile runs (the real compiler still runs)."""
    calls, real = [], iree.compile_mlir

    def counted(mlir, *args, **kwargs):
        calls.append(mlir)
        return real(mlir, *args, **kwargs)

    monkeypatch.setattr(iree, "compile_mlir", counted)
    return calls


def test_entry_depends_on_text_flags_and_toolchain(tmp_path, monkeypatch):
    monkeypatch.setattr(compiled, "_toolchain", lambda: "iree 1 on cpu A")
    cs = CompiledStore(tmp_path)
    base = cs.entry(TINY_MATMUL)
    assert cs.entry(TINY_MATMUL) == base
    assert cs.entry(TINY_MATMUL, ("--iree-llvmcpu-tile-sizes=8",)) != base
    assert cs.entry(TINY_MATMUL.replace("16x16", "16x17")) != base
    monkeypatch.setattr(compiled, "_toolchain", lambda: "iree 2 on cpu A")  # a new compiler never reuses
    assert cs.entry(TINY_MATMUL) != base


@needs_iree
def test_compile_only_then_time_without_compiling(tmp_path, monkeypatch):
    db, mods = tmp_path / "d.db", tmp_path / "mods"
    con = store.connect(db)
    store.add_kernels(con, SPECS)
    calls = _compiles(monkeypatch)
    out = label.label_all(db, label.LabelConfig(workers=2, compiled_dir=str(mods), compile_only=True), progress=False)
    assert out["compiled"] == 3 and out["compile_failed"] == 0 and out["labelled"] == 0  # nothing timed
    assert len(calls) == 3 and len(list(mods.glob("*/*/module.vmfb"))) == 3
    assert not list(mods.glob("*/*/dump")) and not list(mods.glob("*/.building-*"))  # only module + figures

    cfg = label.LabelConfig(repetitions=2, min_time_s=0.01, compiled_dir=str(mods))
    assert label.label_all(db, cfg, progress=False)["labelled"] == 3
    assert len(calls) == 3  # the timing run compiled nothing

    # the same figures and a timing as labelling without the store (fresh file, compiled again)
    fresh = tmp_path / "e.db"
    store.add_kernels(store.connect(fresh), SPECS)
    label.label_all(fresh, label.LabelConfig(repetitions=2, min_time_s=0.01), progress=False)
    assert len(calls) == 6
    static = ("instructions", "spills", "reloads", "code_bytes", "executables", "vector_fma")
    a = {r["key"]: r for r in store.labelled(con)}
    b = {r["key"]: r for r in store.labelled(store.connect(fresh))}
    assert a.keys() == b.keys()
    for key in a:
        assert {k: a[key].get(k) for k in static} == {k: b[key].get(k) for k in static}
        assert a[key]["instructions"] > 0 and a[key]["latency_us"] > 0


@needs_iree
def test_a_rejected_kernel_is_counted_not_stored_and_labelled_with_the_message(tmp_path):
    db, mods = tmp_path / "d.db", tmp_path / "mods"
    con = store.connect(db)
    store.add_kernels(con, SPECS[:1])
    bad = TINY_MATMUL.replace("arith.constant 0.0 : f32", "arith.constant 0.0 : i32")
    con.execute("UPDATE kernels SET mlir = ?", (bad,))
    con.commit()
    out = label.label_all(db, label.LabelConfig(compiled_dir=str(mods), compile_only=True), progress=False)
    assert out["compile_failed"] == 1 and out["compiled"] == 0
    assert not list(mods.glob("*/*/module.vmfb")) and not list(mods.glob("*/.building-*"))
    with pytest.raises(CompileError):
        CompiledStore(mods).compile(bad)
    out = label.label_all(db, label.LabelConfig(repetitions=2, min_time_s=0.01, compiled_dir=str(mods)),
                          progress=False)
    assert out["failed"] == 1
    (error,) = [r[0] for r in con.execute("SELECT error FROM labels")]
    assert "iree-compile failed" in error


def test_compile_only_needs_a_directory(tmp_path, capsys):
    db = tmp_path / "d.db"
    store.add_kernels(store.connect(db), SPECS[:1])
    assert main(["costmodel", "label", "--db", str(db), "--compile-only"]) == 2
    assert "--compiled DIR" in capsys.readouterr().err
    assert main(["costmodel", "label", "--db", str(db), "--compile-only", "--compiled", str(tmp_path / "m"),
                 "--noise", "4"]) == 2
    assert "--noise" in capsys.readouterr().err


@needs_iree
def test_compile_only_prints_one_json_object(tmp_path, capsys):
    db = tmp_path / "d.db"
    store.add_kernels(store.connect(db), SPECS[:1])
    assert main(["costmodel", "label", "--db", str(db), "--compile-only", "--compiled", str(tmp_path / "m"),
                 "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["compiled"] == 1 and out["labelled"] == 0


@needs_iree
def test_an_incomplete_entry_is_compiled_again(tmp_path):
    cs = CompiledStore(tmp_path / "mods")
    vmfb, figures = cs.compile(TINY_MATMUL)
    (vmfb.parent / compiled.FIGURES).unlink()  # damaged outside memfit
    assert cs.get(TINY_MATMUL) is None
    vmfb2, figures2 = cs.compile(TINY_MATMUL)
    assert vmfb2 == vmfb and vmfb2.is_file() and figures2 == figures
