"""The ledger's step figure where memfit's CPU kernels don't run (a CPU without AVX-512: float32 linears on oneDNN,
bf16 on `upcast`, PyTorch's attention): an upper bound of what every step really takes, read from the kernel (the
step's peak RSS, VmHWM reset before it after malloc_trim, less the KV pages the step committed), for every step of a
workload of 1 to 240 rows, plain and speculative, in float32 and bfloat16, and each prefill step against the figure
at its own row count; on a CPU where memfit's kernels run, in a process that hides them (MEMFIT_CPU_ISA=avx2), so the
path is measured on every machine. Before the fallback terms (engine/fallback_accounting.py) a 224-row float32 step peaked at
6.3 MiB against a 4.4 MiB figure."""
from __future__ import annotations

import pytest
import torch

from memfit.llm.engine import accounting
from memfit.llm.engine.runner import bucket_tokens
from memfit.llm.kernels import build
from memfit.memory.measure import reset_peak_rss
from tests.llm.engine.test_arena_ledger import CONFIG, SPEC, _measured_steps, conclusive_steps, in_own_process


STEP_NOISE = 512 * 1024  # the per-step noise of the peak RSS on this path (see below)


@pytest.mark.parametrize("isa", ["native", "avx2"])
@pytest.mark.parametrize("spec", ["plain", "chain"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_fallback_step_takes_no_more_than_the_ledger_reserves_for_it(dtype, spec, isa, monkeypatch, request):
    """isa "avx2": on a CPU where memfit's kernels run, the same path with them hidden (MEMFIT_CPU_ISA=avx2, as on a
    CPU without AVX-512), so that this path is measured on every machine."""
    from memfit.llm.engine.api import LLM

    runs_kernels = build.unavailable_reason(getattr(torch, dtype)) is None
    if isa == "native" and runs_kernels:
        pytest.skip(f"memfit's CPU kernels run {dtype} here: the avx2 case measures this path with them hidden")
    if isa != "native" and build.isa_cap() != isa and not runs_kernels:  # (the child runs capped)
        pytest.skip(f"memfit's CPU kernels do not run {dtype} here: the native case is this path")
    if not reset_peak_rss():
        pytest.skip("the kernel's peak RSS cannot be reset here (/proc/self/clear_refs)")
    if in_own_process(request, isa):
        return
    eng = LLM(dtype=dtype, **CONFIG, **SPEC[spec]).engine
    try:
        assert eng.runner.scratch is None  # no step arena on this path: the pre-arena figure
        parts = eng.ledger.by_owner()
        reserved = parts["step"] + parts.get("draft_step", 0)
        steps = conclusive_steps(_measured_steps(eng, monkeypatch))
        assert max(s["peak"] for s in steps) <= reserved, (reserved, sorted(s["peak"] for s in steps)[-5:])
        # each prefill step against the figure at its own size (its largest pass, padded as the runner pads it).
        # Decode steps' own figures are a few hundred KiB, the size of the per-step noise the ledger's measured
        # runtime share covers (allocator top pad, Python objects: a 1-row bf16 step peaked 240-412 KiB in two runs);
        # the reservation above bounds them.
        # A prefill step's own figure is checked within STEP_NOISE: in the full suite (a process after many other
        # tests, its heap laid out differently) a 96-row float32 step peaked 192 KiB above its 2.8 MiB figure, while
        # run alone it stays below; the reservation above, which the engine holds, is checked strictly. Before the
        # fallback terms the figure was short by 1.9 MiB at 224 rows, which this check still catches.
        cfg, dt = eng.model_config, eng.dtype
        prefills = [s for s in steps if max(s["rows"], default=0) >= 64]
        for s in prefills:
            n = bucket_tokens(max(s["rows"]))
            bound = accounting.step_bytes(cfg, dt, n, eng.max_model_len, s["sampled"],
                                         packed=eng.backends.cpu_linear == "onednn")
            if spec != "plain":
                bound += parts["draft_step"]
            assert s["peak"] <= bound + STEP_NOISE, (s, bound)
        assert len({max(s["rows"]) for s in prefills}) >= 4  # several row counts were measured (96 to 256)
    finally:
        eng.close()
