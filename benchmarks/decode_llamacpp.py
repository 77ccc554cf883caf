"""Decode throughput of memfit against llama.cpp (through llama-cpp-python), side by side in one run.

The same random-initialised Llama checkpoints as benchmarks.decode_throughput are written to GGUF
(same weights, same dtype: bf16 or f32; q/k rows permuted to llama.cpp's rope layout as its own converter
does; no tokenizer: token ids are fed directly), and both engines decode the same number of tokens from
random prompts with greedy sampling at each batch size. llama.cpp decodes a batch through its low-level API
(one sequence id per request), at each of its settings that matter here: its KV as one stream a sequence
(llama.cpp's default) and as one unified cache, flash attention at its default (on) and off; the fastest is
the row's figure, each setting's in the JSON. The rate excludes prefill.

llama-cpp-python is an optional peer, not a memfit dependency: it builds from source (about 15 minutes on
2 cores) with `pip install llama-cpp-python gguf`. Without it the script says so and exits 2.

The GGUF writer and the llama.cpp helpers here (open_llamacpp, submit, greedy) also serve benchmarks/prefill.py's
llama.cpp peer.

    OMP_NUM_THREADS=1 python -m benchmarks.decode_llamacpp --threads 1 --shapes 0.1b --dtypes bfloat16 --batches 1 8 32

Prints one JSON object; --out also writes it and a PNG beside it.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import emit, header, pin_threads
from benchmarks.decode_setup import SHAPES, clock_name, decode_clock, make_model_dir, measure_bandwidth, run_memfit


def write_gguf(src: Path, dst: Path) -> None:
    """HF Llama safetensors dir -> GGUF (llama arch) with the same tensors and dtype."""
    import gguf
    from safetensors import safe_open

    cfg = json.loads((src / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("none")  # token ids in, logits out
    bf16 = cfg["torch_dtype"] == "bfloat16"
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if bf16 else gguf.LlamaFileType.ALL_F32)

    def permute(t: torch.Tensor, n: int) -> torch.Tensor:  # HF rotate-half rows -> llama.cpp interleaved rope
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.startswith("model.layers."):
                i, rest = key[len("model.layers."):].split(".", 1)
                part = rest.rsplit(".", 1)[0]
                name = f"blk.{i}.{per_layer[part]}.weight"
                if part == "self_attn.q_proj":
                    t = permute(t, heads)
                elif part == "self_attn.k_proj":
                    t = permute(t, kv_heads)
            else:
                name = names[key]
            if t.dim() == 1 or not bf16:  # norms stay f32, as llama.cpp's converter writes them
                w.add_tensor(name, t.float().numpy())
            else:
                w.add_tensor(name, t.contiguous().view(torch.int16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llamacpp_missing() -> str | None:
    """Why the llama.cpp peer can't run here (llama-cpp-python or gguf not importable), or None."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama.cpp peer not installed ({exc}); pip install llama-cpp-python gguf"
    return None


_QUIET = None


def quiet_llamacpp() -> None:
    """llama.cpp's log off (it writes every load and context to stderr)."""
    global _QUIET  # the C side keeps the pointer: keep the callback alive
    import llama_cpp as L

    if _QUIET is None:
        _QUIET = L.llama_log_callback(lambda *a: None)
        L.llama_log_set(_QUIET, ctypes.c_void_p())


def open_llamacpp(path: Path, n_ctx: int, threads: int, n_batch: int | None = None, n_ubatch: int | None = None,
                  n_seq_max: int = 1, unified: bool = False, flash: bool | None = None):
    """(model, context, batch) for a GGUF: a context of n_ctx cells (split over n_seq_max streams unless unified),
    n_batch tokens a llama_decode call computed n_ubatch at a time (None: llama.cpp's defaults, 2048 and 512),
    flash attention on/off (None: llama.cpp's default, auto: on here), and a llama_batch of n_batch tokens."""
    import llama_cpp as L

    model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = n_ctx
    if n_batch is not None:
        cp.n_batch = n_batch
    if n_ubatch is not None:
        cp.n_ubatch = n_ubatch
    cp.n_seq_max = n_seq_max
    cp.kv_unified = unified
    if flash is not None:
        cp.flash_attn_type = int(flash)
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        L.llama_model_free(model)
        raise RuntimeError("llama_init_from_model failed")
    return model, ctx, L.llama_batch_init(cp.n_batch, 0, n_seq_max)


def close_llamacpp(model, ctx, lb) -> None:
    import llama_cpp as L

    L.llama_batch_free(lb)
    L.llama_free(ctx)
    L.llama_model_free(model)


def submit(ctx, lb, entries: list[tuple[int, int, int, bool]]) -> None:
    """One llama_decode of entries (token, position, sequence id, wants logits)."""
    import llama_cpp as L

    lb.n_tokens = len(entries)
    for i, (tok, pos, seq, out) in enumerate(entries):
        lb.token[i], lb.pos[i], lb.n_seq_id[i], lb.logits[i] = tok, pos, 1, int(out)
        lb.seq_id[i][0] = seq
    if L.llama_decode(ctx, lb) != 0:
        raise RuntimeError("llama_decode failed")


def greedy(ctx, rows: list[int], vocab: int) -> list[int]:
    """The argmax of the logits of the last llama_decode's batch rows `rows`."""
    import llama_cpp as L

    out = []
    for r in rows:
        ptr = ctypes.cast(L.llama_get_logits_ith(ctx, r), ctypes.POINTER(ctypes.c_float))
        out.append(int(np.ctypeslib.as_array(ptr, shape=(vocab,)).argmax()))
    return out


def run_llamacpp(path: Path, vocab: int, batch: int, prompt_len: int, new_tokens: int, threads: int,
                 unified: bool = False, flash: bool | None = None) -> dict:
    """unified: one KV cache for every sequence (each sequence's attention then spans every sequence's cells,
    masked); else one stream a sequence (llama.cpp's default, llama-server's parallel slots). flash: llama.cpp's
    flash attention on or off; None leaves its default (auto: on here)."""
    per_seq = prompt_len + new_tokens + 8
    # the prompts go in as one batch; llama.cpp computes it 512 tokens at a time (a 4000-token prompt at batch 8 as
    # one ubatch would need its KQ scores for 32k x 32k positions)
    model, ctx, lb = open_llamacpp(path, -(-batch * per_seq // 256) * 256, threads, n_batch=max(batch * prompt_len, 512),
                                   n_ubatch=512, n_seq_max=batch, unified=unified, flash=flash)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    submit(ctx, lb, [(tok, p, s, p == prompt_len - 1) for s, ids in enumerate(prompts) for p, tok in enumerate(ids)])
    nxt = greedy(ctx, [s * prompt_len + prompt_len - 1 for s in range(batch)], vocab)
    clock = decode_clock(torch.device("cpu"))  # the clock memfit's side is read on (its threads: torch's setting)
    t0 = clock()
    for step in range(new_tokens - 1):
        submit(ctx, lb, [(nxt[s], prompt_len + step, s, True) for s in range(batch)])
        nxt = greedy(ctx, list(range(batch)), vocab)
    elapsed = clock() - t0
    close_llamacpp(model, ctx, lb)
    n = batch * (new_tokens - 1)
    return {"decode_tokens": n, "decode_s": elapsed, "timer": clock_name(clock), "tok_per_s": n / elapsed}


def greedy_agreement(src: Path, gguf_path: Path, dtype: str, vocab: int, n: int = 12) -> int:
    """How many leading greedy tokens the two engines agree on for one random prompt (a check that the
    GGUF holds the same model: all of them in float32; bf16 rounding may part them later)."""
    from memfit.llm.engine.api import LLM
    from memfit.llm.engine.params import SamplingParams

    ids = torch.randint(0, vocab, (32,), generator=torch.Generator().manual_seed(2)).tolist()
    # the engine's and server's step, as the committed results ran (LLM's own CPU default is 2048)
    llm = LLM(str(src), dtype=dtype, kv_budget="256MiB", max_model_len=256, device="cpu",
              max_num_batched_tokens=512)
    ours = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=n, temperature=0,
                                                                               ignore_eos=True))[0].token_ids
    llm.engine.close()
    model, ctx, lb = open_llamacpp(gguf_path, 256, 1)
    theirs, cur, pos = [], ids, 0
    for _ in range(n):
        submit(ctx, lb, [(t, pos + i, 0, i == len(cur) - 1) for i, t in enumerate(cur)])
        pos += len(cur)
        cur = greedy(ctx, [len(cur) - 1], vocab)
        theirs.append(cur[0])
    close_llamacpp(model, ctx, lb)
    same = 0
    while same < n and ours[same] == theirs[same]:
        same += 1
    return same


def llamacpp_configs(args, batch: int) -> list[str]:
    """The llama.cpp settings a row runs, "<kv>_fa_<flash>": its KV as streams and/or unified (one sequence: the
    same cache either way), flash attention at its default and/or off (off was 2x faster at 8 x 1000 tokens here:
    115 against 56 tok/s)."""
    kvs = ["streams"] if batch == 1 else ["streams", "unified"] if args.llamacpp_kv == "both" else [args.llamacpp_kv]
    fas = ["auto", "off"] if args.llamacpp_fa == "both" else [args.llamacpp_fa]
    return [f"{kv}_fa_{fa}" for kv in kvs for fa in fas]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["0.1b"], choices=list(SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llamacpp-kv", default="both", choices=["streams", "unified", "both"],
                    help="llama.cpp's KV: a stream per sequence (its default), one unified cache, or both (the faster "
                         "is the row's llama.cpp figure)")
    ap.add_argument("--llamacpp-fa", default="both", choices=["auto", "off", "both"],
                    help="llama.cpp's flash attention: its default (auto), off, or both (the faster is the figure)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    missing = llamacpp_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    import llama_cpp

    quiet_llamacpp()
    pin_threads(args.threads)
    load_before = os.getloadavg()
    bw = measure_bandwidth(args.threads, torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            for dtype in args.dtypes:
                src = make_model_dir(shape, dtype, Path(tmp))
                dst = Path(tmp) / f"{shape}-{dtype}.gguf"
                write_gguf(src, dst)
                vocab = SHAPES[shape]["vocab_size"]
                agree = greedy_agreement(src, dst, dtype, vocab)
                for batch in args.batches:
                    lc: dict[str, list[float]] = {k: [] for k in llamacpp_configs(args, batch)}
                    mf = []
                    for _ in range(args.reps):  # interleaved, so load changes hit both alike
                        for k in lc:
                            kv, fa = k.split("_fa_")
                            lc[k].append(run_llamacpp(dst, vocab, batch, args.prompt_len, args.new_tokens, args.threads,
                                                      unified=kv == "unified",
                                                      flash=None if fa == "auto" else False)["tok_per_s"])
                        mf.append(run_memfit(src, dtype, batch, args.prompt_len, args.new_tokens, torch.device("cpu"))["tok_per_s"])
                    by_kind = {k: statistics.median(v) for k, v in lc.items()}
                    best = max(by_kind, key=by_kind.get)  # the rival at its better setting
                    row = {"shape": shape, "dtype": dtype, "batch": batch, "memfit_tok_per_s": statistics.median(mf),
                           "llamacpp_tok_per_s": by_kind[best], "llamacpp_kv": best,
                           **{f"llamacpp_{k}_tok_per_s": v for k, v in by_kind.items()},
                           "greedy_tokens_agreeing_of_12": agree}
                    row["memfit_vs_llamacpp"] = row["memfit_tok_per_s"] / row["llamacpp_tok_per_s"]
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
    result = {"benchmark": "decode_llamacpp", **header(args.threads, seed=1), "llama_cpp_python": llama_cpp.__version__,
              "measured_bandwidth_bytes_per_s": bw, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "reps": args.reps, "rows": rows}
    emit(result, args.out, plot)
    return 0


def plot(result: dict, png: Path) -> None:
    """memfit and llama.cpp side by side, one pair of bars per shape / dtype / batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    short = {"bfloat16": "bf16", "float32": "fp32"}
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.8), 4))
    ax.bar([i - 0.2 for i in x], [r["memfit_tok_per_s"] for r in rows], 0.4, label="memfit")
    ax.bar([i + 0.2 for i in x], [r["llamacpp_tok_per_s"] for r in rows], 0.4,
           label=f"llama.cpp (llama-cpp-python {result['llama_cpp_python']})")
    ax.set_xticks(list(x), [f"{r['shape']} {short.get(r['dtype'], r['dtype'])} b{r['batch']}" for r in rows],
                  rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode throughput against llama.cpp, {result['threads']} CPU thread(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
