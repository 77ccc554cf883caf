"""benchmarks/prefill.py's memfit systems: the unfused one really runs the MLP as before the fused store."""
from __future__ import annotations

import pytest
import torch

from benchmarks.prefill import memfit_system, timed_parts
from memfit.llm.kernels.prefill import available


@pytest.mark.skipif(not available(torch.bfloat16), reason="memfit's bf16 CPU kernels are unavailable here")
def test_the_unfused_system_runs_silu_mul_apart_and_the_default_does_not():
    prompts = [[(7 * i + j) % 4000 + 1 for j in range(48)] for i in range(4)]  # 192 rows: 3 x 64-row MLP blocks
    calls = {}
    for name, unfused in (("default", False), ("unfused", True)):
        run, close = memfit_system("memfit-tiny", "auto", False, unfused=unfused)
        try:
            parts: dict[str, float] = {}
            with timed_parts(parts):
                run(prompts)
            calls[name] = parts
        finally:
            close()
    # the default fuses SiLU x up into the gate/up matmul's store; the unfused system runs the separate kernel
    assert "matmul_silu_s" in calls["default"] and "rest_silu_mul_s" not in calls["default"]
    assert "rest_silu_mul_s" in calls["unfused"] and "matmul_silu_s" not in calls["unfused"]


@pytest.mark.skipif(not available(torch.bfloat16), reason="memfit's bf16 CPU kernels are unavailable here")
def test_the_llamacpp_system_gives_memfits_greedy_next_tokens(tmp_path):
    """benchmarks/prefill.py's llama.cpp peer (skipped without llama-cpp-python): the trained tiny model written to
    GGUF, a batch of prompts through one llama_decode call at each setting the benchmark tries; every prompt's greedy
    next token is memfit's for the same prompt (a wrong logits row, a prompt's tokens under another sequence id, a
    mis-permuted q/k or a stale KV cache from the run before would part them), and the single-prompt run after the
    batch (the KV cleared in between) gives that prompt's token again."""
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from pathlib import Path

    import memfit
    from benchmarks.decode_llamacpp import write_gguf
    from benchmarks.prefill import llamacpp_settings, llamacpp_system

    src = Path(memfit.__file__).parent / "assets" / "models" / "memfit-tiny"
    gguf = tmp_path / "tiny.gguf"
    write_gguf(src, gguf)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 4096, (n,), generator=g).tolist() for n in (40, 17, 64, 33, 1, 50)]
    run, close = memfit_system(str(src), "auto", False)
    try:
        ours = run(prompts)["next_tokens"]
        alone = run(prompts[2:3])["next_tokens"]
    finally:
        close()
    assert alone == ours[2:3]
    assert len(set(ours)) > 1  # distinct prompts, distinct answers: a constant token can't pass
    for name, kw in llamacpp_settings([16, 512]).items():  # 16: the batch in several ubatches
        run, close = llamacpp_system(src, gguf, len(prompts), 64, 1, **kw)
        try:
            got = run(prompts)
            assert got["next_tokens"] == ours, name
            assert got["cpu"] > 0 and got["ttft_cpu"] == got["cpu"]
            assert run(prompts[2:3])["next_tokens"] == ours[2:3], name
        finally:
            close()
