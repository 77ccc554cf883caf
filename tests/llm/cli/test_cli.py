"""The LLM commands, run as a user would: generate (with a memory timeline), chat, bench."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.cli import main as memfit_main
from tests.llm.tiny_models import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("cli"), family="llama", seed=5)


def test_generate_streams_text_and_writes_timeline(model_dir, tmp_path, capsys):
    tl = tmp_path / "timeline.jsonl"
    rc = memfit_main(["generate", "hello", "--model", str(model_dir), "--max-tokens", "12", "--temperature", "0",
                      "--kv-budget", "32MiB", "--timeline", str(tl), "--logprobs", "2"])
    assert rc == 0
    out = capsys.readouterr()
    assert out.out.startswith("hello")
    lp = json.loads(out.out.strip().splitlines()[-1])
    assert 1 <= len(lp) <= 12 and all(len(e["top"]) == 2 for e in lp)
    rows = [json.loads(line) for line in tl.read_text().splitlines()]
    assert len(rows) >= 2
    assert all(r["kv_committed_bytes"] >= r["kv_used_bytes"] >= 0 for r in rows)
    assert max(r["kv_used_bytes"] for r in rows) > 0 and "rss_bytes" in rows[0]
    png = tmp_path / "timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_rejects_bad_input_without_traceback(model_dir, capsys):
    assert memfit_main(["generate", "hi", "--model", str(model_dir), "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "temperature" in err and "Traceback" not in err
    assert memfit_main(["generate", "hi", "--model", str(model_dir), "--kv-budget", "lots"]) == 2
    assert "byte size" in capsys.readouterr().err
    assert memfit_main(["generate", "hi", "--model", str(model_dir.parent / "missing")]) == 2


def test_chat_keeps_kv_between_turns(model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "memfit.cli", "chat", "--model", str(model_dir), "--max-tokens", "8",
         "--temperature", "0", "--kv-budget", "32MiB"],
        input="hello there\nand again\n/quit\n", capture_output=True, text=True, timeout=120, cwd=ROOT, check=True,
    )
    assert proc.stdout.count("assistant> ") == 2
    reused = [line for line in proc.stderr.splitlines() if line.startswith("[prefilled")]
    assert len(reused) == 2
    assert "reused 0 " in reused[0]
    second = int(reused[1].split("reused ")[1].split()[0])
    assert second > 10  # the whole first turn came from the cache


def test_chat_refuses_a_turn_that_does_not_fit_and_goes_on():
    # a message past the context (or undecodable bytes) ended the whole chat with exit 2, losing the conversation;
    # the bundled model: its chat template keeps two short turns inside a 64-token context
    proc = subprocess.run(
        [sys.executable, "-m", "memfit.cli", "chat", "--model", "memfit-tiny", "--max-tokens", "4",
         "--temperature", "0", "--kv-budget", "32MiB", "--max-model-len", "64"],
        input="hello\n" + "word " * 200 + "\n\udcff\nand again\n/quit\n", capture_output=True, timeout=120,
        cwd=ROOT, text=True, errors="surrogateescape",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 2  # the first and the last line were answered
    refused = [line for line in proc.stderr.splitlines() if line.startswith("memfit chat: error:")]
    assert len(refused) == 2 and all("that message was not sent" in line for line in refused)
    assert "context" in refused[0] and "UTF-8" in refused[1]
    reused = [line for line in proc.stderr.splitlines() if line.startswith("[prefilled")]
    assert int(reused[1].split("reused ")[1].split()[0]) > 0  # the last turn continued the first one's KV


def test_bench_prints_json(model_dir, capsys):
    rc = memfit_main(["bench", "--model", str(model_dir), "--num-prompts", "3", "--input-len", "8",
                      "--output-len", "4", "--threads", "1", "--kv-budget", "32MiB"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert r["generated_tokens"] == 12 and r["output_tokens_per_s"] > 0
    assert r["kv_committed_peak_bytes"] > 0 and r["peak_rss_bytes"] > 0
    # --json, which every other command with JSON output takes, is accepted and changes nothing (it was an error)
    rc = memfit_main(["bench", "--model", str(model_dir), "--num-prompts", "1", "--input-len", "4",
                      "--output-len", "2", "--threads", "1", "--kv-budget", "32MiB", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["generated_tokens"] == 2


def test_fit_reads_a_budget_fraction_as_a_share_of_memory(capsys):
    # `memfit fit --kv-budget 0.3` used to read the fraction as 0 bytes; budgets now parse one way everywhere.
    import psutil

    for spelling in ("0.3", "30%"):
        # available memory moves while other processes run: bracket memfit's reading with two independent ones
        before = psutil.virtual_memory().available
        assert memfit_main(["fit", "--kv-budget", spelling, "--context", "256", "--json"]) == 0
        after = psutil.virtual_memory().available
        got = json.loads(capsys.readouterr().out)["kv_budget_bytes"]
        assert 0.29 * min(before, after) <= got <= 0.31 * max(before, after), (spelling, got, before, after)
    assert memfit_main(["fit", "--kv-budget", "1.5", "--context", "256"]) == 2
    assert "fraction must be in (0, 1]" in capsys.readouterr().err


def test_every_engine_command_takes_the_same_engine_flags():
    # One command-line layer: generate, chat, bench and serve all expose add_engine_args' flags, and
    # EngineConfig.from_args turns any of them into the same config.
    import argparse

    from memfit.cli import build_parser
    from memfit.llm.engine.config import EngineConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    argv = ["--model", "m", "--kv-budget", "0.25", "--max-num-seqs", "3", "--kv-cache", "paged", "--cpu-linear", "memfit",
            "--no-cpu-kernels", "--threads", "1", "--kv-layout", "per-layer", "--max-model-len", "64"]
    configs = {}
    for cmd, extra in (("generate", ["hi"]), ("chat", []), ("bench", []), ("serve", [])):
        args = sub.choices[cmd].parse_args(extra + argv)
        configs[cmd] = EngineConfig.from_args(args)
    base = {k: v for k, v in vars(configs["generate"]).items() if k != "max_waiting"}
    for cmd, cfg in configs.items():
        assert {k: v for k, v in vars(cfg).items() if k != "max_waiting"} == base, cmd
    assert base["kv_budget"] == 0.25 and base["kv_cache"] == "paged" and base["cpu_kernels"] is False
    assert configs["serve"].max_waiting == 256  # serve's own default queue limit reaches the engine


def test_ssd_swap_short_form_equals_the_two_long_flags(tmp_path):
    """The issue's spelling `--ssd-swap DIR:SIZE` sets the same config as --swap-ssd-path and --swap-ssd-space; a
    directory whose name holds a colon keeps it when the size is given; two different directories are refused."""
    import argparse

    from memfit.cli import build_parser
    from memfit.llm.engine.config import EngineConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = sub.choices["serve"]
    swap = ["--preemption-mode", "swap"]
    short = EngineConfig.from_args(serve.parse_args(swap + ["--ssd-swap", f"{tmp_path}:64GiB"]))
    long = EngineConfig.from_args(serve.parse_args(swap + ["--swap-ssd-path", str(tmp_path), "--swap-ssd-space", "64GiB"]))
    assert (short.swap_ssd_path, short.swap_ssd_space) == (long.swap_ssd_path, long.swap_ssd_space) == (str(tmp_path), "64GiB")
    bare = EngineConfig.from_args(serve.parse_args(swap + ["--ssd-swap", str(tmp_path)]))
    assert (bare.swap_ssd_path, bare.swap_ssd_space) == (str(tmp_path), None)
    colon = EngineConfig.from_args(serve.parse_args(swap + ["--ssd-swap", "/tmp/a:b:8GiB"]))
    assert (colon.swap_ssd_path, colon.swap_ssd_space) == ("/tmp/a:b", "8GiB")
    # a colon in the directory's name and no size after it: all of it is the directory
    colon_only = EngineConfig.from_args(serve.parse_args(swap + ["--ssd-swap", "/tmp/a:b"]))
    assert (colon_only.swap_ssd_path, colon_only.swap_ssd_space) == ("/tmp/a:b", None)
    for bad in ("0", "-1", "64XB", "inf"):  # a size after the colon, a bad one: refused as a size, not a directory
        with pytest.raises(ValueError, match="swap_ssd_space"):
            EngineConfig.from_args(serve.parse_args(swap + ["--ssd-swap", f"{tmp_path}:{bad}"]))
    with pytest.raises(ValueError, match="is empty: name the directory"):
        EngineConfig.from_args(serve.parse_args(swap + ["--ssd-swap", ":1GiB"]))
    with pytest.raises(ValueError, match="two directories"):
        EngineConfig.from_args(serve.parse_args(swap + ["--ssd-swap", "/x:1GiB", "--swap-ssd-path", "/y"]))


@pytest.mark.parametrize("flags", [["--swap-space", "8GiB"], ["--ssd-swap", "/tmp:64GiB"],
                                   ["--swap-space", "8", "--swap-ssd-path", "/tmp"]])
def test_swap_flags_under_recompute_preemption_are_refused(flags, capsys):
    """Issue 15: the swap tiers serve swap preemption only; asked for under the default recompute mode they were
    silently never built (the directory never checked): now the command refuses and says what to add."""
    assert memfit_main(["generate", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert "--preemption-mode recompute (the default) never uses" in err and "--preemption-mode swap" in err


@pytest.mark.parametrize("argv", [["generate", "hi", "--preemption-mode", "swap", "--swap-space", "1e999"],
                                  ["fit", "--json", "--memory-budget", "1e999GiB"],
                                  ["generate", "hi", "--max-tokens", "1", "--threads", "1", "--preemption-mode", "swap",
                                   "--ssd-swap", "/nonexistent/memfit-dir:1GiB"]])
def test_infinite_sizes_and_a_missing_swap_directory_are_refused_as_user_errors(argv, capsys):
    """A size that is not finite (int(inf) raised OverflowError) and an SSD tier's missing directory (SwapSpaceError
    was an OSError only) gave a traceback and exit 1; now `error: ...` and exit 2, and --json its one object."""
    assert memfit_main([*argv, "--model", "memfit-tiny"] if argv[0] == "fit" else argv) == 2
    out, err = capsys.readouterr()
    assert "error:" in err and "Traceback" not in err
    assert "not a finite number" in err or "does not exist" in err
    if "--json" in argv:
        assert json.loads(out)["error"]


def test_speculative_flags_on_generate_and_fit(capsys):
    """--speculative-model on generate (lossless: the same greedy text) and on fit (the draft's parts and the
    smallest budget, here from given acceptance and costs, so nothing is timed)."""
    base = ["generate", "Once upon a time", "--max-tokens", "16", "--temperature", "0", "--threads", "1", "--dtype",
            "float32"]  # float32: identical greedy tokens (bf16 may differ at exact near-ties)
    assert memfit_main(base) == 0
    plain = capsys.readouterr().out
    assert memfit_main(base + ["--speculative-model", "memfit-tiny-draft", "--num-speculative-tokens", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == plain.splitlines()[0]
    assert memfit_main(["generate", "x", "--speculative-model", "memfit-tiny-draft", "--num-speculative-tokens", "0"]) == 2
    args = ["fit", "--context", "256", "--batch", "2", "--no-runtime", "--speculative-model", "memfit-tiny-draft",
            "--num-speculative-tokens", "6", "--acceptance", "0.8", "--draft-cost", "0.1", "--verify-cost", "1.0", "--json"]
    assert memfit_main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["draft_weights_bytes"] > 0 and out["speculative_bytes"] > out["draft_weights_bytes"]
    bound = out["speculative_bound"]
    assert bound["best_gamma"] == 6 and 1 <= bound["gamma"] <= 6 and bound["speedup"] >= 0.95 * bound["best_speedup"]
    assert bound["budget_bytes"] <= out["total_bytes"]  # a smaller g than the largest needs no more memory


def test_speculative_tree_flag_on_generate(capsys):
    """--speculative-tree W,D on generate: the same greedy text as plain decoding; a bad shape is refused with a
    clear error (exit code 2)."""
    base = ["generate", "Once upon a time", "--max-tokens", "16", "--temperature", "0", "--threads", "1", "--dtype",
            "float32"]
    assert memfit_main(base) == 0
    plain = capsys.readouterr().out
    assert memfit_main(base + ["--speculative-model", "memfit-tiny-draft", "--speculative-tree", "2,3"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == plain.splitlines()[0]
    assert memfit_main(["generate", "x", "--speculative-model", "memfit-tiny-draft", "--tree", "0,3"]) == 2
    assert "at least 1" in capsys.readouterr().err


SWAP = ["--preemption-mode", "swap", "--threads", "1"]
SAMPLING = ["--max-tokens", "2", "--temperature", "0"]


@pytest.mark.parametrize("prompt", ["hello", "word " * 300])  # the second is past --max-model-len: refused
def test_generate_removes_its_ssd_swap_file(model_dir, tmp_path, prompt, capsys):
    """The preallocated SSD swap tier's file stayed in its folder after every run (the engine was never closed),
    on the success path and the refusal path alike."""
    ssd = tmp_path / "ssd"
    ssd.mkdir()
    rc = memfit_main(["generate", prompt, "--model", str(model_dir), "--max-model-len", "64", "--ssd-swap",
                      f"{ssd}:1MiB", *SWAP, *SAMPLING])
    assert rc == (0 if prompt == "hello" else 2)
    assert "Traceback" not in capsys.readouterr().err
    assert list(ssd.iterdir()) == []


def test_chat_and_bench_remove_their_ssd_swap_file(model_dir, tmp_path, monkeypatch, capsys):
    import io

    ssd = tmp_path / "ssd"
    ssd.mkdir()
    flags = ["--model", str(model_dir), "--ssd-swap", f"{ssd}:1MiB", *SWAP]
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/quit\n"))
    assert memfit_main(["chat", *flags, *SAMPLING]) == 0
    assert capsys.readouterr().out.count("assistant> ") == 1
    assert list(ssd.iterdir()) == []
    bench = ["bench", "--num-prompts", "1", "--output-len", "2", *flags]
    assert memfit_main(bench + ["--input-len", "4"]) == 0
    assert list(ssd.iterdir()) == []
    assert memfit_main(bench + ["--input-len", "100", "--max-model-len", "64", "--json"]) == 2  # refused prompt
    assert "context" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert list(ssd.iterdir()) == []


@pytest.mark.parametrize("timeline, plot", [("tl", "tl.png"), ("./tl", "tl.png"),
                                            ("v1.2/timeline", "v1.2/timeline.png"), ("out/tl.jsonl", "out/tl.png")])
def test_the_timeline_plot_replaces_the_suffix_only(model_dir, tmp_path, monkeypatch, timeline, plot):
    """The plot's name was `rsplit('.')`'s: ./tl wrote ./.png, v1.2/timeline wrote v1.png outside its folder."""
    monkeypatch.chdir(tmp_path)
    assert memfit_main(["generate", "hi", "--model", str(model_dir), "--max-tokens", "2", "--threads", "1",
                        "--timeline", timeline]) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted([str(Path(timeline)), plot])
    assert (tmp_path / plot).read_bytes()[:4] == b"\x89PNG"
    assert "kv_committed_bytes" in json.loads((tmp_path / timeline).read_text().splitlines()[0])


def test_a_timeline_path_that_cannot_be_written_is_refused_before_generating(model_dir, tmp_path, monkeypatch,
                                                                             capsys):
    """A .png name had its JSON lines overwritten by the plot; a folder, a path under a file or an unwritable place
    gave a traceback after the generation, or a message that did not name --timeline."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some_dir").mkdir()
    (tmp_path / "afile").write_text("kept")
    for timeline, words in (("tl.png", "give the JSON-lines file"), ("some_dir/", "is a directory"),
                            ("afile/x.jsonl", "is a file, not a folder"), ("/proc/x.jsonl", "cannot write")):
        for command in (["generate", "hi", "--max-tokens", "2"], ["chat"], ["bench", "--json"]):
            rc = memfit_main([*command, "--model", str(model_dir), "--timeline", timeline])
            assert rc == 2, (command, timeline)
            out = capsys.readouterr()
            line = out.err.strip()
            assert line.startswith(f"memfit {command[0]}: error: --timeline {timeline}") and words in line, line
            assert "\n" not in line and "Traceback" not in line
            assert out.out == ('{"error": ' + json.dumps(line.split(": error: ", 1)[1]) + "}\n"
                               if "--json" in command else "")  # refused before the prompt was echoed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "some_dir"]
    assert (tmp_path / "afile").read_text() == "kept" and not any((tmp_path / "some_dir").iterdir())


def test_every_llm_command_option_says_what_it_does():
    import argparse

    from memfit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("generate", "chat", "bench", "serve", "fit"):
        missing = [a.option_strings[0] for a in sub.choices[name]._actions if a.option_strings and not a.help]
        assert missing == [], (name, missing)
    bench_json = next(a for a in sub.choices["bench"]._actions if "--json" in a.option_strings)
    assert "always" not in bench_json.help  # a refusal without --json prints nothing on stdout


def test_bench_refusal_prints_json_only_with_json(model_dir, capsys):
    assert memfit_main(["bench", "--model", str(model_dir), "--num-prompts", "0"]) == 2
    assert capsys.readouterr().out == ""
    assert memfit_main(["bench", "--model", str(model_dir), "--num-prompts", "0", "--json"]) == 2
    assert "--num-prompts" in json.loads(capsys.readouterr().out)["error"]


def test_a_memory_budget_past_the_machines_memory_is_warned_about_on_the_cpu(monkeypatch, capsys):
    """generate, chat, bench and serve took --memory-budget 1000TiB silently (fit and train finetune warned): the
    engine's config warns now, on the CPU, where the budget is of the machine's memory; on a GPU it is of the
    device's, and the machine's total says nothing about it."""
    import torch

    import memfit.llm.engine.llm_engine as llm_engine
    from memfit.llm.cli import serve

    def stop(config):
        raise ValueError("stopped by the test")  # the warning comes before the model loads

    monkeypatch.setattr(llm_engine, "LLMEngine", stop)
    warning = "memfit generate: warning: --memory-budget 1000TiB (1000.00 TiB) is more than this machine's memory"
    assert memfit_main(["generate", "hi", "--device", "cpu", "--memory-budget", "1000TiB"]) == 2
    err = capsys.readouterr().err
    assert warning in err and "stopped by the test" in err
    for small in ("64MiB", "0.5"):  # within the machine's memory (a fraction always is): silent
        assert memfit_main(["generate", "hi", "--device", "cpu", "--memory-budget", small]) == 2
        assert "warning" not in capsys.readouterr().err
    args = sub_parser("serve").parse_args(["--device", "cpu", "--memory-budget", "1000TiB"])
    assert serve.engine_config(args).memory_budget == 1000 * 2**40  # serve builds its config the same way
    assert "warning: --memory-budget 1000TiB" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU: the budget is of its memory
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert memfit_main(["generate", "hi", "--device", "cuda", "--memory-budget", "1000TiB"]) == 2
    assert "warning" not in capsys.readouterr().err


def sub_parser(command: str):
    import argparse

    from memfit.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]
