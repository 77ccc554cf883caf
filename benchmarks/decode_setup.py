"""What the decode benchmarks share (decode_throughput, decode_llamacpp, decode_kernels): the model shapes, a
random-initialised checkpoint on disk, memfit's decode rate, and the machine's streaming-read bandwidth.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import time_calls

SHAPES = {
    # ~0.1B: a GPT-2-small-sized Llama with GQA.
    "0.1b": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000),
    # ~0.5B: Qwen2.5-0.5B's shape (tied embeddings, 14 heads / 2 KV heads).
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # ~1.2B: Llama-3.2-1B's shape (32 heads / 8 KV heads of 64: 1 KiB of K a token a layer, tied embeddings)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
}


def cpu_bf16_decode_ops():
    """memfit's bf16 CPU decode kernels (kernels/decode.py's CpuDecodeOps), or None after saying on stderr why they
    do not run here (the kernel benchmarks then exit 2)."""
    import sys

    from memfit.llm.kernels.build import unavailable_reason
    from memfit.llm.kernels.decode import CpuDecodeOps

    reason = unavailable_reason(torch.bfloat16)
    if reason is not None:
        print(f"memfit's CPU kernels do not run here: {reason}", file=sys.stderr)
        return None
    return CpuDecodeOps(torch.bfloat16)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(threads: int, device: torch.device, nbytes: int = 1 << 30, reps: int = 5,
                      detail: dict | None = None) -> float:
    """Bytes/s of the fastest streaming read we can measure over a buffer far larger than the caches,
    best of `reps`: torch's sum, and on a CPU also memfit's row-major and blocked GEMV kernels reading a
    1-row product with an (N, 1024) matrix of the same size (a plain sequential read of every byte). The
    fastest defines the limit, so a fraction of it above 1 can't come from a slow reference read. `detail`
    receives each rate."""
    torch.set_num_threads(threads)
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)

    # read on the clock the decode rates are read on (decode_clock), so a fraction of the limit compares like
    # with like: a wall-clock reading under load lowers the limit and flatters the CPU-time rates
    clock = decode_clock(device)

    def timed(fn) -> float:  # the best rep, not the median: a limit is the fastest read this machine did
        return nbytes / min(time_calls(fn, reps, clock=clock, sync=lambda: sync(device)))

    rates = {"torch_sum": timed(buf.sum)}
    if device.type == "cpu":
        from memfit.llm.kernels.build import get_cpu_linear

        fn = get_cpu_linear(torch.float32)
        if fn is not None:
            k = 1024
            w = buf.view(-1, k)  # (N, K) fp32, row-major: the kernel streams it start to end once
            x = torch.ones(1, k)
            y = torch.empty(1, w.shape[0])
            rates["memfit_gemv"] = timed(lambda: fn(x.data_ptr(), k, w.data_ptr(), None, y.data_ptr(), w.shape[0], 1,
                                                     w.shape[0], k, threads))
        from memfit.llm.kernels.blocked import can_use_blocked, pack_blocked

        if can_use_blocked(torch.float32):  # the same bytes packed for the blocked kernel, read by a 1-row product
            lin = torch.nn.Linear(1024, nbytes // 4 // 1024, bias=False)
            with torch.no_grad():
                lin.weight = torch.nn.Parameter(buf.view(-1, 1024), requires_grad=False)
            # on huge pages, as the engine holds its packed weights: the fastest read this process can do
            (blocked,) = pack_blocked([lin], nthreads=threads)
            del lin
            xb = torch.ones(1, 1024)
            with torch.inference_mode():
                rates["memfit_blocked_gemv"] = timed(lambda: blocked(xb))
            del blocked
    del buf
    if detail is not None:
        detail.update(rates)
    return max(rates.values())


def make_model_dir(shape: str, dtype: str, root: Path) -> Path:
    """A random-initialised Llama checkpoint in Hugging Face format (config + safetensors + tokenizer)."""
    from safetensors.torch import save_file

    from memfit.llm.models.config import ModelConfig
    from memfit.llm.models.llama import LlamaForCausalLM

    spec = SHAPES[shape]
    hf = dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=4096,
              rms_norm_eps=1e-6, rope_theta=10000.0, torch_dtype=dtype, tie_word_embeddings=False)
    hf.update(spec)
    hf["head_dim"] = spec["hidden_size"] // spec["num_attention_heads"]
    path = root / f"llama-{shape}-{dtype}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelConfig.from_hf_dict(hf)).to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if hf.get("tie_word_embeddings"):
        sd.pop("lm_head.weight")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    # The benchmark feeds token ids; the engine still wants a tokenizer file, so write a minimal one.
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel(vocab={"<unk>": 0}, unk_token="<unk>")).save(str(path / "tokenizer.json"))
    return path


def decode_clock(device: torch.device, threads: int | None = None) -> Callable[[], float]:
    """The clock every system's decode time (and the bandwidth the limit is read from) is read on: with one CPU
    thread the process's CPU time (it leaves out the time other jobs on a shared machine hold the core, though not
    what their memory traffic and cache use add to a memory-bound step; on a quiet machine it is the wall time),
    else (several threads, a GPU) the wall time. benchmarks/decode_vllm.py reads vLLM's side on the clock this
    names (`vllm_command`). `threads`: torch's setting by default."""
    one = (threads if threads is not None else torch.get_num_threads()) == 1
    return time.process_time if device.type == "cpu" and one else time.perf_counter


def clock_name(clock: Callable[[], float]) -> str:
    return "process CPU time" if clock is time.process_time else "wall"


def run_memfit(path: Path, dtype: str, batch: int, prompt_len: int, new_tokens: int, device: torch.device,
               kv_layout: str = "auto", cpu_linear: str = "auto", kv_cache: str | None = None) -> dict:
    from memfit.llm.engine import EngineConfig, LLMEngine
    from memfit.llm.engine.params import SamplingParams

    kv = {"kv_cache": kv_cache} if kv_cache else {}  # None: the engine's default cache
    engine = LLMEngine(EngineConfig(model=str(path), dtype=dtype, kv_budget="4GiB", max_num_seqs=max(batch, 1),
                                    max_num_batched_tokens=max(512, batch * prompt_len),
                                    max_model_len=max(1024, prompt_len + new_tokens), device=str(device),
                                    kv_layout=kv_layout, cpu_linear=cpu_linear, **kv))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    for i in range(batch):
        ids = torch.randint(0, engine.model_config.vocab_size, (prompt_len,), generator=g).tolist()
        engine.add_request(prompt_token_ids=ids, params=params)
    clock = decode_clock(device)
    first_step_done = first_wall = None
    generated = 0
    while engine.has_unfinished_requests():
        outs = engine.step()  # returns after the sampled ids reached the host: no sync needed
        if first_step_done is None:  # prefill (and the first token) done
            first_step_done, first_wall = clock(), time.perf_counter()
            continue
        generated += len(outs)
    elapsed = clock() - first_step_done
    wall = time.perf_counter() - first_wall
    engine.close()
    return {"decode_tokens": generated, "decode_s": elapsed, "decode_wall_s": wall,
            "timer": clock_name(clock), "tok_per_s": generated / elapsed}
