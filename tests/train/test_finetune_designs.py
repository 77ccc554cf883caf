"""The two host-memory designs: their pools, their overflow checks (memory measured by torch's profiler),
and AdamW against torch's own."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from memfit.llm.models import ModelConfig
from memfit.train.finetune.designs import (OVERFLOW_CHUNK, MemAscend, ZeroInfinity, ZeroInfinityTuned, make_design,
                                           sub_groups)
from memfit.train.finetune.optim import AdamW
from memfit.train.finetune.units import make_groups, skeleton

LLAMA_01B = ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=12, num_key_value_heads=12, head_dim=64)


def _peak_alloc_bytes(fn) -> int:
    """Peak bytes the CPU allocator holds above the start while fn runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for ev in sorted(events, key=lambda e: e.start_ns()):
        live += ev.nbytes()  # + allocation, - free
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("design", [ZeroInfinity(), MemAscend()])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), None])
def test_overflow_checks_find_every_non_finite_value(design, bad):
    g = torch.randn(300_000)
    if bad is not None:
        g[299_999] = bad
    assert design.has_overflow(g) is (bad is not None)


def test_fused_check_has_no_n_sized_temporary():
    n = 4_000_000
    g = torch.randn(n)
    unfused = _peak_alloc_bytes(lambda: ZeroInfinity().has_overflow(g))
    fused = _peak_alloc_bytes(lambda: MemAscend().has_overflow(g))
    assert unfused >= n  # isinf(g) / isnan(g): at least one bool per element
    assert fused <= 8 * OVERFLOW_CHUNK  # a chunk's temporaries, whatever n is
    assert fused < unfused / 10
    # The plan's figures for these temporaries bound what the profiler saw.
    assert unfused <= ZeroInfinity().overflow_temp_bytes(n) and fused <= MemAscend().overflow_temp_bytes(n)


def test_pools_of_a_llama_shape():
    groups = make_groups(skeleton(LLAMA_01B))
    layer = groups[1].numel
    embed = groups[0].numel
    zi, ma = ZeroInfinity(), MemAscend()
    zi_param = zi.param_classes(groups, 2, in_flight=4)
    assert zi_param == {(int(1e8) * 2 + 4095) // 4096 * 4096: 5}  # 5 x 1e8 elements (aligned), whatever the model
    ma_param = ma.param_classes(groups, 2, in_flight=4)
    slot = lambda n: (n * 2 + 4095) // 4096 * 4096  # noqa: E731  (bf16 bytes, O_DIRECT-aligned)
    # Three units hold slots at once (the prefetcher's depth 2, plus the unit computed). With the vocabulary
    # matrices read in row blocks (vocab.py) the embedding and the head fetch nothing whole: three layer slots
    # (three consecutive layers of the schedule) and two block slots of 1024 rows, in a pool of their own.
    assert ma_param == {slot(layer): 3}
    block = (1024 * 768 * 2 + 4095) // 4096 * 4096 + 2 * 4096
    assert ma.block_classes(groups, 2) == {block: 2} and zi.block_classes(groups, 2) == {}
    tied = make_groups(skeleton(dataclasses.replace(LLAMA_01B, tie_word_embeddings=True)))
    assert ma.param_classes(tied, 2, in_flight=4) == {slot(layer): 3}
    whole = MemAscend()
    whole.vocab_blocks = False  # whole groups: the embedding and the untied head, at the two ends of the fetch
    # schedule, never together, share one slot (the head's, 768 elements larger); three consecutive units hold
    # at most two layers (the third slot is the shared one). Tied: the head unit reads the embedding too,
    # beside two layers, and the final norm's own small slot.
    assert whole.param_classes(groups, 2, in_flight=4) == {slot(groups[-1].numel): 1, slot(layer): 2}
    assert whole.param_classes(tied, 2, in_flight=4) == {slot(embed): 1, slot(layer): 2, slot(tied[-1].numel): 1}
    assert whole.block_classes(groups, 2) == {}
    assert sum(b * c for b, c in ma_param.items()) < 0.2 * sum(b * c for b, c in zi_param.items())
    # Optimizer: DeepSpeed sizes 4 slots for its largest sub-group, which below sub_group_size (1e9 elements)
    # is the whole model; MemAscend 3 of the layer class per set in flight, capped at half the aio engine's 8 MiB
    # in flight (1M fp32: reads and writes fly together).
    total = sum(g.numel for g in groups)
    assert embed > 3 * layer
    assert zi.optimizer_classes(groups) == {(total + 4095) // 4096 * 4096 * 4: 4}  # pieces: 4096 elements
    assert layer > 1 << 20 and ma.optimizer_classes(groups) == {(1 << 20) * 4: 9}  # fp32 compute: no copy
    # bf16: 3 sets in flight (update_depth), each master + moments and the piece's 16-bit compute copy
    assert ma.update_depth == 3 and ma.optimizer_classes(groups, 2) == {(1 << 20) * 4: 9, (1 << 20) * 2: 3}
    engine = ma.aio()
    assert engine.block_size * engine.queue_depth == 2 * (1 << 20) * 4  # the bytes it keeps in flight
    engine.close()
    small = make_groups(skeleton(dataclasses.replace(LLAMA_01B, hidden_size=256, intermediate_size=512,
                                                     num_attention_heads=4, num_key_value_heads=4, head_dim=64)))
    small_layer = small[1].numel  # below the cap: the layer class itself
    assert small_layer < 1 << 20 and ma.optimizer_classes(small) == {(small_layer + 4095) // 4096 * 4096 * 4: 9}
    # The 16-bit parameters stay in host memory under ZeRO-3's max_in_cpu (1e9); MemAscend streams them.
    assert zi.host_param_copy(groups) and not ma.host_param_copy(groups)


def test_zero3_sub_groups_and_max_in_cpu_beyond_1e9_parameters():
    """A 2.3B-parameter shape: sub-groups close at the first parameter reaching 1e9 elements (stage3.py
    _create_fp16_sub_groups), and the parameters no longer fit max_in_cpu."""
    big = ModelConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=16, num_key_value_heads=16, head_dim=128)
    groups = make_groups(skeleton(big))
    sizes = [n for g in groups for n in (math.prod(s) for _, s in g.params)]
    subs = sub_groups(groups, int(1e9))
    assert sum(subs) == sum(sizes) and len(subs) == 3
    # the first closes exactly where the running sum first reaches 1e9
    first = next(i for i in range(len(sizes)) if sum(sizes[: i + 1]) >= 1e9)
    assert subs[0] == sum(sizes[: first + 1])
    assert ZeroInfinity().optimizer_piece(groups) == (max(subs) + 4095) // 4096 * 4096
    assert not ZeroInfinity().host_param_copy(groups)


def test_tuned_zero_infinity_sizes_its_optimizer_slots_for_the_largest_parameter():
    """sub_group_size at its smallest: every parameter its own sub-group, so the 4 slots (and the first step's
    fresh moments) hold the largest parameter, here the embedding, not the whole model; the 5 parameter buffers
    hold the largest parameter too, not 1e8 elements; the rest as the defaults."""
    groups = make_groups(skeleton(LLAMA_01B))
    sizes = [math.prod(s) for g in groups for _, s in g.params]
    assert sub_groups(groups, 1) == sizes
    tuned, default = make_design("zero-infinity-tuned"), ZeroInfinity()
    assert isinstance(tuned, ZeroInfinityTuned) and tuned.name == "zero-infinity-tuned"
    piece = (max(sizes) + 4095) // 4096 * 4096
    assert tuned.optimizer_piece(groups) == piece == (LLAMA_01B.vocab_size * LLAMA_01B.hidden_size + 4095) // 4096 * 4096
    assert tuned.optimizer_classes(groups) == {piece * 4: 4}
    assert 5 * tuned.optimizer_piece(groups) < default.optimizer_piece(groups)
    largest = max(g.numel for g in groups)  # buffer_size at the least DeepSpeed accepts: the largest parameter
    assert tuned.param_classes(groups, 2, 4) == {(largest * 2 + 4095) // 4096 * 4096: 5}
    assert default.param_classes(groups, 2, 4) == {(int(1e8) * 2 + 4095) // 4096 * 4096: 5}
    assert tuned.host_param_copy(groups) and tuned.fresh_first_moments
    with pytest.raises(ValueError, match="zero-infinity-tuned"):
        make_design("zero")


def test_adamw_matches_torch():
    torch.manual_seed(0)
    p0 = torch.randn(5000)
    grads = [torch.randn(5000) for _ in range(4)]
    ref = p0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1, eps=1e-8)
    mine, m, v = p0.clone(), torch.zeros(5000), torch.zeros(5000)
    adam = AdamW(lr=1e-2, weight_decay=0.1)
    for step, g in enumerate(grads, 1):
        ref.grad = g.clone()
        opt.step()
        adam.update(mine, m, v, g * 8, step, grad_scale=8.0)
    torch.testing.assert_close(mine, ref.detach(), rtol=1e-6, atol=1e-7)
