"""`memfit costmodel`: predict without IREE, measure with it, clear errors, eval and train plumbing."""
import json

import pytest

from memfit.cli import main
from memfit.plan.cost import families, iree, store
from memfit.plan.cost.errors import IreeMissingError
from memfit.plan.cost.train import DEFAULT_MODEL

from .conftest import TINY_MATMUL, needs_iree


@pytest.fixture
def kernel(tmp_path):
    path = tmp_path / "k.mlir"
    path.write_text(TINY_MATMUL)
    return path


@pytest.fixture
def no_iree(monkeypatch):
    def missing(name):
        raise IreeMissingError(name)

    monkeypatch.setattr(iree, "tool", missing)


def test_shipped_model_is_small():
    assert DEFAULT_MODEL.exists()
    assert DEFAULT_MODEL.stat().st_size <= 5 * 1024 * 1024


def test_shipped_model_reads_the_default_columns(kernel, no_iree, capsys):
    # trained with the default recipe (TrainConfig's odd_n rules): its nets and trees read features.DEFAULT_NAMES,
    # not the pipe columns
    from memfit.plan.cost import features
    from memfit.plan.cost.seq import Bundle

    b = Bundle.load(str(DEFAULT_MODEL))
    assert b.feature_names == list(features.DEFAULT_NAMES) == b.blend["names"]
    assert main(["costmodel", "predict", str(kernel), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latency_us"] > 0


def test_a_70_column_model_still_predicts(kernel, no_iree, capsys):
    """The Zen 4 model was trained before the layout columns (70 columns, SHIPPED's tile rules); today's rows
    hold 74 and the model reads its leading 70."""
    from memfit.plan.cost import features
    from memfit.plan.cost.seq import Bundle

    zen4 = DEFAULT_MODEL.with_name("llvm_cpu_host_zen4.safetensors")
    b = Bundle.load(str(zen4))
    assert b.feature_names == list(features.ALL_NAMES[:70]) and len(features.ALL_NAMES) == 74
    assert "vtile_rules" not in b.info
    assert main(["costmodel", "predict", str(kernel), "--model", str(zen4), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["latency_us"] > 0


def test_predict_without_iree(kernel, no_iree, capsys):
    assert main(["costmodel", "predict", str(kernel), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"latency_us", "instructions", "vector_fma", "spills"}
    assert out["latency_us"] > 0 and out["instructions"] > 0


def test_measure_without_iree_says_how_to_install(kernel, no_iree, capsys):
    assert main(["costmodel", "measure", str(kernel), "--json"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'memfit[cost]'" in err and "Traceback" not in err


def test_predict_bad_input(tmp_path, capsys):
    assert main(["costmodel", "predict", str(tmp_path / "missing.mlir")]) == 2
    bad = tmp_path / "bad.mlir"
    bad.write_text("this is not mlir")
    assert main(["costmodel", "predict", str(bad)]) == 2
    assert "no func.func" in capsys.readouterr().err


@needs_iree
def test_predict_refuses_a_model_file_it_cannot_read(kernel, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "garbage.safetensors").write_text("{")  # not safetensors at all
    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))  # safetensors, not a cost model
    for name in ("garbage.safetensors", "bare.safetensors"):
        rc = main(["costmodel", "predict", str(kernel), "--model", str(tmp_path / name)])
        assert rc == 2
        err = capsys.readouterr().err
        assert "is not a cost model file memfit can read" in err and "Traceback" not in err


@pytest.mark.parametrize("n", ["0", "-3"])
def test_generate_refuses_fewer_than_one_kernel(n, tmp_path, capsys):
    assert main(["costmodel", "generate", "--n", n, "--out", str(tmp_path / "c.db")]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "c.db").exists()  # refused before the file is made


def test_measure(kernel, capsys):
    assert main(["costmodel", "measure", str(kernel), "--json", "--repetitions", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["latency_us"] > 0 and out["vector_fma"] > 0
    assert out["label_kind"] == "cpu_median" and out["real_median_us"] > 0
    assert out["latency_us"] == pytest.approx(sum(out["figures"]["cpu_reps"]) / 2)  # the median of 2


@needs_iree
def test_compile_error_is_the_compilers_message(tmp_path, capsys):
    bad = tmp_path / "bad.mlir"
    bad.write_text(TINY_MATMUL.replace("arith.constant 0.0 : f32", "arith.constant 0.0 : i32"))
    assert main(["costmodel", "measure", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "iree-compile failed" in err and "error:" in err and "Traceback" not in err


@needs_iree
def test_label_resumes(tmp_path):
    from memfit.plan.cost.label import LabelConfig, label_all

    db = tmp_path / "d.db"
    con = store.connect(db)
    store.add_kernels(con, [families.KernelSpec("elementwise", "f32", {"shape": [64], "ops": ["relu"],
                                                                        "fused": True}),
                            families.KernelSpec("matmul", "f32", {"M": 16, "K": 16, "N": 16})])
    cfg = LabelConfig(repetitions=2, min_time_s=0.01, limit=1)
    assert label_all(db, cfg, progress=False)["labelled"] == 1
    assert label_all(db, cfg, progress=False)["labelled"] == 2  # the second run picks up the rest
    rows = store.labelled(con)
    assert all(r["latency_us"] > 0 and r["instructions"] > 0 for r in rows)
    assert store.meta(con)["iree_version"] == iree.version()
    # the label is the kind the file records, read off the CPU times stored beside the real ones
    assert store.meta(con)["label_kind"] == iree.DEFAULT_LABEL_KIND == "cpu_median"
    for r in rows:
        assert len(r["cpu_reps"]) == len(r["reps"]) == 2
        assert r["latency_us"] == pytest.approx(sorted(r["cpu_reps"])[0] / 2 + sorted(r["cpu_reps"])[1] / 2)
        assert r["real_median_us"] == pytest.approx(sum(r["reps"]) / 2)


@needs_iree
def test_label_refuses_to_mix_kinds_in_one_file(tmp_path, capsys):
    db = tmp_path / "d.db"
    con = store.connect(db)
    store.add_kernels(con, [families.KernelSpec("elementwise", "f32", {"shape": [64], "ops": ["relu"],
                                                                        "fused": True}),
                            families.KernelSpec("elementwise", "f32", {"shape": [128], "ops": ["exp"],
                                                                        "fused": True})])
    args = ["costmodel", "label", "--db", str(db), "--repetitions", "2", "--min-time", "0.01", "--no-progress"]
    assert main([*args, "--limit", "1", "--label-kind", "real_min"]) == 0
    assert store.meta(con)["label_kind"] == "real_min"
    (row,) = store.labelled(con)
    assert row["latency_us"] == min(row["reps"])
    capsys.readouterr()
    assert main(args) == 2  # the default kind (cpu_median) into a file of real_min labels
    assert "holds labels of kind real_min" in capsys.readouterr().err
    assert store.counts(con)["labelled"] == 1


def test_eval_and_train_on_a_synthetic_dataset(tmp_path, capsys):
    """Plumbing only: the labels are made up (no IREE), so the figures mean nothing."""
    db = tmp_path / "d.db"
    con = store.connect(db)
    specs = families.generate(40, seed=7)
    store.add_kernels(con, specs)
    for i, s in enumerate(specs):
        store.put_label(con, s.key(), latency_us=10.0 + i, spread=0.1, figures={"instructions": 100 + i,
                                                                                 "vector_fma": i, "spills": 0})
    png = tmp_path / "e.png"
    assert main(["costmodel", "eval", "--db", str(db), "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["report"]["seq"]["all"]["n"] == out["test_kernels"] > 0
    assert png.stat().st_size > 0
    model = tmp_path / "m.safetensors"
    assert main(["costmodel", "train", "--db", str(db), "--out", str(model), "--epochs", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_bytes"] == model.stat().st_size


def test_each_shipped_model_names_its_host_and_predict_takes_this_cpus(monkeypatch):
    """Two shipped models, one a labelling host's: predict loads the one whose labels came from this CPU (core count
    aside; for the Zen 4 file also its family and model, which a VM's "AMD EPYC" name does not carry) and falls back
    to the default one, which warns, on any other."""
    from memfit.plan.cost import predict as pr
    from memfit.plan.cost.train import SHIPPED_MODELS

    hosts = {p.name: pr.trained_on(p) for p in SHIPPED_MODELS}
    assert len(SHIPPED_MODELS) == 2 and all(hosts.values()) and len(set(hosts.values())) == 2
    assert all(p.stat().st_size <= 5 * 1024 * 1024 for p in SHIPPED_MODELS)
    zen4 = next(p for p in SHIPPED_MODELS if "AMD EPYC" in hosts[p.name])
    amd = hosts[zen4.name].replace("2 cpus", "16 cpus")
    assert pr.shipped_model_for(amd, ("25", "17")) == zen4  # Zen 4: family 25 model 17
    assert pr.shipped_model_for(amd, ("26", "2")) == DEFAULT_MODEL  # a Zen 5 EPYC: same name and flags, not its labels
    assert pr.shipped_model_for(amd, None) == DEFAULT_MODEL
    assert pr.shipped_model_for(hosts[DEFAULT_MODEL.name], ("6", "143")) == DEFAULT_MODEL
    assert pr.shipped_model_for("Some RISC-V (; 4 cpus)", None) == DEFAULT_MODEL
    monkeypatch.setattr("memfit.plan.cost.iree.host_cpu", lambda: amd)
    monkeypatch.setattr(pr, "cpu_id", lambda: ("25", "17"))
    pr.load_model.cache_clear()
    try:
        assert pr.load_model().info["host_cpu"] == hosts[zen4.name]
    finally:
        pr.load_model.cache_clear()


@pytest.mark.parametrize("action", [["generate", "--n", "2", "--out"], ["label", "--db"], ["train", "--db"],
                                    ["eval", "--db"], ["train-ranker", "--db"]])
def test_a_file_that_is_not_a_dataset_is_one_error(action, tmp_path, capsys):
    """A --db/--out that is not SQLite (or cannot be opened) was sqlite3's DatabaseError traceback."""
    bad = tmp_path / "notes.db"
    bad.write_text("garbage\n")
    assert main(["costmodel", *action, str(bad)]) == 2
    err = capsys.readouterr().err
    assert "is not a dataset memfit can open" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, words", [(["--workers", "0"], "--workers must be at least 1"),
                                          (["--repetitions", "0"], "--repetitions must be at least 1"),
                                          (["--min-time", "-1"], "--min-time must be a positive"),
                                          (["--limit", "-1"], "--limit must be at least 0"),
                                          (["--family", "nope"], "unknown family 'nope'")])
def test_label_refuses_bad_settings_before_timing_anything(flags, words, tmp_path, capsys, monkeypatch):
    """These were taken: --repetitions 0 marked every kernel it reached as failed in the dataset, --family nope
    labelled nothing and exited 0."""
    from memfit.plan.cost import label

    db = tmp_path / "k.db"
    store.add_kernels(store.connect(db), families.generate(4, seed=0))
    monkeypatch.setattr(label, "label_all", lambda *a, **k: pytest.fail("labelled with bad settings"))
    assert main(["costmodel", "label", "--db", str(db), "--no-progress", *flags]) == 2
    assert words in capsys.readouterr().err


def test_label_takes_the_tuned_matmul_family(tmp_path, capsys, monkeypatch):
    """docs/costmodel.md labels the tile candidates with --family tuned_matmul: not one of FAMILIES, still known."""
    from memfit.plan.cost import label

    db = tmp_path / "k.db"
    store.add_kernels(store.connect(db), families.generate(4, seed=0))
    seen = []
    monkeypatch.setattr(label, "label_all", lambda db, cfg, progress: seen.append(cfg.family) or {"kernels": 4})
    monkeypatch.setattr(store, "meta", lambda con: {"peaks": {}})
    assert main(["costmodel", "label", "--db", str(db), "--no-progress", "--family", "tuned_matmul"]) == 0
    assert seen == ["tuned_matmul"]


def test_label_refuses_a_dataset_that_is_not_there(tmp_path, capsys):
    """It created an empty file and printed {"kernels": 0, ...} with exit status 0."""
    assert main(["costmodel", "label", "--db", str(tmp_path / "typo.db"), "--no-progress"]) == 2
    assert "no dataset at" in capsys.readouterr().err and not (tmp_path / "typo.db").exists()


def test_tune_refuses_a_bad_ranker_and_an_unwritable_out(kernel, tmp_path, capsys):
    """A --ranker that is not JSON was json's traceback; --out under a file was a traceback after the tuning."""
    (tmp_path / "afile").write_text("")
    assert main(["costmodel", "tune", str(kernel), "--ranker", str(tmp_path / "afile"), "--json"]) == 2
    assert "is not a tile ranker" in json.loads(capsys.readouterr().out)["error"]
    assert main(["costmodel", "tune", str(kernel), "--out", str(tmp_path / "afile" / "x.mlir"), "--json"]) == 2
    assert "is a file, not a folder" in json.loads(capsys.readouterr().out)["error"]
    assert main(["costmodel", "measure", str(kernel), "--repetitions", "0", "--json"]) == 2
    assert "--repetitions must be at least 1" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.parametrize("action, module, name", [("train", "memfit.plan.cost.train", "DEFAULT_MODEL"),
                                                  ("train-ranker", "memfit.plan.cost.ranker", "DEFAULT_RANKER")])
def test_training_without_out_checks_the_default_path_before_the_work(action, module, name, tmp_path, capsys,
                                                                       monkeypatch):
    """Without --out the model goes to its default in the package's assets, which a system install may not let
    anyone write: that is refused before the training, as an unwritable --out is, not after it."""
    import importlib

    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(importlib.import_module(module), name, tmp_path / "afile" / "model.bin")
    db = tmp_path / "d.db"
    assert main(["costmodel", "generate", "--n", "4", "--out", str(db)]) == 0
    capsys.readouterr()
    assert main(["costmodel", action, "--db", str(db), "--json"]) == 2
    assert "is a file, not a folder" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.parametrize("argv, words", [(["train", "--epochs", "0"], "--epochs must be at least 1"),
                                         (["train", "--out", "afile/m.safetensors"], "--out"),
                                         (["train-ranker", "--out", "afile/r.json"], "--out"),
                                         (["eval", "--plot", "eval.txt"], "--plot")])
def test_train_and_eval_check_their_settings_and_outputs_first(argv, words, tmp_path, capsys, monkeypatch):
    """--epochs 0 and an --out/--plot that cannot be written were found only after the training or evaluation."""
    from memfit.plan.cost import evaluate_cmd, rank_eval, train

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    for module, name in ((train, "train"), (rank_eval, "train_ranker"), (evaluate_cmd, "evaluate")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("ran before checking the options"))
    db = tmp_path / "k.db"
    store.add_kernels(store.connect(db), families.generate(4, seed=0))
    assert main(["costmodel", argv[0], "--db", str(db), *argv[1:]]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("action, resumable", [("label", True), ("train", False)])
def test_ctrl_c_speaks_of_resuming_only_where_something_is_saved(action, resumable, tmp_path, capsys, monkeypatch):
    """Ctrl-C in train (or eval, tune, ...) said 'labels so far are saved; run the same command to resume'."""
    from memfit.plan.cost import label, train

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(label, "label_all", interrupt)
    monkeypatch.setattr(train, "train", interrupt)
    db = tmp_path / "k.db"
    store.add_kernels(store.connect(db), families.generate(4, seed=0))
    assert main(["costmodel", action, "--db", str(db)] + (["--no-progress"] if action == "label" else [])) == 130
    assert ("resume" in capsys.readouterr().err) == resumable


def test_generate_adds_a_family_draw_and_records_each_draw(tmp_path, capsys):
    db = tmp_path / "d.db"
    assert main(["costmodel", "generate", "--n", "20", "--out", str(db)]) == 0
    assert main(["costmodel", "generate", "--n", "10", "--seed", "1", "--family", "conv", "--out", str(db)]) == 0
    con = store.connect(db)
    fams = [r[0] for r in con.execute("SELECT family FROM kernels ORDER BY rowid")]
    assert len(fams) >= 29 and set(fams[20:]) == {"conv"}  # at most one of the 10 was already among the 20
    meta = store.meta(con)
    assert meta["seed"] == 0 and [(d["n"], d["seed"], d["family"]) for d in meta["draws"]] == [(20, 0, None),
                                                                                              (10, 1, "conv")]
    assert main(["costmodel", "generate", "--n", "5", "--family", "convolution", "--out", str(db)]) == 2
    assert "unknown family" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["tune", "{k}", "--out", "{k}"], ["tune", "{k}", "--out", "../{d}/k.mlir"],
                                  ["train", "--db", "{db}", "--out", "{db}"],
                                  ["train-ranker", "--db", "{db}", "--out", "./{db}"]])
def test_an_out_onto_an_input_is_refused_before_the_work(argv, kernel, tmp_path, capsys, monkeypatch):
    """tune --out onto its MLIR file replaced it with the picked program; train --out onto --db would have written
    the model over the labels."""
    from memfit.plan.cost import rank_eval, train, tune

    monkeypatch.chdir(tmp_path)
    db = "k.db"
    store.add_kernels(store.connect(db), families.generate(4, seed=0))
    before = {p: p.read_bytes() for p in (kernel, tmp_path / db)}
    for module, name in ((train, "train"), (rank_eval, "train_ranker"), (tune, "tune")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("ran before checking --out"))
    args = [a.format(k=kernel.name, d=tmp_path.name, db=db) for a in argv]
    assert main(["costmodel", *args, "--json"]) == 2
    out, err = capsys.readouterr()
    assert "is the same file as" in json.loads(out)["error"] and "Traceback" not in err
    assert before == {p: p.read_bytes() for p in before}


@pytest.mark.parametrize("cpu", ["999", "-1"])
def test_label_refuses_a_cpu_it_may_not_run_on_before_labelling(cpu, tmp_path, capsys, monkeypatch):
    """--pin-cpu 999 exited 0 with taskset's 'failed to set affinity' stored as every kernel's label; stored failures
    are never retried, so the dataset was spoiled."""
    import os

    from memfit.plan.cost import label

    db = tmp_path / "k.db"
    store.add_kernels(store.connect(db), families.generate(4, seed=0))
    monkeypatch.setattr(label, "label_all", lambda *a, **k: pytest.fail("labelled with a CPU it may not use"))
    monkeypatch.setattr(iree, "tool", lambda name: pytest.fail("needed IREE before checking --pin-cpu"))
    assert main(["costmodel", "label", "--db", str(db), "--pin-cpu", cpu, "--limit", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--pin-cpu {cpu}: this process may run only on CPUs" in err and "Traceback" not in err
    assert str(min(os.sched_getaffinity(0))) in err
    assert store.counts(store.connect(db))["labelled"] == 0 and store.counts(store.connect(db))["failed"] == 0


@pytest.mark.parametrize("compiled", ["afile", "afile/sub"])
def test_label_refuses_a_compiled_dir_that_is_a_file(compiled, tmp_path, capsys, monkeypatch):
    """--compiled FILE --compile-only was a NotADirectoryError traceback."""
    from memfit.plan.cost import label

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    store.add_kernels(store.connect("k.db"), families.generate(4, seed=0))
    monkeypatch.setattr(label, "label_all", lambda *a, **k: pytest.fail("labelled before checking --compiled"))
    assert main(["costmodel", "label", "--db", "k.db", "--compiled", compiled, "--compile-only",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--compiled {compiled}:" in err and "is a file, not a directory" in err and "Traceback" not in err


def test_an_input_under_a_file_is_one_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["costmodel", "predict", str(tmp_path / "afile" / "k.mlir"), "--json"]) == 2
    out, err = capsys.readouterr()
    assert "Not a directory" in json.loads(out)["error"] and "Traceback" not in err


def _cut(text: str) -> str:
    return text[:300]  # `head -c 300` of a kernel


@pytest.mark.parametrize("edit, words", [
    (_cut, "has no closing brace"),                                                    # was IndexError
    (lambda t: t.rstrip().removesuffix("}"), "has no closing brace"),                  # was predicted
    (lambda t: "module {\n" + t, "the braces do not balance"),
    (lambda t: t.replace("linalg.fill", "foo.bar"), "op foo.bar is not one the cost model can read"),
    (lambda t: "func.func @main() {}\n", "has no linalg op"),
    (lambda t: t.replace("ins(%lhs, %rhs : tensor<16x32xf32>, tensor<32x16xf32>)", "ins(%lhs : tensor<16x32xf32>)"),
     "cannot read the operands of linalg.matmul"),
])
def test_predict_refuses_what_it_cannot_read(edit, words, kernel, tmp_path, capsys):
    bad = tmp_path / "bad.mlir"
    bad.write_text(edit(kernel.read_text()))
    assert main(["costmodel", "predict", str(bad), "--json"]) == 2
    out, err = capsys.readouterr()
    assert words in json.loads(out)["error"] and "Traceback" not in err


def test_predict_refuses_a_generated_kernel_cut_short(tmp_path, capsys):
    """`head -c 300` of generated kernels: an IndexError in gemm_view on some, a prediction from half a kernel on
    others."""
    for i, spec in enumerate(families.generate(6, seed=0)):
        cut = tmp_path / f"cut{i}.mlir"
        cut.write_text(families.render(spec)[:300])
        assert main(["costmodel", "predict", str(cut), "--json"]) == 2
        out, err = capsys.readouterr()
        assert "closing brace" in json.loads(out)["error"] and "Traceback" not in err


def test_label_refuses_pin_cpu_without_taskset(tmp_path, capsys, monkeypatch):
    """Without taskset the timings ran unpinned while the data set recorded the pin."""
    import os
    import shutil

    from memfit.plan.cost import label

    db = tmp_path / "k.db"
    store.add_kernels(store.connect(db), families.generate(4, seed=0))
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "taskset" else real_which(name, *a, **k))
    monkeypatch.setattr(label, "label_all", lambda *a, **k: pytest.fail("labelled unpinned"))
    cpu = str(min(os.sched_getaffinity(0)))
    assert main(["costmodel", "label", "--db", str(db), "--pin-cpu", cpu, "--limit", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--pin-cpu needs the taskset command" in err and "Traceback" not in err
