"""`memfit train finetune`: the layer-wise trainer against plain autograd, tiers and designs against each other,
resume bit for bit, and the CLI's JSON."""
from __future__ import annotations

import dataclasses

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from memfit.llm.models import ModelConfig, build_model
from memfit.train.finetune.data import IGNORE
from memfit.train.finetune.trainer import FinetuneConfig, FinetuneError, run

TINY_SRC = Path(__file__).resolve().parents[2] / "memfit" / "assets" / "models" / "memfit-tiny"
DATA = Path("/work/shared/data/dummy_conversation.json")


def make_tiny(path: Path, tied: bool = False, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer, 64-wide Llama with memfit-tiny's tokenizer and chat template, random fp32 weights."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    raw = json.loads((TINY_SRC / "config.json").read_text())
    raw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, torch_dtype="float32", tie_word_embeddings=tied)
    (path / "config.json").write_text(json.dumps(raw))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(TINY_SRC / f, path / f)
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_dir(path))
    state = {}
    for k, v in model.state_dict().items():
        state[k] = (v * 0.05 if v.dim() == 2 else v).detach().clone().contiguous()  # small init: sane logits
    if tied:
        state.pop("lm_head.weight")
    save_file(state, str(path / "model.safetensors"))
    return path


def write_chat_data(path: Path, n: int = 12) -> Path:
    lines = []
    for i in range(n):
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        ]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tied") / "model", tied=True)


def cfg(model: Path, tmp: Path, **kw) -> FinetuneConfig:
    base = dict(model=str(model), data=str(tmp.parent / "chat.jsonl"), steps=3, batch_size=2, seq_len=48, lr=1e-3, seed=1)
    base.update(kw)
    if not Path(base["data"]).is_file():
        write_chat_data(Path(base["data"]))
    if base.get("offload") == "ssd":
        base.setdefault("ssd_dir", str(tmp / "swap"))
    return FinetuneConfig(**base)


@pytest.mark.parametrize("loss_chunk", [None, 7])
def test_gradients_equal_plain_autograd(tiny, tmp_path, monkeypatch, loss_chunk):
    """The layer-wise executor (recomputing each layer from its checkpoint) gives the gradients of one plain
    autograd pass through the engine's dense forward with the masked mean cross-entropy; also with the head's
    logits in chunks of 7 tokens (several chunks, some without any assistant token)."""
    from memfit.llm.models.loader import load_model
    from memfit.train.finetune import store as store_mod
    from memfit.train.finetune.data import batch_indices, build_examples, collate
    from memfit.llm.models.tokenizer import Tokenizer

    captured = {"grads": {}}
    real = store_mod.GroupStore.update_group

    def spy(self, gi, adam, step, scale, source=None):  # each group's gradient as AdamW gets it (streamed or flat)
        if self.streamed is not None and gi in self.streamed.blockwise:  # made piece by piece: all of it here
            flat = torch.empty(self.groups[gi].numel)
            source.fill(0, flat.numel(), flat) if source is not None else flat.zero_()
            captured["grads"][gi] = flat
        else:
            captured["grads"][gi] = self.grads[gi].clone()
        captured["groups"] = self.groups
        return real(self, gi, adam, step, scale, source)

    monkeypatch.setattr(store_mod.GroupStore, "update_group", spy)
    c = cfg(tiny, tmp_path, steps=1, dtype="float32", offload="host", data=str(DATA), loss_chunk_tokens=loss_chunk)
    result = run(c)

    model, _ = load_model(tiny, dtype="float32")
    model.requires_grad_(True)
    examples, _ = build_examples(DATA, Tokenizer(tiny), c.seq_len)
    ids, labels = collate([examples[i] for i in batch_indices(len(examples), c.batch_size, 0, c.seed)], 0)
    logits = model.dense_logits(ids)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    loss.backward()
    assert result.losses[0] == pytest.approx(loss.item(), rel=1e-5)
    params = dict(model.named_parameters())
    assert sorted(captured["grads"]) == list(range(len(captured["groups"])))
    for gi, g in enumerate(captured["groups"]):
        flat = captured["grads"][gi]
        for name, got in g.views(flat).items():
            torch.testing.assert_close(got, params[name].grad, rtol=1e-4, atol=1e-6)


def test_chunked_head_never_holds_the_whole_logits(tmp_path):
    """The head's logits in chunks of 8 tokens: the allocator's peak within the step (PyTorch's own allocation
    events, not memfit's estimate) drops by most of the (tokens x vocabulary) temporaries, the losses stay
    the same, and the plan's estimate follows the chunk. Tied embeddings: the gradient goes to the embedding."""
    model = make_tiny(tmp_path / "wide", tied=True)  # 4096-token vocabulary, 64 wide: the logits dominate
    runs = {chunk: run(cfg(model, tmp_path / str(chunk), steps=2, batch_size=2, seq_len=48, dtype="float32",
                           loss_chunk_tokens=chunk, host_memory="zero-infinity"))  # memascend: vocab blocks
            for chunk in (None, 8)}
    whole, chunked = runs[None], runs[8]
    assert chunked.losses == pytest.approx(whole.losses, rel=1e-5)
    tokens, vocab = 2 * 48, 4096
    # At least one float32 (tokens x vocabulary) matrix fewer at the peak (measured: 4.26 against 2.10 MB;
    # the logits, cross-entropy's log-softmax and the logits' gradient do not all coexist).
    saved_at_least = (tokens - 8) * vocab * 4
    assert chunked.allocator_peak_bytes < whole.allocator_peak_bytes - saved_at_least
    planned = {k: r.host_memory["planned"]["logits and loss (estimate)"] for k, r in runs.items()}
    assert planned[8] * (tokens // 8) == planned[None]


def test_loss_chunk_must_be_positive(tiny, tmp_path):
    from memfit.train.finetune.trainer import FinetuneError

    with pytest.raises(FinetuneError, match="--loss-chunk-tokens"):
        run(cfg(tiny, tmp_path, loss_chunk_tokens=0))


@pytest.mark.parametrize("offload", ["none", "host", "ssd"])
def test_tiers_and_designs_give_identical_losses(tied, tmp_path, offload):
    """Where the state lives changes no arithmetic: each design trains to its losses on the `none` tier, bit for
    bit (bf16 compute, tied embeddings). The designs differ in one piece of arithmetic: memascend's head reads
    its matrix in row blocks with an online log-sum-exp (vocab.py), so the two agree to rounding (1e-5)."""
    runs, reference = {}, {}
    for design in ("zero-infinity", "memascend"):
        runs[design] = run(cfg(tied, tmp_path / design, offload=offload, host_memory=design)).losses
        reference[design] = run(cfg(tied, tmp_path / f"ref-{design}", offload="none", grad_checkpointing="device",
                                    host_memory=design)).losses
        assert runs[design] == reference[design], design
    assert reference["memascend"] == pytest.approx(reference["zero-infinity"], rel=1e-5)
    assert reference["memascend"][-1] < reference["memascend"][0]


def test_without_recompute_same_losses_and_learns(tiny, tmp_path):
    plain = run(cfg(tiny, tmp_path, steps=8, offload="none", lr=1e-2))
    ckpt_host = run(cfg(tiny, tmp_path, steps=8, offload="none", lr=1e-2, grad_checkpointing="host"))
    assert plain.losses == ckpt_host.losses
    assert plain.host_memory["pools"]["activation checkpoints (measured)"] == 0
    assert ckpt_host.host_memory["pools"]["activation checkpoints (measured)"] > 0
    assert min(plain.losses[-3:]) < plain.losses[0] - 0.5


def test_ssd_tier_moves_the_state_through_the_swap_space(tiny, tmp_path, monkeypatch):
    from memfit.train.finetune.designs import MemAscend
    from memfit.train.finetune.units import make_groups, skeleton

    # whole groups fetched; the reads of row blocks are counted to the byte in test_finetune_vocab.py
    monkeypatch.setattr(MemAscend, "vocab_blocks", False)
    r = run(cfg(tiny, tmp_path, offload="ssd", host_memory="memascend", steps=2))
    groups = make_groups(skeleton(ModelConfig.from_dir(tiny)))
    n, head, embed = sum(g.numel for g in groups), groups[-1].numel, groups[0].numel
    # Per step: bf16 copies read in the forward (2n) and again in the backward except the head's, which
    # is fetched once for both, and the embedding's, whose backward needs no weights; fp32 master and moments
    # read and written (12n); bf16 copies written (2n); plus the initial write of the loaded weights and zero
    # moments (14n).
    reads, writes = 2 * (2 * n + 2 * (n - head - embed) + 12 * n), 3 * (12 * n + 2 * n)
    assert reads <= r.ssd["bytes_read"] <= reads * 1.05  # + rounding of each transfer to 4 KiB
    assert writes <= r.ssd["bytes_written"] <= writes * 1.05
    assert r.ssd["files"] == 1
    assert not list((tmp_path / "swap").iterdir())  # swap space removed at the end


def test_resume_is_bit_identical(tiny, tmp_path):
    full = run(cfg(tiny, tmp_path, steps=5, offload="ssd", save=str(tmp_path / "a"), save_every=2))
    part = run(cfg(tiny, tmp_path, steps=5, offload="host", resume=str(tmp_path / "a" / "step-00000002")))
    assert part.start_step == 2 and len(part.losses) == 3
    assert part.losses == full.losses[2:]
    assert part.all_losses == full.losses
    again = run(cfg(tiny, tmp_path, steps=5, resume=str(tmp_path / "a")))  # at --steps already: nothing to run
    assert again.losses == [] and again.start_step == 5


def test_checkpoint_is_a_loadable_model_and_other_models_are_refused(tiny, tied, tmp_path):
    from memfit.llm.models.loader import load_model
    from memfit.train.finetune.checkpoint import CheckpointError

    run(cfg(tiny, tmp_path, steps=2, save=str(tmp_path / "s")))
    latest = tmp_path / "s" / (tmp_path / "s" / "latest").read_text().strip()
    trained, _ = load_model(latest, dtype="float32")
    original, _ = load_model(tiny, dtype="float32")
    assert not torch.equal(trained.lm_head.weight, original.lm_head.weight)
    assert not list((tmp_path / "s").glob(".tmp-*"))
    with pytest.raises(CheckpointError, match="another model"):
        run(cfg(tied, tmp_path, steps=3, resume=str(tmp_path / "s")))


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tiny, tmp_path, monkeypatch):
    from memfit.train.finetune import designs

    calls = []

    def overflow_once(self, grads):
        calls.append(1)
        return len(calls) == 1

    monkeypatch.setattr(designs.MemAscend, "has_overflow", overflow_once)
    r = run(cfg(tiny, tmp_path, steps=1, dtype="float16", offload="host", save=str(tmp_path / "s")))
    assert r.skipped_steps == [0]
    assert r.loss_scale == 2.0**15
    from memfit.llm.models.loader import load_model

    after, _ = load_model(tmp_path / "s" / "step-00000001", dtype="float32")
    before, _ = load_model(tiny, dtype="float32")
    for (name, a), b in zip(after.state_dict().items(), before.state_dict().values()):
        assert torch.equal(a, b), name  # the skipped step left every weight alone


def test_bf16_runs_no_overflow_check(tiny, tmp_path, monkeypatch):
    """Only fp16 has a loss scale to check (DeepSpeed's ZeRO-3 checks only for float16 too): a bf16 step never
    calls the check, so zero-infinity's N-sized temporaries are neither taken nor planned."""
    from memfit.train.finetune import designs

    def must_not_run(self, grads):
        raise AssertionError("overflow check in a bf16 run")

    monkeypatch.setattr(designs.ZeroInfinity, "has_overflow", must_not_run)
    r = run(cfg(tiny, tmp_path, steps=1, offload="host", host_memory="zero-infinity"))
    assert r.skipped_steps == [] and "overflow check temporaries" not in r.host_memory["planned"]
    with pytest.raises(AssertionError, match="overflow check"):
        run(cfg(tiny, tmp_path, steps=1, dtype="float16", offload="host", host_memory="zero-infinity"))


def test_cli_json_is_one_object(tiny, tmp_path, capsys, monkeypatch):
    from memfit.cli import main
    from memfit.train.finetune import trainer

    fixed = []  # the CLI opts its process in to the fixed mmap threshold; recorded here, not applied to pytest's
    monkeypatch.setattr(trainer, "fix_mmap_threshold", lambda n: fixed.append(n) or True)
    rc = main(["train", "finetune", "--model", str(tiny), "--data", str(write_chat_data(tmp_path / "c.jsonl")),
               "--steps", "2", "--seq-len", "32",
               "--offload", "ssd", "--ssd-dir", str(tmp_path / "swap"), "--host-memory", "zero-infinity",
               "--save", str(tmp_path / "s"), "--json", "--no-progress", "--threads", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("losses", "start_step", "peak_rss_bytes", "step_seconds", "host_memory"):
        assert key in out
    assert len(out["losses"]) == 2 and out["start_step"] == 0
    # CPU time per step beside wall time: a step computes, so it takes some; threads may add more than wall time
    assert len(out["step_cpu_seconds"]) == 2 and all(c > 0 for c in out["step_cpu_seconds"])
    assert set(out["host_memory"]["pools"]) >= {"gradients", "param swap pool", "optimizer swap pool"}
    assert out["peak_rss_bytes"] >= out["host_memory"]["baseline_rss_bytes"]
    # the allocator's peak within the last step holds at least the float32 logits of the batch (1 x 32 x vocab)
    assert out["allocator_peak_bytes"] >= 32 * ModelConfig.from_dir(tiny).vocab_size * 4
    assert Path(out["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(Path(out["plot"]).with_suffix(".json").read_text())["losses"] == out["losses"]
    assert fixed == [trainer.MMAP_THRESHOLD] and out["host_memory"]["mmap_threshold"] == trainer.MMAP_THRESHOLD


def test_a_library_run_leaves_the_malloc_policy_alone_and_bad_thresholds_are_refused(tiny, tmp_path, monkeypatch):
    """mallopt holds for the rest of the process, so run() applies it only when asked (the CLI and the benchmark
    workers ask); a value glibc would ignore is refused before anything runs."""
    from memfit.train.finetune import trainer

    calls = []
    monkeypatch.setattr(trainer, "fix_mmap_threshold", lambda n: calls.append(n) or True)
    r = run(cfg(tiny, tmp_path, steps=1, offload="host"))
    assert calls == [] and r.host_memory["mmap_threshold"] is None
    for bad in (0, -1, trainer.MMAP_THRESHOLD_MAX + 1):
        with pytest.raises(FinetuneError, match="mmap_threshold"):
            run(cfg(tiny, tmp_path, steps=1, mmap_threshold=bad))
    assert calls == []


def test_cli_budget_below_minimum_prints_the_breakdown(tiny, tmp_path, capsys):
    from memfit.cli import main

    rc = main(["train", "finetune", "--model", str(tiny), "--data", str(DATA), "--steps", "1",
               "--memory-budget", "1MiB", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "below this run's minimum" in err and "gradients" in err and "model states" in err


def test_the_plan_without_running_is_the_one_a_run_checks_its_budget_against(tiny, tmp_path):
    """trainer.plan_host_memory (benchmarks/finetune_offload --plan-only) plans without running; its pools are the
    ones run() refuses a budget with, and with nothing offloaded the model states are 4+4+4 bytes of master and
    moments and 2 of the bf16 copy a parameter, counted here from the checkpoint's own tensors."""
    from safetensors import safe_open

    from memfit.train.finetune.budget import BudgetTooSmall
    from memfit.train.finetune.trainer import plan_host_memory

    with safe_open(str(tiny / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    for design in ("memascend", "zero-infinity-tuned"):
        for offload in ("none", "ssd"):
            c = cfg(tiny, tmp_path, steps=1, offload=offload, host_memory=design, dtype="bfloat16",
                    ssd_dir=str(tmp_path / "ssd"))
            plan = plan_host_memory(c)
            if offload == "none":
                assert plan.pools["model states"] == 14 * params
            with pytest.raises(BudgetTooSmall) as refused:
                run(dataclasses.replace(c, memory_budget=plan.total - 1))
            assert plan.table() in str(refused.value)
            assert not (tmp_path / "ssd").exists() or not any((tmp_path / "ssd").iterdir())  # refused before any file


def test_cli_refuses_ssd_without_dir(tiny, capsys):
    from memfit.cli import main

    rc = main(["train", "finetune", "--model", str(tiny), "--data", str(DATA), "--offload", "ssd", "--no-progress"])
    assert rc == 2 and "--ssd-dir" in capsys.readouterr().err


def test_random_initialisation_for_benchmarks(tiny, tmp_path):
    """model_config set: weights drawn as Llama initialises them (std 0.02, norms one), deterministic by seed."""
    from memfit.llm.models.loader import load_model

    shapes = ModelConfig.from_dir(tiny)
    a = run(cfg(tiny, tmp_path, steps=1, lr=1e-6, model_config=shapes, save=str(tmp_path / "a")))
    b = run(cfg(tiny, tmp_path, steps=1, lr=1e-6, model_config=shapes, offload="ssd"))
    assert a.losses == b.losses
    model, _ = load_model(tmp_path / "a" / "step-00000001", dtype="float32")
    q = model.model.layers[0].self_attn.q_proj.weight
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    assert torch.allclose(model.model.norm.weight, torch.ones_like(model.model.norm.weight), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tiers_agree_with_each_other_and_the_cpu(tiny, tmp_path):
    cuda = {off: run(cfg(tiny, tmp_path / off, offload=off, device="cuda", dtype="float32")).losses
            for off in ("none", "host", "ssd")}
    assert cuda["none"] == cuda["host"] == cuda["ssd"]
    cpu = run(cfg(tiny, tmp_path / "cpu", offload="host", dtype="float32")).losses
    assert cuda["host"] == pytest.approx(cpu, rel=1e-4)


def test_prefetch_runs_ahead_on_a_thread_and_stays_within_depth(tiny, tmp_path, monkeypatch):
    """Each fetch and each unit's compute take 20 ms more: the prefetch thread must fetch unit k+1 while unit k
    computes, and never hold more than depth + 1 units."""
    import threading
    import time

    from memfit.train.finetune import executor as ex
    from memfit.train.finetune.store import GroupStore

    events: list[tuple[str, float, str]] = []
    stores = []
    real_fetch, real_next, real_close = GroupStore.fetch, ex.Prefetcher.next, GroupStore.close
    real_forward = ex.UnitRunner.forward

    def slow_fetch(self, gi):
        out = real_fetch(self, gi)  # the slot is held from here
        time.sleep(0.02)
        events.append(("fetched", time.perf_counter(), threading.current_thread().name))
        return out

    def slow_forward(self, k, weights, state, batch):
        time.sleep(0.02)  # compute long enough that the next unit's fetch has started (even on a loaded machine)
        return real_forward(self, k, weights, state, batch)

    def next_(self):
        out = real_next(self)
        events.append(("consume", time.perf_counter(), threading.current_thread().name))
        return out

    def close(self):
        stores.append(self)
        return real_close(self)

    monkeypatch.setattr(GroupStore, "fetch", slow_fetch)
    monkeypatch.setattr(ex.Prefetcher, "next", next_)
    monkeypatch.setattr(GroupStore, "close", close)
    monkeypatch.setattr(ex.UnitRunner, "forward", slow_forward)
    run(cfg(tiny, tmp_path, steps=1, offload="ssd", prefetch_depth=1))
    # Depth 1, one group per unit (untied): at most the unit in hand and one ahead hold swap slots.
    assert stores[0].param_pool.peak_in_use_slots == 2
    fetch_threads = {t for kind, _, t in events if kind == "fetched"}
    assert fetch_threads and all(t.startswith("memfit-prefetch") for t in fetch_threads)
    # Overlap: some fetch completes while an earlier unit is in hand (between its consume and the next).
    consumes = [ts for kind, ts, _ in events if kind == "consume"]
    fetches = [ts for kind, ts, _ in events if kind == "fetched"]
    assert any(a < f < b for a, b in zip(consumes, consumes[1:]) for f in fetches)
