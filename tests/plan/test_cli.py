import json

import pytest

from memfit.cli import main


def test_plan_validate_and_plot(tmp_path, capsys):
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    rc = main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "min-feasible", "--out", str(out),
               "--planner", "heuristic", "--time-limit", "5", "--plot", str(png)])
    assert rc == 0
    printed = capsys.readouterr().out
    # status optimal when the plan meets the whole-graph lower bound
    assert "non_compulsory_bytes" in printed and ("status heuristic" in printed or "status optimal" in printed)
    data = json.loads(out.read_text())
    assert data["format"] == "memfit.plan/v1" and data["model"] == "bert_tiny_encoder"
    assert data["traffic"]["non_compulsory_bytes"] >= 0 and data["solver"]["status"] in ("heuristic", "optimal")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["plan", "validate", str(out)]) == 0
    assert "valid memfit.plan/v1 plan" in capsys.readouterr().out

    data["placements"] = data["placements"][1:]  # drop one residency interval: now invalid
    out.write_text(json.dumps(data))
    assert main(["plan", "validate", str(out)]) == 2
    assert "invalid plan" in capsys.readouterr().err


def test_cli_errors_are_clear(capsys):
    assert main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "1KiB", "--planner", "baseline-topo"]) == 2
    err = capsys.readouterr().err
    assert "too small" in err and "operator '" in err and "needs" in err and "Traceback" not in err
    assert main(["plan", "--model", "no_such_net_xyz"]) == 2
    assert "unknown model 'no_such_net_xyz'" in capsys.readouterr().err
    assert main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "lots"]) == 2
    assert "cannot parse size" in capsys.readouterr().err
    assert main(["plan"]) == 2
    assert "--model is required" in capsys.readouterr().err


@pytest.mark.parametrize("flags, words", [(["--input-shape", "3,-1,224"], "every dimension must be at least 1"),
                                          (["--input-shape", "3,0,224"], "every dimension must be at least 1"),
                                          (["--time-limit", "-1"], "--time-limit must be"),
                                          (["--time-limit", "nan"], "--time-limit must be")])
def test_bad_shapes_and_time_limits_are_refused(flags, words, capsys):
    # a negative dimension was torch's 'negative dimension' traceback; a negative time limit planned anyway
    assert main(["plan", "--model", "resnet18", "--planner", "baseline-topo", *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_tile_flag_makes_a_small_scratchpad_work(tmp_path, capsys):
    out = tmp_path / "tiled.json"
    args = ["plan", "--model", "bert_tiny_encoder", "--scratchpad", "96KiB", "--weights", "streamed",
            "--planner", "baseline-topo"]
    assert main(args) == 2 and "too small" in capsys.readouterr().err  # without --tile: a clear refusal
    assert main(args + ["--tile", "--out", str(out)]) == 0
    assert "tiled " in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert any("@" in o["name"] for o in data["ops"]) and data["scratchpad_bytes"] == 96 * 1024
    assert main(["plan", "validate", str(out)]) == 0


def test_a_returned_seed_is_named_as_the_seed(tmp_path, capsys):
    """At the spill-free size the best seed moves nothing, which meets any bound: the heuristic returns it and
    the CLI and the plan file name the seed, not the heuristic (issue 22)."""
    out = tmp_path / "seed.json"
    assert main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "min-peak", "--planner", "heuristic",
                 "--time-limit", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["planner"] != "heuristic" and data["solver"]["details"]["requested_planner"] == "heuristic"
    assert data["traffic"]["non_compulsory_bytes"] == 0 and data["solver"]["status"] == "optimal"
    assert f"planner {data['planner']}:" in printed and "returned as it is" in printed


def test_plan_json_prints_one_object_with_the_gap_to_the_best_bound(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "min-feasible", "--planner", "whole",
                 "--time-limit", "6", "--workers", "1", "--out", str(out), "--json"]) == 0
    cap = capsys.readouterr()
    d = json.loads(cap.out)  # stdout is exactly one JSON object; the log went to stderr
    assert "scratchpad:" in cap.err and "bounds (bytes):" in cap.err
    saved = json.loads(out.read_text())
    nc = saved["traffic"]["non_compulsory_bytes"]
    assert d["non_compulsory_bytes"] == nc and d["bound_bytes"] == saved["solver"]["bound_bytes"] <= nc
    assert d["bound_bytes"] == max(p["bytes"] for p in d["lower_bound"]["parts"].values())
    assert d["gap"] == (0.0 if nc == 0 else (nc - d["bound_bytes"]) / nc)
    assert (d["status"] == "optimal") == (d["gap"] == 0.0)
    assert main(["plan", "validate", str(out), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["valid"] and v["traffic"]["non_compulsory_bytes"] == nc


def test_plan_json_errors_are_one_object_too(capsys):
    """With --json a refused request still prints exactly one JSON object on stdout (the message also on stderr)."""
    assert main(["plan", "--model", "no_such_model_xyz", "--json"]) == 2
    cap = capsys.readouterr()
    assert "unknown model 'no_such_model_xyz'" in json.loads(cap.out)["error"] and "error:" in cap.err
    assert main(["plan", "validate", "--json"]) == 2
    assert "usage" in json.loads(capsys.readouterr().out)["error"]


def test_plan_on_the_work_clock_says_so_in_its_json(capsys):
    assert main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "min-feasible", "--planner", "whole",
                 "--time-limit", "3", "--workers", "1", "--clock", "work", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["clock"]["clock"] == "work" and d["clock"]["work_s"] > 0 and "wall_capped" in d["clock"]
    assert main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "min-feasible", "--planner", "whole",
                 "--time-limit", "3", "--workers", "1", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["clock"]  # the wall clock: the call's wall time against its limit
    assert c["clock"] == "wall" and c["wall_limit_s"] == 3 and 0 < c["plan_wall_s"] <= 3 + 1


@pytest.mark.parametrize("flags, words", [(["--workers", "0"], "--workers must be at least 1"),
                                          (["--workers", "-1"], "--workers must be at least 1"),
                                          (["--out", "afile/plan.json"], "--out"),
                                          (["--plot", "afile/plan.png"], "--plot"),
                                          (["--plot", "plan.txt"], "--plot"),
                                          (["--out", "."], "is a directory")])
def test_bad_workers_and_unwritable_outputs_are_refused_before_planning(flags, words, tmp_path, capsys, monkeypatch):
    """--workers 0/-1 planned anyway (-1 returned a 'fallback' plan); --out/--plot that cannot be written were a
    traceback after the planning, its result lost."""
    import memfit.plan.graph as graph

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(graph, "graph_from_name", lambda *a, **k: pytest.fail("planned before checking the options"))
    assert main(["plan", "--model", "bert_tiny_encoder", "--json", *flags]) == 2
    out, err = capsys.readouterr()
    assert words in json.loads(out)["error"] and "Traceback" not in err


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    """Ctrl-C during a long solve was a KeyboardInterrupt traceback."""
    import memfit.plan.graph as graph

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(graph, "graph_from_name", interrupt)
    assert main(["plan", "--model", "resnet18", "--json"]) == 130
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": "interrupted"} and err.strip() == "interrupted"


@pytest.mark.parametrize("flags, words", [
    (["--scratchpad", "1e99"], "size '1e99' is 1.00e99 bytes, above the largest a plan holds: 9223372036854775807"),
    (["--scratchpad", "1e400"], "above the largest a plan holds: 9223372036854775807"),  # was an OverflowError
    (["--scratchpad", "9223372036854775808"], "above the largest a plan holds: 9223372036854775807"),
    (["--scratchpad", "8EiB"], "cannot parse size"),
    (["--scratchpad", "1e5000"], "size '1e5000' is more than 1.8e308 bytes"),  # was str()'s 4300-digit ValueError
])
def test_sizes_past_64_bits_are_refused_before_the_graph(flags, words, capsys, monkeypatch):
    """--scratchpad 1e99 planned and wrote a 100-digit scratchpad_bytes; --batch past 2^63 was torch's 'Overflow when
    unpacking long long' traceback."""
    import memfit.plan.graph as graph

    monkeypatch.setattr(graph, "graph_from_name", lambda *a, **k: pytest.fail("extracted before checking the sizes"))
    assert main(["plan", "--model", "bert_tiny_encoder", "--planner", "baseline-topo", "--json", *flags]) == 2
    out, err = capsys.readouterr()
    assert words in json.loads(out)["error"] and "Traceback" not in err


@pytest.mark.parametrize("model, flags, words", [
    ("bert_tiny_encoder", ["--batch", "10000000000000000000000"], "--batch 1.00e22 x input"),
    ("resnet18", ["--batch", str(2**62)], "--batch 4.61e18 x input 3x224x224"),  # no --input-shape: the default's
    ("resnet18", ["--batch", str(2**50), "--input-shape", "3,32,32"], "1.38e19 bytes of input alone"),  # bytes
])
def test_a_batch_whose_input_passes_64_bits_is_refused(model, flags, words, capsys):
    """--batch past 2^63 was torch's 'Overflow when unpacking long long'; 2^62 on resnet18's default input (no
    --input-shape), or 2^50 x 3x32x32 floats (under 2^63 elements, over 2^63 bytes), 'Storage size calculation
    overflowed': tracebacks, with nothing on --json's stdout."""
    assert main(["plan", "--model", model, "--planner", "baseline-topo", "--json", *flags]) == 2
    out, err = capsys.readouterr()
    msg = json.loads(out)["error"]
    assert words in msg and "above the most a tensor holds" in msg and "Traceback" not in err


@pytest.mark.parametrize("text", ["1e10000000", "0.5e-10000000"])
def test_huge_exponents_are_decided_without_building_the_number(text):
    from memfit.plan.errors import SizeParseError
    from memfit.plan.sizes import parse_size

    if text.startswith("1e"):  # Fraction('1e10000000') took 9.5 s: a float decides first
        with pytest.raises(SizeParseError, match="above the largest"):
            parse_size(text)
    else:
        assert parse_size(text) == 0


def test_the_largest_scratchpad_plans_and_a_larger_one_in_a_file_is_invalid(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["plan", "--model", "bert_tiny_encoder", "--planner", "baseline-topo", "--scratchpad",
                 str(2**63 - 1), "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scratchpad_bytes"] == 2**63 - 1  # exact: no float on the way
    data = json.loads(out.read_text())
    data["scratchpad_bytes"] = 10**99
    out.write_text(json.dumps(data))
    assert main(["plan", "validate", str(out)]) == 2
    assert "scratchpad_bytes 1.00e99 is above 9223372036854775807" in capsys.readouterr().err


@pytest.mark.parametrize("no_progress", [False, True])
def test_progress_is_on_stderr_only_and_json_stdout_still_parses(no_progress, capsys, monkeypatch):
    """A solve ran up to --time-limit with nothing on screen but '  segment k/n' lines. The bar (elapsed against the
    limit) is on stderr; stdout under --json stays exactly one object; --no-progress hides it. rich draws on a
    terminal only: TTY_COMPATIBLE/TTY_INTERACTIVE make the captured stderr one."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TTY_INTERACTIVE", "1")
    assert main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "min-feasible", "--planner", "heuristic",
                 "--time-limit", "2", "--workers", "1", "--json", *(["--no-progress"] if no_progress else [])]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["model"] == "bert_tiny_encoder" and "planning" not in out
    assert ("planning (heuristic)" in err and "/2 s" in err) != no_progress, err


def test_the_sizes_printed_are_the_extracted_graphs_before_tiling(capsys):
    """With --tile the sizes (of the graph as extracted) were printed after tiling under the tiled graph's name and
    op count ('darts_v2_cifar[tiled]: 450 ops ...; sizes: min-feasible 1.00 MiB' for a plan in 256 KiB)."""
    assert main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "96KiB", "--weights", "streamed",
                 "--planner", "baseline-topo", "--tile"]) == 0
    lines = capsys.readouterr().out.splitlines()
    sizes = next(i for i, line in enumerate(lines) if "sizes: min-feasible" in line)
    tiled = next(i for i, line in enumerate(lines) if line.startswith("tiled "))
    assert sizes < tiled and lines[sizes].startswith("bert_tiny_encoder: ") and "[tiled]" in lines[tiled]


def test_a_seed_that_meets_the_bound_is_not_said_to_beat_the_planner(capsys):
    """At min-peak the seed moves nothing and meets the bound: no search ran, so 'the heuristic planner found nothing
    better' misled; the line now says the seed meets the lower bound."""
    assert main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "min-peak", "--planner", "heuristic",
                 "--time-limit", "5"]) == 0
    printed = capsys.readouterr().out
    assert "returned as it is: it meets the lower bound" in printed and "found nothing better" not in printed


@pytest.mark.parametrize("flags, words", [(["--time-limit", "inf"], "--time-limit must be a finite number"),
                                          (["--workers", str(2**31)], "--workers must be at most 2147483647")])
def test_an_infinite_time_limit_and_workers_past_cp_sats_int32_are_refused(flags, words, capsys, monkeypatch):
    """--time-limit inf planned and printed "wall_limit_s": Infinity (not JSON) under --json and into the plan file;
    --workers 2^31 reached CP-SAT's int32 parameter as a TypeError traceback."""
    import memfit.plan.graph as graph

    monkeypatch.setattr(graph, "graph_from_name", lambda *a, **k: pytest.fail("extracted before checking"))
    assert main(["plan", "--model", "bert_tiny_encoder", "--json", *flags]) == 2
    assert words in json.loads(capsys.readouterr().out)["error"]


def test_more_workers_than_cpus_plans_with_a_warning(capsys, monkeypatch):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert main(["plan", "--model", "bert_tiny_encoder", "--scratchpad", "min-feasible", "--planner", "baseline-topo",
                 "--workers", "3", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["planner"] == "baseline-topo"
    assert "memfit plan: warning: --workers 3 is more than this machine's 2 CPUs" in err


@pytest.mark.parametrize("out, plot", [("same.png", "same.png"), ("same.png", "./sub/../same.png")])
def test_out_and_plot_naming_one_file_are_refused_before_planning(out, plot, tmp_path, capsys, monkeypatch):
    """The plot was written over the plan, and the command exited 0."""
    import memfit.plan.graph as graph

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    monkeypatch.setattr(graph, "graph_from_name", lambda *a, **k: pytest.fail("planned before the check"))
    assert main(["plan", "--model", "bert_tiny_encoder", "--out", out, "--plot", plot, "--json"]) == 2
    cap = capsys.readouterr()
    assert "is the same file as --out" in json.loads(cap.out)["error"] and "Traceback" not in cap.err
    assert not (tmp_path / "same.png").exists()


def test_an_out_onto_the_onnx_model_is_refused(tmp_path, capsys):
    model = tmp_path / "net.onnx"
    model.write_bytes(b"the user's model")
    assert main(["plan", "--model", str(model), "--out", str(model)]) == 2
    assert "is the same file as --model" in capsys.readouterr().err
    assert model.read_bytes() == b"the user's model"
