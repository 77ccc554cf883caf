"""use_blocked_linears: swap a model's CPU nn.Linear layers for BlockedLinear (blocked.py), packed into one arena
in the order a decode step reads them, giving back each replaced checkpoint matrix's pages as it goes, and let a
packed tied head serve the token lookups (BlockedEmbedding)."""
from __future__ import annotations

import logging

import torch
from torch import nn

from memfit.llm.kernels.blocked import (DEFAULT_NB, BlockedEmbedding, BlockedLinear, blocked_arena, can_use_blocked,
                                        packed_numel)
from memfit.memory.host import transparent_huge_pages

log = logging.getLogger(__name__)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def use_blocked_linears(model: nn.Module, nb: int = DEFAULT_NB, huge_pages: bool = True) -> int:
    """Replace the model's CPU nn.Linear layers by BlockedLinear. Returns how many; 0 when the kernel is
    unavailable for the model's dtype (the model is then left untouched).

    A linear whose weight shares storage with an nn.Embedding (a tied lm_head) is packed only when that
    matrix is memory-mapped from the checkpoint: its resident pages are then given back, and token lookups
    read the packed head itself (`BlockedEmbedding`), so the matrix is held once and what is resident does
    not depend on which rows the tokens touched (the head is a large part of a small model: 136M of
    Qwen2.5-0.5B's 494M parameters, and the row-major kernel is 2.4x slower than the blocked one at 8 rows). An embedding in
    ordinary memory (e.g. converted to another dtype at load) keeps its head row-major: wrap it zero-copy
    afterwards with `memfit.llm.kernels.linear.use_row_major_linears`, which takes the nn.Linear layers left."""
    first = next(model.parameters(), None)  # not a list of them all: it would keep every replaced weight alive
    if first is None or first.device.type != "cpu" or not can_use_blocked(first.dtype):
        return 0
    dtype = first.dtype
    del first
    from memfit.memory.heap import trim_heap
    from memfit.memory.pages import drop_file_pages, file_mappings, is_file_backed

    embeddings = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    maps = file_mappings()
    todo = []
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.dtype != dtype:
                continue
            w = child.weight.detach()
            if any(_shares_storage(w, e) for e in embeddings) and not is_file_backed(w, maps):
                continue  # tied to an embedding in ordinary memory: see the docstring
            todo.append((parent, name, child))
    if not todo:
        return 0
    # Every packed weight in one huge-page arena, in the order a decode step reads them; packed one at a
    # time, each checkpoint matrix's pages given back at once, so at most one matrix is held twice.
    arena = blocked_arena([child for _, _, child in todo], nb, huge_pages)
    count = len(todo)
    todo.reverse()
    while todo:  # popped, so the last reference to a replaced weight (e.g. a fused copy) goes at once
        parent, name, child = todo.pop()
        w = child.weight.detach()
        setattr(parent, name, BlockedLinear(child, nb, out=arena.take(packed_numel(child, nb), w.dtype)))
        on_heap = not is_file_backed(w, maps)  # converted at load (another dtype): a copy on the C heap
        drop_file_pages(w, maps)  # a memory-mapped checkpoint's pages: given back
        del parent, child, w
        if on_heap:
            # Freed, its pages stay resident: glibc raises its mmap threshold to the largest block freed, so the
            # converted matrices sit in the heap and a free does not return them. Trimmed, each goes back as it
            # is packed (memfit-tiny loaded in float32: fitcheck's load peak 22.6 MiB against 29.7 untrimmed).
            trim_heap()
    _embed_from_packed_head(model, embeddings, maps)
    log.info("blocked kernel: %d weights packed into one %.1f MiB arena, %.1f MiB of it on huge pages (THP: %s)",
             count, arena.used_bytes / 2**20, arena.huge_page_bytes() / 2**20, transparent_huge_pages())
    return count


def _embed_from_packed_head(model: nn.Module, embeddings: list[torch.Tensor], maps: list) -> None:
    """A tied head now packed: look tokens up in it (BlockedEmbedding) and let go of the row-major matrix, whose
    mapped pages are given back, so the matrix is held once and the resident memory does not depend on which
    rows the tokens touched (the memory ledger counts weights exactly)."""
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    emb = getattr(inner, "embed_tokens", None)
    if not (isinstance(head, BlockedLinear) and isinstance(emb, nn.Embedding)
            and getattr(getattr(model, "config", None), "tie_word_embeddings", False)):
        return
    if (emb.num_embeddings, emb.embedding_dim) != (head.out_features, head.in_features) or emb.weight.dtype != head.dtype:
        return
    from memfit.memory.pages import drop_file_pages

    w = emb.weight.detach()
    inner.embed_tokens = BlockedEmbedding(head)
    embeddings.clear()  # the caller's list held the matrix too
    drop_file_pages(w, maps)
