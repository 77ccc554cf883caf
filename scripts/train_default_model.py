"""Train memfit's bundled default model (memfit-tiny), its draft, or a larger target on the Python stdlib.

The training text is the source of the running interpreter's standard library, which every machine with
Python has, so the result can be rebuilt offline. Steps:

1. collect `*.py` files under `sysconfig.get_paths()["stdlib"]` in sorted order (test suites, site-packages
   and generated codec tables skipped) and hold out ~2.5% of files, chosen by a hash of their path;
2. train a byte-level BPE tokenizer with `tokenizers` (or reuse one with --tokenizer: the draft model must
   share the default model's tokenizer.json byte for byte);
3. train memfit's own `LlamaForCausalLM` with AdamW and a cosine schedule (bf16 autocast on CPU);
4. write a Hugging Face model directory: config.json, model.safetensors (bf16), tokenizer.json,
   tokenizer_config.json (ChatML template), generation_config.json, train_log.json, loss.png, README.md.

    python scripts/train_default_model.py --out memfit/assets/models/memfit-tiny
    python scripts/train_default_model.py --out memfit/assets/models/memfit-tiny-draft --size draft \\
        --tokenizer memfit/assets/models/memfit-tiny/tokenizer.json

A larger target for speculative decoding (~27 M parameters, same tokenizer; written to
$MEMFIT_CACHE/models/memfit-large, default ~/.cache/memfit, not bundled), and a draft distilled on its logits
(KL to the target over the training windows, starting from the bundled draft):

    python scripts/train_default_model.py --size large --tokenizer memfit/assets/models/memfit-tiny/tokenizer.json \
        --time-budget 60 --warmup 100
    python scripts/train_default_model.py --size draft --out ~/.cache/memfit/models/memfit-large-draft \
        --distil-from ~/.cache/memfit/models/memfit-large --init-from memfit/assets/models/memfit-tiny-draft \
        --lr 1e-3 --warmup 20 --time-budget 15
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memfit.llm.models.config import ModelConfig
from memfit.llm.models.llama import LlamaForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_POSITIONS = 2048
# Architecture per size. head_dim 32 everywhere; GQA with 2 query heads per KV head.
SIZES = {
    "default": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
                "num_key_value_heads": 4, "head_dim": 32},
    "draft": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32},
    # ~27 M parameters (55 MB in bf16): a target large enough that a batch-1 decode step on a CPU is bound by
    # reading its weights, so speculative decoding (issue 16) has something to save. Not bundled: it is built
    # into the user's cache (see default_out).
    "large": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 32},
}
DEFAULT_STEPS = {"default": 2500, "draft": 3000, "large": 6000}
DEFAULT_LR = {"default": 2e-3, "draft": 3e-3, "large": 1e-3}


def default_out(size: str) -> Path | None:
    """Where --out defaults to: the large model is not bundled, so it goes to $MEMFIT_CACHE/models/memfit-large
    (default ~/.cache/memfit); the bundled sizes have no default (they are written into memfit/assets/models)."""
    if size != "large":
        return None
    return Path(os.environ.get("MEMFIT_CACHE", Path.home() / ".cache" / "memfit")) / "models" / "memfit-large"
# Directory names skipped anywhere in the stdlib tree: installed packages, test suites (large, and full of
# deliberately odd code), caches, and the generated codec tables in encodings/ and the docs blob in pydoc_data/.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data"}
VAL_MODULUS = 40  # a file is held out when crc32(relative path) % 40 == 0 (about 2.5% of files)


def collect_sources(root: Path) -> tuple[list[str], list[str], list[str]]:
    """Return (train texts, val texts, val relative paths) from the stdlib, in sorted path order."""
    train, val, val_names = [], [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in SKIP_DIRS for part in rel.split("/")[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if zlib.crc32(rel.encode()) % VAL_MODULUS == 0:
            val.append(text)
            val_names.append(rel)
        else:
            train.append(text)
    return train, val, val_names


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    # Byte-level: every string maps to bytes first, so any text (any language, any bytes) round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_stream(tok, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, each followed by <|endoftext|>. -> (n_tokens,) int64"""
    eos = tok.token_to_id("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def fixed_windows(stream: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """`count` evenly spaced windows of seq_len+1 tokens (inputs + shifted targets). -> (count, T+1)"""
    last = stream.numel() - seq_len - 1
    starts = torch.linspace(0, last, count).long()
    return torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])


def lm_loss(model: LlamaForCausalLM, windows: torch.Tensor, bf16: bool) -> torch.Tensor:
    x, y = windows[:, :-1], windows[:, 1:]  # (B, T)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model.dense_logits(x)  # (B, T, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def distil_loss(model: LlamaForCausalLM, teacher: LlamaForCausalLM, windows: torch.Tensor, bf16: bool) -> torch.Tensor:
    """KL(p_teacher || q_draft) per position, averaged over all positions of the windows' inputs.

    Why soft logits and not the target's generated continuations: a draft's acceptance at temperature 1 is
    E[sum_x min(p(x), q(x))] = 1 - E[TV(p, q)], and Pinsker bounds TV by sqrt(KL(p || q) / 2), so this loss
    pushes acceptance up at every position of every window, with a signal over all V tokens per position
    (greedy acceptance, argmax agreement, follows). Generating continuations would need the target to decode
    token by token on the CPU, far slower than one teacher forward over a whole (B, T) batch."""
    x = windows[:, :-1]  # (B, T); the shifted targets are not used: the teacher's distribution is the label
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t_logits = teacher.dense_logits(x)  # (B, T, V)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        s_logits = model.dense_logits(x)  # (B, T, V)
    vocab = s_logits.shape[-1]
    log_p = F.log_softmax(t_logits.float(), dim=-1).reshape(-1, vocab)  # (B*T, V)
    log_q = F.log_softmax(s_logits.float(), dim=-1).reshape(-1, vocab)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # sum over V, mean over B*T


@torch.no_grad()
def agreement(model: LlamaForCausalLM, teacher: LlamaForCausalLM, windows: torch.Tensor, bf16: bool,
              batch: int = 8) -> dict[str, float]:
    """How well a draft agrees with its target on fixed windows (teacher-forced, every position):
    top-1 agreement (greedy speculative decoding accepts a token exactly when the argmaxes agree) and
    sum_x min(p, q) (the acceptance probability of one token at temperature 1)."""
    was_training = model.training
    model.eval()
    top1 = accept = 0.0
    n = 0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch, :-1]  # (b, T)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            p = F.softmax(teacher.dense_logits(x).float(), dim=-1)  # (b, T, V)
            q = F.softmax(model.dense_logits(x).float(), dim=-1)
        top1 += (p.argmax(-1) == q.argmax(-1)).sum().item()
        accept += torch.minimum(p, q).sum().item()
        n += x.numel()
    model.train(was_training)
    return {"top1_agreement": round(top1 / n, 4), "expected_acceptance_t1": round(accept / n, 4)}


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, windows: torch.Tensor, bf16: bool, batch: int = 8) -> float:
    model.eval()
    losses = [lm_loss(model, windows[i : i + batch], bf16).item() for i in range(0, len(windows), batch)]
    model.train()
    return sum(losses) / len(losses)


def init_weights(model: LlamaForCausalLM, cfg: ModelConfig) -> None:
    # Normal(0, 0.02) as in Hugging Face Llama; residual output projections scaled by 1/sqrt(2L) (GPT-2).
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            continue
        std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        torch.nn.init.normal_(p, mean=0.0, std=std)


def hf_config(cfg: ModelConfig, tok) -> dict:
    eos = [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": 0.02,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
        "bos_token_id": None, "eos_token_id": eos, "pad_token_id": eos[0],
    }


def tokenizer_files(tok) -> dict[str, dict]:
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": MAX_POSITIONS, "chat_template": CHAT_TEMPLATE,
    }
    gen_cfg = {
        "bos_token_id": None, "eos_token_id": [tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")],
        "pad_token_id": tok.token_to_id("<|endoftext|>"), "do_sample": True, "temperature": 0.8, "top_p": 0.95,
        "top_k": 0, "repetition_penalty": 1.0, "max_new_tokens": 256,
    }
    return {"tokenizer_config.json": tok_cfg, "generation_config.json": gen_cfg}


def save_model(model: LlamaForCausalLM, cfg: ModelConfig, out: Path) -> int:
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # tied to model.embed_tokens.weight; HF omits it too
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return (out / "model.safetensors").stat().st_size


def plot_losses(log: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    kl = log.get("objective") == "kl_to_target"  # distilled: the training curve is KL to the target
    what = "train KL to target" if kl else "train"
    ax.plot(log["steps"], log["train_loss"], lw=0.6, alpha=0.5, label=f"{what} (per step)")
    k = 25  # running mean, so the trend is visible through the per-batch noise
    smooth = [sum(log["train_loss"][max(0, i - k + 1) : i + 1]) / len(log["train_loss"][max(0, i - k + 1) : i + 1])
              for i in range(len(log["train_loss"]))]
    ax.plot(log["steps"], smooth, lw=1.5, label=f"{what} (mean of {k})")
    ax.plot(log["val_steps"], log["val_loss"], "o-", lw=1.5, label="validation cross-entropy (held-out files)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats/token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_readme(out: Path) -> None:
    """README.md for a trained model directory, written from its config.json and train_log.json."""
    cfg = json.loads((out / "config.json").read_text())
    log = json.loads((out / "train_log.json").read_text())
    draft = log["size"] == "draft"
    name = out.name
    role = ("the draft model for speculative decoding with memfit-tiny (same tokenizer, byte-identical "
            "tokenizer.json)" if draft else "memfit's bundled default model, so `memfit generate` works offline")
    cmd = ("python scripts/train_default_model.py --out memfit/assets/models/memfit-tiny-draft --size draft "
           "--tokenizer memfit/assets/models/memfit-tiny/tokenizer.json" if draft
           else "python scripts/train_default_model.py --out memfit/assets/models/memfit-tiny")
    if log["size"] == "large":
        role = ("a larger target for speculative decoding with memfit-tiny's tokenizer, built into the user's "
                "cache (not bundled)")
        cmd = ("python scripts/train_default_model.py --size large "
               "--tokenizer memfit/assets/models/memfit-tiny/tokenizer.json")
    if log.get("distil_from"):
        role = f"a draft model for speculative decoding with {Path(log['distil_from']).name}, distilled from its logits"
        cmd = (f"python scripts/train_default_model.py --out {out} --size {log['size']} "
               f"--distil-from {log['distil_from']}")
        if log.get("init_from"):
            cmd += f" --init-from {log['init_from']}"
    budget = f" --steps {log['steps_planned']} --threads {log['threads']}"
    if log.get("time_budget_minutes"):
        budget += f" --time-budget {log['time_budget_minutes']:g}"
    last100 = sum(log["train_loss"][-100:]) / len(log["train_loss"][-100:])
    timing = ""
    if log.get("time_budget_minutes"):  # the run stopped at whichever of steps or time came first
        how = "ran out of time first" if log["steps_done"] < log["steps_planned"] else "completed its steps first"
        timing = f" (this run {how}; on another machine the time budget may end it at a different step)"
    if log.get("distil_from"):
        b, a = log["agreement_before"], log["agreement_after"]
        last100 = sum(log["train_loss"][-100:]) / len(log["train_loss"][-100:])
        timing += (f". Distilled: the loss is KL(target || draft) on {log['distil_from']}'s logits over the "
                   f"training windows (last 100 steps {last100:.3f} nats/token); agreement with the target on the "
                   f"held-out windows, top-1 {b['top1_agreement']:.3f} -> {a['top1_agreement']:.3f}, "
                   f"sum min(p, q) {b['expected_acceptance_t1']:.3f} -> {a['expected_acceptance_t1']:.3f}")
    text = f"""# {name}

A tiny Llama-architecture language model: {role}. It completes Python source code; it is far too small
to be useful for anything else, and it was **not** trained on chat, so the ChatML template in
tokenizer_config.json is there for plumbing (tests, demos), not because the model follows instructions.

| | |
|---|---|
| architecture | LlamaForCausalLM (RMSNorm, RoPE, SwiGLU, GQA), tied input/output embeddings |
| parameters | {log["parameters"]:,} |
| layers / hidden / MLP | {cfg["num_hidden_layers"]} / {cfg["hidden_size"]} / {cfg["intermediate_size"]} |
| heads / KV heads / head dim | {cfg["num_attention_heads"]} / {cfg["num_key_value_heads"]} / {cfg["head_dim"]} |
| vocabulary | {cfg["vocab_size"]} (byte-level BPE; specials `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) |
| weights | model.safetensors, bfloat16, {log["safetensors_bytes"]:,} bytes |
| context | trained on {log["seq_len"]}-token windows; RoPE table sized for {cfg["max_position_embeddings"]}, but quality drops past the training length |

## Training

- Text: the `*.py` files of the CPython {log["python_version"]} standard library (`{log["stdlib"]}`), sorted by
  path, without test suites, site-packages, `encodings/` and `pydoc_data/`; {log["train_files"]} files
  ({log["train_tokens"]:,} tokens) for training and {len(log["val_files"])} held-out files
  ({log["val_tokens"]:,} tokens) for validation, chosen by `crc32(path) % 40 == 0`. The standard library
  differs a little between Python versions, so a rebuild on another version gives a slightly different model.
- {log["steps_done"]} AdamW steps of {log["batch_size"]} x {log["seq_len"]} tokens ({log["tokens_seen"]:,} tokens seen), peak LR
  {log["lr"]}, {log["warmup"]} warm-up steps then cosine decay to 10%, weight decay 0.1, gradient clip 1.0,
  bf16 autocast {"on" if log["bf16_autocast"] else "off"}, seed {log["seed"]}, {log["threads"]} CPU thread(s),
  {log["train_seconds"] / 60:.1f} minutes on a shared 2-core machine.
- Final loss (weights as stored, {log.get("eval_windows", 16)} fixed windows of {log["seq_len"]} tokens each): train
  **{log["final_train_loss"]:.3f}**, held-out **{log["final_val_loss"]:.3f}** nats/token (uniform guessing:
  {log["uniform_loss"]:.3f}); mean training-batch loss over the last 100 steps {last100:.3f}.
  Curve: loss.png; numbers: train_log.json.

Rebuild with `{cmd}{budget}`{timing}.

## Licence

The training text is the source code of the CPython standard library, Copyright (c) Python Software
Foundation, distributed under the PSF License Agreement Version 2 (https://docs.python.org/3/license.html).
The weights are a statistical model of that text; they ship with memfit (Apache-2.0) and this note keeps
the attribution of the text they were learned from.
"""
    (out / "README.md").write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="output model directory (required, except for --size large: $MEMFIT_CACHE/models/memfit-large)")
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 2500 default, 3000 draft)")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="also stop after this many minutes of training; the LR schedule then follows whichever of "
                        "steps or time runs out first (the steps done are recorded in train_log.json)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="reuse this tokenizer.json (or its directory); default with --distil-from: the target's")
    p.add_argument("--distil-from", type=Path, default=None, metavar="DIR",
                   help="train on this target model's soft logits (KL) over the training windows instead of the "
                        "text's next tokens: a draft that agrees with its target (issue 16)")
    p.add_argument("--init-from", type=Path, default=None, metavar="DIR",
                   help="start from this model directory's weights (same size), e.g. the bundled draft")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=16)
    # One thread: on a shared 2-core machine (load ~8) two threads trained 4x *slower* than one (270 vs
    # 1100 tokens/s), as OpenMP workers wait at every barrier for a sibling the scheduler has parked.
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; raise on an idle machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs-only", action="store_true",
                   help="only redraw loss.png and rewrite README.md of a trained --out directory from train_log.json")
    p.add_argument("--no-bf16", action="store_true", help="train in float32 (bf16 autocast is faster on AVX512-BF16/AMX CPUs)")
    args = p.parse_args(argv)
    if args.distil_from is not None and args.tokenizer is None:
        args.tokenizer = args.distil_from  # the draft must share its target's tokenizer.json byte for byte
    if args.out is None:
        args.out = default_out(args.size)
        if args.out is None:
            p.error(f"--out is required for --size {args.size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.docs_only:
        log = json.loads((args.out / "train_log.json").read_text())
        plot_losses(log, args.out / "loss.png", f"{args.out.name} ({log['parameters'] / 1e6:.2f} M parameters)")
        write_readme(args.out)
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    steps = args.steps or DEFAULT_STEPS[args.size]
    lr_max = args.lr or DEFAULT_LR[args.size]
    bf16 = not args.no_bf16
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    root = Path(sysconfig.get_paths()["stdlib"])
    train_texts, val_texts, val_names = collect_sources(root)
    print(f"stdlib {root} (Python {sys.version.split()[0]}): {len(train_texts)} train files, "
          f"{len(val_texts)} held-out files, {sum(map(len, train_texts)) / 1e6:.1f} M train chars", flush=True)

    from tokenizers import Tokenizer

    if args.tokenizer is not None:
        src = args.tokenizer / "tokenizer.json" if args.tokenizer.is_dir() else args.tokenizer
        if not src.is_file():
            print(f"error: tokenizer {src} not found; pass a tokenizer.json or a model directory holding one")
            return 2
        if src.resolve() != (args.out / "tokenizer.json").resolve():
            shutil.copyfile(src, args.out / "tokenizer.json")  # byte-identical: draft and target must agree
        tok = Tokenizer.from_file(str(args.out / "tokenizer.json"))
    else:
        tok = train_tokenizer(train_texts, args.vocab_size)
        tok.save(str(args.out / "tokenizer.json"))
    for name, content in tokenizer_files(tok).items():
        (args.out / name).write_text(json.dumps(content, indent=2) + "\n")

    train_ids, val_ids = encode_stream(tok, train_texts), encode_stream(tok, val_texts)
    print(f"tokens: {train_ids.numel():,} train, {val_ids.numel():,} val "
          f"({sum(map(len, train_texts)) / train_ids.numel():.2f} chars/token)", flush=True)
    val_windows = fixed_windows(val_ids, args.seq_len, args.eval_windows)
    train_eval_windows = fixed_windows(train_ids, args.seq_len, args.eval_windows)

    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5,
                      rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="bfloat16",
                      eos_token_id=[tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")],
                      **SIZES[args.size])
    model = LlamaForCausalLM(cfg)
    init_weights(model, cfg)
    if args.init_from is not None:
        from memfit.llm.models.loader import load_model

        init, _ = load_model(args.init_from, dtype="float32")
        model.load_state_dict(init.state_dict())  # a shape mismatch (another size) is a clear RuntimeError
        del init
    teacher, before = None, None
    if args.distil_from is not None:
        from memfit.llm.models.loader import load_model

        if (args.distil_from / "tokenizer.json").read_bytes() != (args.out / "tokenizer.json").read_bytes():
            print(f"error: --distil-from {args.distil_from} has another tokenizer.json than {args.out}; "
                  "a draft must share its target's tokenizer")
            return 2
        # The teacher runs forward only, in its stored bf16 (or float32 with --no-bf16), requires_grad off.
        teacher, tcfg = load_model(args.distil_from, dtype="bfloat16" if bf16 else "float32")
        print(f"distilling from {args.distil_from} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.2f} M "
              "parameters): KL(target || draft) on the target's logits", flush=True)
        before = agreement(model, teacher, val_windows, bf16)
        print(f"agreement with the target before training (held-out windows): {before}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.size}: {n_params / 1e6:.2f} M parameters, {steps} steps x {args.batch_size} x "
          f"{args.seq_len} tokens, lr {lr_max}, bf16 autocast {bf16}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr_max, betas=(0.9, 0.95), eps=1e-8)

    budget_s = None if args.time_budget is None else 60.0 * args.time_budget

    def progress(step: int) -> float:  # fraction of the run done: by steps, or by wall time if that is ahead
        frac = step / steps
        if budget_s is not None:
            frac = max(frac, (time.perf_counter() - t_train) / budget_s)
        return min(frac, 1.0)

    def lr_at(step: int, frac: float) -> float:  # linear warm-up, then cosine down to 10% of the peak
        if step <= args.warmup:
            return lr_max * step / args.warmup
        warm = args.warmup / steps
        frac = max(0.0, (frac - warm) / (1 - warm))
        return lr_max * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    log: dict = {"steps": [], "train_loss": [], "val_steps": [], "val_loss": []}
    t_train = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc=f"train {args.size}", mininterval=5.0, file=sys.stdout)
    for step in bar:
        frac = progress(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, frac)
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        loss = lm_loss(model, batch, bf16) if teacher is None else distil_loss(model, teacher, batch, bf16)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log["steps"].append(step)
        log["train_loss"].append(round(loss.item(), 4))
        tok_s = step * args.batch_size * args.seq_len / (time.perf_counter() - t_train)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_s:.0f}")
        done = step == steps or progress(step) >= 1.0
        if step % args.eval_every == 0 or done:
            val = evaluate(model, val_windows, bf16)
            log["val_steps"].append(step)
            log["val_loss"].append(round(val, 4))
            recent = log["train_loss"][-args.eval_every :]
            tqdm.write(f"step {step:5d}  train {sum(recent) / len(recent):.3f}  val {val:.3f}  "
                       f"lr {opt.param_groups[0]['lr']:.2e}  {tok_s:.0f} tok/s  {time.perf_counter() - t_start:.0f}s elapsed")
        if done:
            break
    bar.close()
    train_seconds = time.perf_counter() - t_train

    size_bytes = save_model(model, cfg, args.out)
    # Final losses are measured on the weights as stored (rounded to bf16), on fixed windows.
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    final_train, final_val = evaluate(model, train_eval_windows, bf16), evaluate(model, val_windows, bf16)
    (args.out / "config.json").write_text(json.dumps(hf_config(cfg, tok), indent=2) + "\n")
    log.update({
        "size": args.size, "parameters": n_params, "safetensors_bytes": size_bytes,
        "python_version": sys.version.split()[0], "stdlib": str(root), "train_files": len(train_texts),
        "val_files": val_names, "train_tokens": train_ids.numel(), "val_tokens": val_ids.numel(),
        "tokens_seen": step * args.batch_size * args.seq_len, "steps_done": step, "steps_planned": steps,
        "time_budget_minutes": args.time_budget, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "eval_windows": args.eval_windows, "lr": lr_max, "warmup": args.warmup, "seed": args.seed, "bf16_autocast": bf16,
        "threads": args.threads, "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(final_train, 4), "final_val_loss": round(final_val, 4),
        "uniform_loss": round(math.log(cfg.vocab_size), 4),
        "init_from": None if args.init_from is None else str(args.init_from),
    })
    if teacher is not None:  # train_loss is then KL(target || draft), not cross-entropy on the text
        after = agreement(model, teacher, val_windows, bf16)
        print(f"agreement with the target after training (held-out windows): {after}", flush=True)
        log.update({"distil_from": str(args.distil_from), "objective": "kl_to_target",
                    "agreement_before": before, "agreement_after": after})
    (args.out / "train_log.json").write_text(json.dumps(log) + "\n")
    plot_losses(log, args.out / "loss.png", f"{args.out.name} ({n_params / 1e6:.2f} M parameters)")
    write_readme(args.out)
    print(f"done in {time.perf_counter() - t_start:.0f}s: final train loss {final_train:.3f}, val loss "
          f"{final_val:.3f} (uniform {math.log(cfg.vocab_size):.3f}); {size_bytes / 1e6:.1f} MB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
