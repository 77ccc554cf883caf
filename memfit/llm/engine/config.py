"""`EngineConfig`: every option of the engine in one dataclass, and its command-line flags beside it.

    p = argparse.ArgumentParser(); add_engine_args(p)
    config = EngineConfig.from_args(p.parse_args())

`generate`, `chat`, `bench` and `serve` all take their engine flags from `add_engine_args`, so a flag means
the same thing everywhere and an option added here reaches every command. Budgets are parsed once, by
`memfit.memory.budget.parse_budget` (bytes or a fraction of the available memory).

No torch at import: `memfit --help` builds every parser without loading it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memfit.memory.budget import parse_budget, parse_swap_space

if TYPE_CHECKING:
    import torch

# The offline `LLM` API's step on a CPU when neither a step size nor a memory budget is given (engine/api.py), as
# vLLM's offline `LLM` steps more tokens than its server: each weight then streams from memory once per 2048 rows
# instead of 512. Measured on the 0.1B shape (benchmarks/step_size.py, docs/benchmarks.md): prefill 1.20x faster
# in the kept run (1.09-1.13x in benchmarks/prefill.py's interleaved runs), the step's reservation 28 -> 41 MiB,
# and a decode row's gap while prompts prefill beside it 3.3x longer, which is why the server and the CLI keep 512.
# The offline step is capped at max_num_seqs x max_model_len where that is smaller (no larger step can form).
OFFLINE_CPU_STEP_TOKENS = 2048
CPU_LINEARS = ("auto", "blocked", "memfit", "onednn", "upcast")  # what each means: memfit/llm/kernels/backends.py
# The virtual cache's page layouts (kv/virtual.py says what each is for); the paged cache ignores the choice.
KV_LAYOUTS = ("auto", "per-layer", "token-major", "head-major")
# Kept in step with engine/policy.py's POLICIES and scheduler.py's PREEMPTION_MODES (imported lazily there).
SCHEDULING_POLICIES = ("fcfs", "priority", "vtc")
PREEMPTION_MODES = ("recompute", "swap", "auto")


def check_device_name(device: object) -> None:
    """Refuse a device name the engine does not run on (ValueError, naming those it takes): auto, cpu, cuda or
    cuda:N. Whether a named CUDA device exists is checked where the engine resolves it (resolved_device)."""
    import re

    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"device (--device) must be auto, cpu, cuda or cuda:N, got {device!r}")


def resolve_device(device: str) -> torch.device:
    """The torch device of a checked name (check_device_name): auto is cuda where there is one, else cpu. A CUDA
    device named by the user that is not there is a ValueError saying so, not torch's traceback."""
    import torch

    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r}: no CUDA device is usable here (torch {torch.__version__}, "
                             f"CUDA {torch.version.cuda or 'not built in'}); use --device cpu or auto")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return resolved


DEFAULT_SPECULATIVE_TOKENS = 4  # num_speculative_tokens with a draft and no γ given (also `memfit fit`'s)

@dataclass
class EngineConfig:
    model: str = "memfit-tiny"  # a local Hugging Face model directory, or a bundled model's name
    dtype: str | None = None  # float32 | bfloat16 | float16; None = the checkpoint's dtype
    device: str = "auto"  # auto = cuda if available, else cpu
    kv_cache: str = "virtual"  # a registered KV manager: virtual (vAttention) | paged (vLLM-style baseline)
    # The whole process's memory ledger: weights, tokenizer, runtime, the largest step and the KV cache's share
    # (what is left). Bytes ("2GiB") or a fraction of the memory available at start (0.8, "80%"). None: 90% of
    # the memory available at start, with the runtime's share not measured (see engine/calibrate.py).
    memory_budget: int | float | str | None = None
    kv_budget: int | float | str | None = None  # optional cap on the KV share, bytes or a fraction as above
    kv_reclaim_watermark: int | float | str = "0"  # idle KV bytes kept committed for reuse (bytes or fraction of the KV share)
    kv_reclaim_idle_s: float = 10.0  # idle KV pages above the watermark are given back after this many seconds
    kv_prefault: bool = True  # commit the next pages of a growing sequence on a background thread
    kv_eager_pages: int | None = None  # pages committed ahead of need (None: 2 on a CPU, 1 on a GPU)
    # Automatic prefix caching: a request starting with tokens whose K/V a live or recently finished request holds
    # reuses them (virtual cache: the same physical pages mapped into its slot, CPU; paged: shared blocks).
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 64
    # Tokens (prefill and decode) in one step. 512 keeps a decode row's inter-token gap short while prompts prefill
    # beside it (serving); the offline `LLM` API steps OFFLINE_CPU_STEP_TOKENS on a CPU instead (engine/api.py).
    max_num_batched_tokens: int = 512
    max_waiting: int | None = None
    block_size: int = 16  # paged cache only
    # Paged cache only: blocks from a buddy allocator of contiguous groups (memory/blocks.py), so a swap copies a
    # few runs of blocks instead of one copy per block (FastSwitch's block groups). False: vLLM's free-block stack.
    kv_block_groups: bool = False
    kv_layout: str = "auto"  # virtual cache only: auto | per-layer | token-major | head-major (see kv/virtual.py)
    timeline: str | None = None  # write a per-step memory timeline (JSON lines) here
    threads: int | None = None  # CPU threads for torch (None: torch's default, one per core)
    prepack: bool = True  # CPU: a decode-speed linear backend (cpu_linear); False = plain F.linear
    fuse: bool = True  # one matmul for q/k/v and one for gate/up (GPU, or CPU with cpu_linear onednn/blocked)
    cpu_linear: str = "auto"  # CPU linears: blocked | memfit | onednn | upcast | auto; see memfit/llm/kernels/backends.py
    cpu_kernels: bool = True  # CPU: memfit's C++ kernels for norm, RoPE, SiLU*up and decode attention
    scheduling_policy: str = "fcfs"  # fcfs | priority | vtc (engine/policy.py)
    priority_aging_steps: int = 100  # priority policy's starvation guard: one unit of aging per this many steps
    preemption_mode: str = "recompute"  # recompute | swap | auto (kv/swap.py)
    # The host tier swapped KV goes to: bytes ("8GiB"; a bare number means GiB, as in vLLM). None: 4 GiB, taken
    # from what the memory budget leaves after the KV share on a CPU (given explicitly, it is set aside first).
    swap_space: int | float | str | None = None
    swap_threads: int = 2  # swap-ins and -outs on this many threads, overlapped with the model step (0: synchronous)
    # Cross-turn reuse (kv/swap.py): a swapped-in sequence's host copy is kept, so its next swap-out moves only new
    # tokens, and a finished turn's evicted KV waits on the host for the session's next turn. Kept copies go first
    # under pressure (least recently used).
    swap_reuse: bool = True
    # The SSD tier below the host tier (kv/swap_ssd.py): one preallocated file in this directory, of
    # swap_ssd_space bytes (a bare number means GiB; None: 16 GiB). Host chunks are demoted to it under pressure.
    swap_ssd_path: str | None = None
    swap_ssd_space: int | float | str | None = None
    swap_ssd_prewrite: bool = False  # write zeros over the SSD tier's file at start (memory/extent_store.py)
    # Speculative decoding (engine/spec_decode.py): a draft model (a bundled name or a directory) sharing the
    # target's tokenizer, or `self[:N]` (the target's first N layers, engine/draft.py), proposes up to
    # num_speculative_tokens tokens a step; the target verifies them in one pass.
    speculative_model: str | None = None
    num_speculative_tokens: int | None = None  # default 4 with a speculative_model
    # Pick g per sequence and step from its observed acceptance and the measured cost of a draft pass (0: plain
    # decoding where speculation would be slower); off: always num_speculative_tokens, as room allows.
    speculative_adaptive: bool = False
    # Tree speculation (engine/spec_tree_step.py): (W, D) or 'W,D': W tokens after the last one, each continued by a
    # chain of depth D, all verified in one pass under a tree mask. Greedy requests: the draft's top-W and greedy
    # chains, the target's argmax path; sampled ones: W i.i.d. draws and drawn chains, SpecInfer's multi-candidate
    # rejection rule (spec_tree_sample.py). With speculative_adaptive: trees or adaptive chains, step by step,
    # whichever measured faster.
    speculative_tree: tuple[int, int] | str | None = None
    # Split the model's heads and MLP over this many processes (memfit/llm/parallel/; docs/parallel.md): rank 0
    # spawns the others, or torchrun starts them all. Each rank holds 1/N of the weights and of the KV cache.
    tensor_parallel_size: int = 1

    def __post_init__(self) -> None:
        # Checked here, so LLM(...) keywords, flags and with_overrides all refuse a bad value the same way.
        check_device_name(self.device)
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int)
                                               or isinstance(self.max_model_len, bool) or self.max_model_len < 1):
            raise ValueError(f"max_model_len (--max-model-len) must be an integer of at least 1 (leave it out for "
                             f"the model's context), got {self.max_model_len!r}")
        if self.cpu_linear not in CPU_LINEARS:
            raise ValueError(f"cpu_linear must be one of {', '.join(CPU_LINEARS)}, got {self.cpu_linear!r}")
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {', '.join(KV_LAYOUTS)}, got {self.kv_layout!r}")
        if not math.isfinite(self.kv_reclaim_idle_s) or self.kv_reclaim_idle_s < 0:  # NaN passed `< 0`
            raise ValueError(f"kv_reclaim_idle_s (--kv-reclaim-idle-s) must be a finite number of seconds >= 0, "
                             f"got {self.kv_reclaim_idle_s}")
        if self.kv_eager_pages is not None and self.kv_eager_pages < 0:
            raise ValueError(f"kv_eager_pages must be >= 0, got {self.kv_eager_pages}")
        for name in ("memory_budget", "kv_budget"):
            if getattr(self, name) is not None:
                _budget(name, getattr(self, name))  # a bad budget fails here, with the rule and the option named
        if self.kv_reclaim_watermark not in ("0", 0):
            _budget("kv_reclaim_watermark", self.kv_reclaim_watermark)
        if not isinstance(self.max_num_seqs, int) or isinstance(self.max_num_seqs, bool) or self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs (--max-num-seqs) must be an integer of at least 1, got {self.max_num_seqs!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                             f"got {self.scheduling_policy!r}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {self.preemption_mode!r}")
        if self.max_waiting is not None and (not isinstance(self.max_waiting, int) or isinstance(self.max_waiting, bool)
                                             or self.max_waiting < 1):
            # 0 would refuse every request as QueueFull (429 on a server), which no retry can get past
            raise ValueError(f"max_waiting (--max-waiting) must be an integer >= 1 or None (no limit), "
                             f"got {self.max_waiting!r}")
        if self.swap_threads < 0:
            raise ValueError(f"swap_threads must be >= 0, got {self.swap_threads}")
        if self.priority_aging_steps < 0:
            raise ValueError(f"priority_aging_steps must be >= 0, got {self.priority_aging_steps}")
        if self.swap_space is not None:
            try:
                parse_swap_space(self.swap_space)
            except ValueError as exc:
                raise ValueError(f"swap_space (--swap-space): {exc}; a bare number means GiB") from None
        if self.swap_ssd_space is not None:
            try:
                parse_swap_space(self.swap_ssd_space)
            except ValueError as exc:
                raise ValueError(f"swap_ssd_space (--swap-ssd-space): {exc}; a bare number means GiB") from None
        if self.swap_ssd_path is not None and not str(self.swap_ssd_path).strip():
            raise ValueError("swap_ssd_path (--swap-ssd-path / --ssd-swap DIR[:SIZE]) is empty: name the directory")
        # Options that only qualify another one are refused without it, not ignored (the user meant something)
        if self.swap_ssd_path is None and (self.swap_ssd_space is not None or self.swap_ssd_prewrite):
            flag = "--swap-ssd-space" if self.swap_ssd_space is not None else "--swap-ssd-prewrite"
            raise ValueError(f"{flag} configures the SSD swap tier, which needs its directory: add --ssd-swap "
                             "DIR[:SIZE] (or --swap-ssd-path DIR)")
        if self.kv_block_groups and self.kv_cache != "paged":
            raise ValueError(f"kv_block_groups (--kv-block-groups) is the paged cache's block-group allocator; the "
                             f"{self.kv_cache} cache swaps a sequence's contiguous run in one copy already: add "
                             "--kv-cache paged, or drop it")
        given = [flag for flag, value in (("--swap-space", self.swap_space),
                                          ("--ssd-swap", self.swap_ssd_path or self.swap_ssd_space)) if value is not None]
        if given and self.preemption_mode == "recompute":
            # Why refuse rather than ignore: the tiers exist only for swap preemption, and a server started with
            # them under the default mode would never check its directory or use a byte of them, silently.
            raise ValueError(f"{' and '.join(given)} set up the swap tiers (swap_space, swap_ssd_path), which "
                             "--preemption-mode recompute (the default) never uses: add --preemption-mode swap (or "
                             f"auto), or drop {'it' if len(given) == 1 else 'them'}")

        self._check_speculative()
        self._check_parallel()

    def _check_parallel(self) -> None:
        n = self.tensor_parallel_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tensor_parallel_size (--tensor-parallel-size) must be an integer of at least 1, got {n!r}")
        if n > 1 and self.speculative_model is not None and self.speculative_model.startswith("self"):
            raise ValueError("a self-draft (--speculative-model self[:N]) does not run under --tensor-parallel-size "
                             "> 1: its layers are sharded over the ranks; use a separate draft model")
        if n > 1 and self.preemption_mode != "recompute":
            raise ValueError("--preemption-mode swap/auto does not run under --tensor-parallel-size > 1 yet (each "
                             "rank would swap its own shard); use --preemption-mode recompute")

    def _check_speculative(self) -> None:
        g = self.num_speculative_tokens
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 1):
            raise ValueError(f"num_speculative_tokens (--num-speculative-tokens) must be an integer of at least 1, got {g!r}")
        if g is not None and self.speculative_model is None:
            raise ValueError("num_speculative_tokens needs a speculative_model (--speculative-model): the draft that proposes them")
        if self.speculative_adaptive and self.speculative_model is None:
            raise ValueError("speculative_adaptive (--speculative-adaptive) needs a speculative_model (--speculative-model)")
        if self.speculative_tree is not None:
            self._check_tree()
        if self.speculative_model is not None and self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_SPECULATIVE_TOKENS

    def _check_tree(self) -> None:
        from memfit.llm.engine.spec_tree import parse_tree

        w, d = self.speculative_tree = parse_tree(self.speculative_tree)  # type: ignore[assignment, misc]
        if self.speculative_model is None:
            raise ValueError("speculative_tree (--speculative-tree) needs a speculative_model (--speculative-model): "
                             "the draft that proposes the tree")
        if self.num_speculative_tokens not in (None, d):
            raise ValueError(f"with speculative_tree W,D the depth D is the number of speculative tokens: "
                             f"num_speculative_tokens {self.num_speculative_tokens} differs from D = {d}")
        self.num_speculative_tokens = d
        if w * d + 1 > self.max_num_batched_tokens:
            raise ValueError(f"a {w},{d} tree verifies {w * d + 1} tokens per sequence in one pass but a step holds "
                             f"max_num_batched_tokens = {self.max_num_batched_tokens}; use a smaller tree")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)

    def with_overrides(self, **overrides: object) -> EngineConfig:
        """A copy with some fields replaced; an unknown name is a TypeError that lists the known ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; EngineConfig has {sorted(names)}")
        return dataclasses.replace(self, **overrides)  # type: ignore[arg-type]

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: object) -> EngineConfig:
        """The config of parsed `add_engine_args` flags (flags a command does not have keep their default)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        for name in ("kv_budget", "memory_budget"):
            if values.get(name) is not None:
                values[name] = _budget(name, values[name])  # a bad budget fails here, with the rule
        ssd_swap = getattr(args, "ssd_swap", None)
        if ssd_swap:  # --ssd-swap DIR[:SIZE], the short form of --swap-ssd-path / --swap-ssd-space
            path, _, size = ssd_swap.rpartition(":") if ":" in ssd_swap else (ssd_swap, "", "")
            if size and not _is_size(size):  # a colon in the directory's own name, no size after it
                path, size = ssd_swap, ""
            if values.get("swap_ssd_path") and values["swap_ssd_path"] != path:
                raise ValueError("--ssd-swap and --swap-ssd-path name two directories: give one")
            values["swap_ssd_path"] = path
            if size:
                values["swap_ssd_space"] = size
        return cls(**values).with_overrides(**overrides)


def _is_size(text: str) -> bool:
    """Does the text after --ssd-swap's last colon read as a size (a number, maybe signed, with or without a unit,
    or inf/nan)? Then it is one, and a bad one is refused as such; other text is part of the directory's name."""
    return re.match(r"\s*[-+]?(\d|\.\d|inf|nan)", text, re.IGNORECASE) is not None


def _budget(name: str, spec: object) -> int | float:
    """parse_budget, its refusal naming the field and its flag (--memory-budget 0 and --kv-budget 0 used to read
    alike)."""
    try:
        return parse_budget(spec)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"{name} (--{name.replace('_', '-')}): {exc}") from None


def add_engine_args(p: argparse.ArgumentParser, max_num_seqs: int = 64) -> None:
    """The engine's flags, named after EngineConfig's fields (`--kv-budget` -> kv_budget, ...)."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="memfit-tiny", help="local Hugging Face model dir, or a bundled model name (default: memfit-tiny)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    # No argparse choices: the KV managers register themselves in memfit.llm.kv (importing them loads torch,
    # which `memfit --help` must not); an unknown kind is refused when the engine builds, listing the kinds.
    g.add_argument("--kv-cache", default="virtual",
                   help="KV cache manager: virtual (vAttention, default) or paged (vLLM-style block pool), or any "
                        "other registered in memfit.llm.kv")
    g.add_argument("--kv-block-groups", action="store_true",
                   help="paged cache: allocate blocks in contiguous buddy groups, so a swap copies whole runs of "
                        "blocks (default: vLLM's per-block free list and per-block swap copies)")
    g.add_argument("--kv-layout", default="auto", choices=list(KV_LAYOUTS),
                   help="virtual cache page layout (auto: token-major on CUDA's 2 MiB pages, per-layer on CPU; head-major: "
                        "a segment per KV head, faster CPU decode attention, more partly filled pages)")
    g.add_argument("--memory-budget", default=None,
                   help="everything the engine holds (weights, tokenizer, runtime, the largest step, KV): bytes "
                        "('2GiB') or a fraction of the available memory ('0.5' or '50%%'); default 90%% of it")
    g.add_argument("--kv-budget", default=None,
                   help="optional cap on the KV cache inside the memory budget: bytes ('512MiB') or a fraction ('0.3', '30%%')")
    g.add_argument("--kv-reclaim-watermark", default="0",
                   help="idle KV memory kept committed for reuse: bytes or a fraction of the KV share (default 0)")
    g.add_argument("--kv-reclaim-idle-s", type=float, default=10.0,
                   help="seconds before idle KV pages above the watermark are given back (default 10)")
    g.add_argument("--no-kv-prefault", dest="kv_prefault", action="store_false",
                   help="commit KV pages only when needed, in the scheduler (default: ahead, on a background thread)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="prefill every prompt in full (default: reuse the KV of a cached prefix, docs/engine.md)")
    g.add_argument("--kv-eager-pages", type=int, default=None,
                   help="KV pages committed ahead of need per sequence (default 2 on a CPU, 1 on a GPU)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence, prompt and output, in tokens (default and most: the model's "
                        "max_position_embeddings)")
    g.add_argument("--max-num-seqs", type=int, default=max_num_seqs,
                   help=f"sequences decoded at once (default {max_num_seqs})")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="tokens (prefill and decode) one engine step processes; longer prompts are prefilled in "
                        "chunks of this size (default 512)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core; 1 is best for tiny models or a busy machine)")
    g.add_argument("--timeline", default=None,
                   help="write the per-step memory timeline here (JSON lines); generate and chat also plot it beside, "
                        "the suffix replaced by .png (tl.jsonl: tl.png), so the path must not end in .png")
    g.add_argument("--cpu-linear", default="auto", choices=list(CPU_LINEARS),
                   help="CPU matmuls: memfit's kernel on packed weights (blocked), its row-major kernel on the mapped checkpoint (memfit), oneDNN, or auto = blocked where it runs (docs/engine.md)")
    g.add_argument("--scheduling-policy", default="fcfs", choices=list(SCHEDULING_POLICIES),
                   help="fcfs (arrival order, priority ignored), priority (lower first, preemptive, with aging), or "
                        "vtc (fair share between the requests' `user`s, Virtual Token Counter)")
    g.add_argument("--priority-aging-steps", type=int, default=100,
                   help="priority policy: a waiting request's priority improves by one every this many steps (0: off)")
    g.add_argument("--preemption-mode", default="recompute", choices=list(PREEMPTION_MODES),
                   help="a preempted request's KV: recompute it later, swap it to the host tier, or auto (by cost)")
    g.add_argument("--swap-space", default=None,
                   help="host tier for swapped KV: bytes ('8GiB'); a bare number means GiB (default 4)")
    g.add_argument("--swap-threads", type=int, default=2,
                   help="threads copying swapped KV out and back in, overlapped with model steps (0: synchronous; "
                        "default 2)")
    g.add_argument("--no-swap-reuse", dest="swap_reuse", action="store_false",
                   help="free a sequence's host copy once swapped back in (default: keep it, so later swap-outs move "
                        "only new tokens and a conversation's next turn swaps its KV in instead of prefilling it)")
    g.add_argument("--swap-ssd-path", default=None,
                   help="a directory for the SSD swap tier below the host tier (one preallocated file, checksummed "
                        "extents); host chunks move there when the host tier is full")
    g.add_argument("--swap-ssd-space", default=None,
                   help="the SSD swap tier's size: bytes ('64GiB'); a bare number means GiB (default 16)")
    g.add_argument("--swap-ssd-prewrite", action="store_true",
                   help="write zeros over the SSD swap tier's file at start (progress on stderr), so no swap pays the "
                        "file system's first write into a preallocated extent (ext4 here: 1.4 ms vs 0.2 ms a rewrite)")
    g.add_argument("--ssd-swap", default=None, metavar="DIR[:SIZE]",
                   help="the SSD swap tier in one flag: --ssd-swap /nvme/memfit:64GiB is --swap-ssd-path /nvme/memfit "
                        "--swap-ssd-space 64GiB")
    g.add_argument("--speculative-model", default=None,
                   help="speculative decoding: a draft model (bundled name, e.g. memfit-tiny-draft, or a directory) with "
                        "the target's tokenizer, or self[:N] (the target's first N layers, default half); output is "
                        "distributed exactly as without it (docs/engine.md)")
    g.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="tokens the draft proposes per step, at most (default 4 with --speculative-model)")
    g.add_argument("--speculative-adaptive", action="store_true",
                   help="choose the number of draft tokens per sequence and step from the acceptance observed and the "
                        "measured cost of a draft pass, down to plain decoding where speculation would be slower")
    g.add_argument("--speculative-tree", "--tree", default=None, metavar="W,D",
                   help="tree speculation: W draft tokens (top-W, or W draws for sampled requests), each continued "
                        "to depth D, verified in one pass under a tree mask (docs/engine.md)")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split attention heads and MLP over this many processes (gloo on CPU, NCCL on CUDA); rank 0 "
                        "spawns the others, or run under torchrun (docs/parallel.md)")
    g.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                   help="CPU: run norms, RoPE, SiLU and attention as PyTorch ops instead of memfit's C++ kernels")
