"""What one decoder of benchmarks/speculative_mtbench_four.py holds at its memory peak, step by step (issue 16: the
budgeted decoder's generation memory, where it peaks and what it consists of).

    python -m benchmarks.speculative_memory_breakdown --threads 1 --model ~/.cache/memfit/models/memfit-large \
        --draft ~/.cache/memfit/models/memfit-large-draft --conversations 16 --max-tokens 96 \
        --fit-from benchmarks/results/speculative_mtbench_four_large.json --decoder budgeted

The decoder runs as speculative_mtbench_four's worker runs it (the same engine options, warm-up, `malloc_trim` and
baseline: what the loaded engine holds without KV), and its budget, g and context are read from that benchmark's
results (`fit_bound`, the vanilla row's longest context rounded up to 64), so no `memfit fit` run is repeated.
Then, around every engine step and every model pass inside it (the target's and the draft's PyTorch passes; the
C++ decode stack's whole-step calls are inside their step), the kernel's peak (VmHWM, less file pages) is read and
reset, so each step gets its own peak, and /proc/self/smaps is read at every step boundary: the C heap ([heap]),
anonymous mappings (KV arenas, large malloc blocks, torch's buffers) and shared memory, by resident bytes.

Printed (one JSON object): the generation memory (the workload's peak above the baseline, as the four-decoder
benchmark defines it) and, for the step where it peaked and the few steps nearest it: its kind (prefill: a row of
more than one new token; decode), its model passes (rows, their own peaks), the KV both caches had committed, what
the process held beside the KV when the step began (the warm-up's residue and heap pages earlier steps freed), how
far the step rose above that, how much the C heap and the other mappings grew across it, what the process held
beside the KV after each layer of a prefill pass (where the heap's growth happens), and the step's tensors by their
shapes (`accounting.activation_bytes` of its largest target pass, the engine's own formula). Also the
highest step of each kind: prefill (the target takes a turn's new tokens), catch-up (the draft prefills them, in
the next step) and decode. The reads cost a few milliseconds a step, so throughput is
not reported here (speculative_mtbench_four measures it).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.common import emit, header, pin_threads, preset_threads
from benchmarks.speculative_mtbench import add_workload_args, conversation
from benchmarks.speculative_mtbench_four import DECODERS, QUESTIONS, engine_options

_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+\s*(.*)$")


def smaps_classes() -> dict[str, int]:
    """Resident bytes of this process by kind of mapping: the C heap ([heap]), anonymous mappings (no name:
    mmap'd malloc blocks, torch's large buffers, memfit's arenas), shared memory (memfd, /dev/shm, SysV), and the
    rest of the anonymous pages (stacks, private copies of library data)."""
    out = {"heap": 0, "anon_mappings": 0, "shared": 0, "other_anon": 0}
    kind = None
    with open("/proc/self/smaps") as f:
        for line in f:
            m = _MAPPING.match(line)
            if m:
                perms, name = m.group(1), m.group(2)
                kind = ("heap" if name == "[heap]" else "anon_mappings" if not name
                        else "shared" if perms[3] == "s" or name.startswith(("/memfd:", "/dev/shm", "/SYSV"))
                        else "other_anon")
            elif line.startswith("Rss:" if kind in ("heap", "anon_mappings", "shared") else "Anonymous:"):
                out[kind] += int(line.split()[1]) * 1024  # type: ignore[index]
    return out


class StepProbe:
    """Per-step and per-pass peaks: each `point` folds the kernel's peak since the last one (less file pages, less
    the baseline) into the open step and pass, then resets it."""

    def __init__(self, base: int, caches: list, step_rows: int) -> None:
        from memfit.memory.measure import reset_peak_rss, status_bytes

        self.base, self.caches, self._reset, self._status = base, caches, reset_peak_rss, status_bytes
        self.step_rows = step_rows  # the most rows a decode step's pass has (batch x (g + 1), bucketed)
        self.steps: list[dict] = []
        self.step: dict | None = None
        self.passes: list[dict] = []  # the open passes (a target pass may run inside nothing else)
        self.conversation = -1

    def kv(self) -> int:
        return sum(c.committed_bytes for c in self.caches)

    def point(self) -> dict:
        st = self._status()
        seg = st["VmHWM"] - st["RssFile"] - self.base
        for p in ([self.step] if self.step else []) + self.passes:
            p["peak"] = max(p["peak"], seg)
        self._reset()
        return st

    def begin_step(self) -> None:
        st = self.point()
        held = st["RssAnon"] + st.get("RssShmem", 0) - self.base
        kv = self.kv()
        self.step = {"index": len(self.steps), "conversation": self.conversation, "peak": held, "kv_at_start": kv,
                     "held_beside_kv_at_start": held - kv, "passes": [], "smaps_start": smaps_classes(),
                     "new_tokens": [], "computed_before": [], "context": 0}

    def scheduled(self, sched) -> None:  # noqa: ANN001
        """The step's rows as the scheduler hands them over (before the step computes them): new tokens, tokens
        already in the KV (0: a conversation's first prefill) and the context after the step."""
        if self.step is not None:
            self.step["new_tokens"] = [item.num_new for item in sched.scheduled]
            self.step["computed_before"] = [item.seq.num_computed for item in sched.scheduled]
            self.step["context"] = max((item.seq.num_computed + item.num_new for item in sched.scheduled), default=0)

    def end_step(self) -> None:
        self.point()
        s, self.step = self.step, None
        end = smaps_classes()
        s["grown"] = {k: end[k] - s["smaps_start"][k] for k in end}
        s["smaps_end"] = end
        s["kv_at_end"] = self.kv()
        # prefill: the target takes a row of new tokens; catch-up: the draft prefills what it has not seen (a pass
        # of more rows than a speculative step's g + 1 a sequence); decode: neither
        catch_up = any(p["model"] == "draft" and p["rows"] > self.step_rows for p in s["passes"])
        s["kind"] = "prefill" if any(n > 1 for n in s["new_tokens"]) else "catch_up" if catch_up else "decode"
        self.steps.append(s)

    def wrap_pass(self, model, who: str) -> None:  # noqa: ANN001
        forward = model.forward

        def probed(ids, *args, **kw):  # noqa: ANN001, ANN002, ANN003
            self.point()
            p = {"model": who, "rows": int(ids.shape[0]), "peak": 0}
            self.passes.append(p)
            try:
                return forward(ids, *args, **kw)
            finally:
                self.point()
                self.passes.remove(p)
                if self.step is not None:
                    self.step["passes"].append(p)

        model.forward = probed
        for i, layer in enumerate(model.model.layers):  # a prefill pass: what it holds after each layer
            layer.register_forward_hook(lambda mod, inp, out, i=i: self.layer_end(i))

    def layer_end(self, layer: int) -> None:
        """In a pass of more rows than a decode step's: note what the process holds beside the KV after `layer`
        (heap pages the layers took and did not give back, and the tensors live between layers)."""
        if self.passes and self.passes[-1]["rows"] > self.step_rows:
            st = self._status()
            held = st["RssAnon"] + st.get("RssShmem", 0) - self.base - self.kv()
            self.passes[-1].setdefault("held_beside_kv_after_layer", []).append(held)


def run(a: dict) -> dict:
    pin_threads(a["threads"])
    from memfit.llm import LLM, SamplingParams
    from memfit.llm.engine import accounting
    from memfit.memory.mapping import get_libc
    from memfit.memory.measure import anon_shmem_bytes

    lines = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    questions, warm = lines[: a["conversations"]], lines[-1]
    sp = SamplingParams(max_tokens=a["max_tokens"], temperature=0, ignore_eos=True)
    opts, sessions = engine_options(a["decoder"], a)
    llm = LLM(a["model"], **opts)
    eng = llm.engine
    caches = [eng.kv] + ([eng.spec.draft_kv] if eng.spec is not None else [])
    trim = get_libc().malloc_trim
    trim(0)  # as the four-decoder worker: what loading freed goes back first
    kv_at_load = sum(c.committed_bytes for c in caches)
    loaded_without_kv = anon_shmem_bytes() - kv_at_load
    seen = {"kv_peak": 0, "context": 0, "prompt": 0, "reused": 0}
    conversation(llm, warm, sp, "warm" if sessions else None, dict(seen))
    for c in caches:
        c.reclaim()
    trim(0)
    from memfit.llm.engine.runner import bucket_tokens

    probe = StepProbe(loaded_without_kv, caches, bucket_tokens(1 + (opts.get("num_speculative_tokens") or 0)))
    start = smaps_classes()
    probe.point()
    at_start = anon_shmem_bytes() - loaded_without_kv
    kv_start = probe.kv()
    probe.wrap_pass(eng.model, "target")
    if eng.spec is not None:
        probe.wrap_pass(eng.spec.draft.model, "draft")
    schedule, step = eng.scheduler.schedule, eng.step

    def scheduled():  # noqa: ANN202
        sched = schedule()
        probe.scheduled(sched)
        return sched

    def probed_step():  # noqa: ANN202
        probe.begin_step()
        try:
            return step()
        finally:
            probe.end_step()

    eng.scheduler.schedule, eng.step = scheduled, probed_step
    for i, q in enumerate(questions):
        probe.conversation = i
        conversation(llm, q, sp, f"c{i}" if sessions else None, seen)
    steps = probe.steps
    cfg, dtype = eng.model_config, eng.dtype
    in_place = accounting.attention_in_place(eng.device.type, dtype, eng.backends.cpu_kernels)
    block = accounting.mlp_row_block(eng.device.type, eng.backends.cpu_linear, dtype)

    def report(s: dict) -> dict:
        target = [p["rows"] for p in s["passes"] if p["model"] == "target"]
        rows = max(target, default=0)
        return {"step": s["index"], "conversation": s["conversation"], "kind": s["kind"],
                "new_tokens": s["new_tokens"], "computed_before": s["computed_before"], "context": s["context"],
                "peak_bytes": s["peak"],
                "kv_committed_at_start_bytes": s["kv_at_start"], "kv_committed_at_end_bytes": s["kv_at_end"],
                "held_beside_kv_at_start_bytes": s["held_beside_kv_at_start"],
                "rise_in_step_bytes": s["peak"] - s["kv_at_start"] - s["held_beside_kv_at_start"],
                "grown_in_step_bytes": s["grown"],
                "passes": [{"model": p["model"], "rows": p["rows"], "peak_bytes": p["peak"],
                            "held_beside_kv_after_layer_bytes": p.get("held_beside_kv_after_layer", [])}
                           for p in s["passes"]],
                "largest_target_pass_rows": rows,
                "target_pass_tensors_by_shape_bytes": accounting.activation_bytes(
                    cfg, dtype, rows, max(s["context"], rows), 1, in_place, block) if rows else 0}

    top = max(steps, key=lambda s: s["peak"])
    near = sorted(steps, key=lambda s: -s["peak"])[:5]
    kinds = ("prefill", "catch_up", "decode")
    highest = {k: max((s for s in steps if s["kind"] == k), key=lambda s: s["peak"], default=None) for k in kinds}
    end = smaps_classes()
    eng.close()
    return {"decoder": a["decoder"], "budget_bytes": opts.get("memory_budget"), "gamma": opts.get("num_speculative_tokens"),
            "max_model_len": opts.get("max_model_len"), "steps": len(steps),
            "loaded_without_kv_bytes": loaded_without_kv,
            "generation_memory_bytes": top["peak"],
            "held_at_workload_start_bytes": at_start, "kv_at_workload_start_bytes": kv_start,
            "held_beside_kv_at_workload_start_bytes": at_start - kv_start,
            "kv_committed_peak_bytes": seen["kv_peak"],
            "grown_over_workload_bytes": {k: end[k] - start[k] for k in end},
            "peak_step": report(top), "highest_steps": [report(s) for s in near],
            "highest_step_by_kind": {k: highest[k] and report(highest[k]) for k in kinds},
            "steps_by_kind": {k: sum(s["kind"] == k for s in steps) for k in kinds}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(ap)
    ap.add_argument("--decoder", choices=DECODERS, default="budgeted")
    ap.add_argument("--gamma", type=int, default=4, help="draft tokens per step (unbounded, on-demand)")
    ap.add_argument("--max-tokens", type=int, default=96, help="per turn (eos ignored)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--fit-from", required=True,
                    help="a speculative_mtbench_four result: the budget, g and context of its budgeted decoder")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    done = json.loads(Path(args.fit_from).read_text())
    vanilla = next(r for r in done["rows"] if r["decoder"] == "vanilla")
    a = {k: getattr(args, k) for k in ("threads", "model", "draft", "conversations", "gamma", "max_tokens", "dtype",
                                       "decoder")}
    a.update(budget_bytes=done["fit_bound"]["budget_bytes"], budget_gamma=done["fit_bound"]["gamma"],
             context=-(-vanilla["max_context"] // 64) * 64)  # as speculative_mtbench_four sizes it
    result = {"benchmark": "speculative_memory_breakdown", **header(args.threads), "target": args.model,
              "draft": args.draft, "conversations": args.conversations, "max_tokens": args.max_tokens,
              "dtype": args.dtype, "fit_from": args.fit_from,
              "memory": "anonymous+shared resident bytes above the loaded engine without KV (after malloc_trim); "
                        "per step: VmHWM (less file pages) read and reset around every step and model pass",
              **run(a)}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    preset_threads()
    raise SystemExit(main())
