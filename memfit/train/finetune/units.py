"""The model cut into swap groups and compute units, and each unit's forward on borrowed weights.

A *group* is the set of parameters swapped as one flat buffer: the embedding, each decoder layer, and the
head (final norm, plus lm_head unless it is tied to the embedding). A *unit* is one step of the layer-wise
forward: embed -> layer 0 .. layer L-1 -> head (norm, logits, loss). A unit uses its own group, and the head
of a tied model uses the embedding's group too.

The model skeleton is built on the meta device (no storage at all); a unit runs its modules with
`torch.func.functional_call` on weights viewed out of the fetched flat buffers, so the engine's model code
is what trains, and the device never holds more than the groups in flight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from memfit.llm.kernels.attention import DenseCausalAttention
from memfit.llm.models import LlamaForCausalLM, ModelConfig, build_model
from memfit.train.finetune.data import IGNORE


@dataclass(frozen=True)
class Group:
    name: str
    params: tuple[tuple[str, tuple[int, ...]], ...]  # (HF name, shape) in buffer order

    @property
    def numel(self) -> int:
        return sum(_numel(s) for _, s in self.params)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view of `flat` (numel,) with the parameter's shape."""
        out, off = {}, 0
        for name, shape in self.params:
            n = _numel(shape)
            out[name] = flat[off : off + n].view(shape)
            off += n
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _SkipInit(TorchFunctionMode):
    """Skips `torch.nn.init`'s initialisers while the skeleton is built: on the meta device they have nothing
    to fill, but torch runs `normal_` on a meta tensor through its Python decompositions, whose first use
    imports torch._dynamo (sympy, triton...): about 150 MiB of RSS that the trainer never needed."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            t = args[0] if args else kwargs["tensor"]
            if t.device.type == "meta":
                return t
        return func(*args, **kwargs)


def skeleton(cfg: ModelConfig) -> LlamaForCausalLM:
    with torch.device("meta"), _SkipInit():
        return build_model(cfg)


def make_groups(model: LlamaForCausalLM) -> list[Group]:
    """Groups in forward order: embed, layer.0 .. layer.{L-1}, head."""
    cfg = model.config

    def named(prefix: str, module: torch.nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return tuple((f"{prefix}.{n}", tuple(p.shape)) for n, p in module.named_parameters())

    groups = [Group("embed", (("model.embed_tokens.weight", tuple(model.model.embed_tokens.weight.shape)),))]
    groups += [Group(f"layer.{i}", named(f"model.layers.{i}", layer)) for i, layer in enumerate(model.model.layers)]
    head = [("model.norm.weight", tuple(model.model.norm.weight.shape))]
    if not cfg.tie_word_embeddings:
        head.append(("lm_head.weight", tuple(model.lm_head.weight.shape)))
    groups.append(Group("head", tuple(head)))
    return groups


def unit_groups(groups: list[Group], tied: bool) -> list[list[int]]:
    """For each unit (embed, layers, head), the indices of the groups it reads."""
    n = len(groups)
    return [[0]] + [[i] for i in range(1, n - 1)] + [[n - 1, 0] if tied else [n - 1]]


State = tuple[torch.Tensor, ...]  # what flows between units: (ids,) into embed, (x, residual) between layers


# Temporaries per token of one chunk of the head's logits: the logits in the compute dtype and in float32,
# cross-entropy's saved log-softmax, the float32 gradient and its compute-dtype copy (2 + 4 + 4 + 4 + 2 bytes
# per vocabulary entry, at most).
LOGIT_BYTES_PER_ENTRY = 16
# About 16 MiB a chunk (32 tokens at a 32k vocabulary; the 32-token floor below gives 78 MB at 152k). Was 256 MiB:
# at 0.1B a 141-token step then held all its logits at once, 61 MiB of allocator peak in the head against
# 18 MiB in 32-token chunks (measured with AllocatorMeter); the matrix products are the same in number
# of flops, only cut into more calls, and the output matrix's gradient is summed over more chunks.
DEFAULT_LOSS_CHUNK_BYTES = 16 << 20
# Vocabulary rows of the output matrix's gradient made at once: 1024 x C in the compute dtype (1.5 MiB at C = 768),
# and in float32 where a streamed update makes it a block at a time (HeadRows, gradients.RowBlocks: 3 MiB). Was
# 4096: memascend's 0.1B step then peaked in the head's and the embedding's updates, 24-32 MiB above the step's
# floor (benchmarks/finetune_phases.py); every design uses the same blocks, so their losses stay equal.
HEAD_GRAD_ROWS = 1024


def loss_chunk_tokens(vocab_size: int, chunk_bytes: int = DEFAULT_LOSS_CHUNK_BYTES) -> int:
    """Tokens per chunk of the head's logits so that one chunk's temporaries take about `chunk_bytes`
    (at least 32 tokens, so each chunk is still a matrix product, not a vector one)."""
    return max(32, chunk_bytes // (LOGIT_BYTES_PER_ENTRY * vocab_size))


class UnitRunner:
    """Runs unit k's forward given its weights (name -> tensor) and input state, and the head's forward and
    backward at once (`head_step`), its logits a chunk of tokens at a time."""

    def __init__(self, model: LlamaForCausalLM, loss_chunk: int | None = None) -> None:
        self.model = model
        self.cfg = model.config
        self.n_layers = model.config.num_hidden_layers
        self.loss_chunk = loss_chunk or loss_chunk_tokens(self.cfg.vocab_size)
        self.head_weight = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"

    def forward(self, k: int, weights: dict[str, torch.Tensor], state: State, batch: Batch) -> State:
        """Units 0 .. n_layers (embed and decoder layers); the head goes through `head_step`."""
        m = self.model
        if k == 0:
            w = weights["model.embed_tokens.weight"]  # (V, C), or read in row blocks (vocab.VocabReader)
            ids = batch.ids.reshape(-1)
            return (F.embedding(ids, w) if isinstance(w, torch.Tensor) else w.embed(ids),)  # (N, C)
        if k > self.n_layers:
            raise ValueError(f"unit {k} is the head: use head_step")
        i = k - 1
        prefix = f"model.layers.{i}."
        local = {n[len(prefix):]: w for n, w in weights.items() if n.startswith(prefix)}
        x, residual = state[0], (state[1] if len(state) > 1 else None)
        rope = m.rotary.at(batch.positions, x.dtype)
        x, residual = functional_call(m.model.layers[i], local, (x, residual, rope, batch.attention))
        return (x, residual)

    def head_step(self, weights: dict[str, torch.Tensor], state: State, batch: Batch, loss_scale: float,
                  head_grad: torch.Tensor | HeadRows) -> torch.Tensor:
        """The head's forward and backward: final norm, logits, the mean cross-entropy over the batch's
        assistant tokens, and its gradients. Returns the (unscaled) loss, a float32 scalar.

        `state` is (x, residual), autograd leaves: their gradients, and the norm weight's, land in `.grad`.
        The output matrix's gradient (times `loss_scale`) is added into `head_grad`, (V, C) float32.

        Why chunks: the whole logits matrix is (N, V), and with its float32 copy and gradients it takes about
        16 bytes per entry: 20 GB at 8k tokens of a 152k vocabulary, more than the rest of the step. The
        head's forward and backward run back to back anyway, so each chunk of tokens computes its logits, its
        loss and its gradients, and drops them before the next chunk (the fused linear cross-entropy of
        Liger-Kernel and others); the peak is one chunk's. Chunks with no assistant token are skipped: their
        loss and gradients are zero.

        The two matrix products of the chunk's backward are written out as autograd's `MmBackward0` makes
        them (logits = hc @ w.T: grad_hc = g @ w, grad_w = (hc.T @ g).T), the second a block of
        HEAD_GRAD_ROWS vocabulary rows at a time straight into `head_grad`: the whole (V, C) gradient in the
        compute dtype (47 MiB at a 32k vocabulary, 260 MiB at 152k) is never held. Each element is the
        same dot product over the chunk's tokens, so the bits equal autograd's (tested).

        `head_grad` a `HeadRows`: the chunks' factors (hc, g) are kept instead, and the float32 gradient is
        made later a block of rows at a time by the same products (streamed updates of an untied head).
        """
        if not isinstance(weights[self.head_weight], torch.Tensor):  # read in row blocks (vocab.VocabReader)
            return weights[self.head_weight].head_step(self, weights, state, batch, loss_scale, head_grad)
        x, residual = state
        # h: (N, C) with autograd back to x, residual and the norm weight
        h = self.model.model.norm.ops.add_rms_norm(x, residual, weights["model.norm.weight"], self.cfg.rms_norm_eps)[1]
        w = weights[self.head_weight].detach()  # (V, C); its gradient goes to head_grad
        hd = h.detach()
        grad_h = torch.zeros_like(hd)  # (N, C)
        labels = batch.labels.reshape(-1)  # (N,)
        per_target = loss_scale / batch.n_targets  # mean over the targets, scaled for fp16
        total = torch.zeros((), dtype=torch.float32, device=hd.device)
        for start in range(0, hd.shape[0], self.loss_chunk):
            end = start + self.loss_chunk
            target = labels[start:end]
            if not bool((target != IGNORE).any()):
                continue
            hc = hd[start:end]  # (n, C)
            logits = F.linear(hc, w).requires_grad_(True)  # (n, V), compute dtype
            # cross-entropy in float32: its log-sum-exp needs the range
            loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
            (g,) = torch.autograd.grad(loss * per_target, (logits,))  # (n, V), compute dtype
            total += loss.detach()
            del logits, loss  # the float32 temporaries go with the graph
            grad_h[start:end] = g.mm(w)  # (n, C)
            if isinstance(head_grad, HeadRows):
                head_grad.keep(hc, g)
                del g
                continue
            for r in range(0, w.shape[0], HEAD_GRAD_ROWS):
                # float32 accumulator: chunk gradients are summed at full precision
                head_grad[r : r + HEAD_GRAD_ROWS].add_(hc.t().mm(g[:, r : r + HEAD_GRAD_ROWS]).t())
            del g
        h.backward(grad_h)
        return total / batch.n_targets


class HeadRows:
    """The output matrix's float32 gradient (V, C) held as its factors: per chunk of tokens, hc (n, C) and the
    logits' gradient g (n, V) in the compute dtype, so that it can be made a block of vocabulary rows at a
    time (`rows`) while an update consumes it, instead of all at once.

    Why: with few tokens the factors are smaller than the gradient (n * V * 2 bytes against V * C * 4: at 0.1B
    and 256 tokens, 16 MB against 98 MB), and an update that reads the gradient block by block then never
    holds the (V, C) matrix. `rows` runs the products `head_step` runs for its dense accumulator, block for
    block (HEAD_GRAD_ROWS rows from row 0) and chunk for chunk, into a zeroed float32 block: same bits."""

    def __init__(self, vocab: int, width: int) -> None:
        self.shape = (vocab, width)
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(self, hc: torch.Tensor, g: torch.Tensor) -> None:
        self.chunks.append((hc, g))

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the gradient, (r1 - r0, C) float32; r0 a multiple of HEAD_GRAD_ROWS and r1 the
        block's end (or V), so the products are `head_step`'s."""
        if r0 % HEAD_GRAD_ROWS or r1 != min(r0 + HEAD_GRAD_ROWS, self.shape[0]):
            raise ValueError(f"rows {r0}:{r1} are not one block of {HEAD_GRAD_ROWS}")
        device = self.chunks[0][0].device if self.chunks else "cpu"
        acc = torch.zeros((r1 - r0, self.shape[1]), dtype=torch.float32, device=device)
        for hc, g in self.chunks:
            acc.add_(hc.t().mm(g[:, r0:r1]).t())
        return acc


def embedding_grad_rows(ids: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding matrix's gradient on the rows the batch's tokens hit: (token ids (U,), their rows (U, C) in
    grad's dtype), from ids (N,) and the gradient of the embedding's output, grad (N, C).

    Why: autograd's backward of F.embedding (embedding_dense_backward_cpu) makes the whole (V, C) gradient,
    zeroed, in the compute dtype (47 MiB at 0.1B, 272 MiB at Qwen's 152k vocabulary), for the few hundred rows
    a step's tokens touch. It adds each position's row into its token's row in position order, each add
    rounded to the dtype; the same adds run here in the same order per token, one round per occurrence (the
    r-th position of every token at once), so the rows carry autograd's bits on the CPU (tested)."""
    uniq, inv, counts = torch.unique(ids, return_inverse=True, return_counts=True)  # (U,), (N,), (U,)
    n = ids.numel()
    grouped = torch.argsort(inv, stable=True)  # positions by token, each token's in position order
    rank = torch.empty_like(inv)  # (N,) how many earlier positions hold the same token
    rank[grouped] = torch.arange(n, device=ids.device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    by_rank = torch.argsort(rank, stable=True)
    rows = torch.zeros((uniq.numel(), grad.shape[-1]), dtype=grad.dtype, device=grad.device)  # (U, C)
    at = 0
    for size in torch.bincount(rank).tolist():
        pos = by_rank[at : at + size]  # one position per token at most: the adds of a round are independent
        at += size
        rows[inv[pos]] = rows[inv[pos]] + grad[pos]
    return uniq, rows


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B*T,)
    attention: DenseCausalAttention
    n_targets: int

    @classmethod
    def make(cls, ids: torch.Tensor, labels: torch.Tensor, model: LlamaForCausalLM, device: torch.device) -> Batch:
        b, t = ids.shape
        positions = torch.arange(t, device=device).repeat(b)
        attn = DenseCausalAttention([t] * b, model.scale, model.config.sliding_window)
        n = int((labels != IGNORE).sum())
        return cls(ids.to(device), labels.to(device), positions, attn, n)
