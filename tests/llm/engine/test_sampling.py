import math

import pytest
import torch

from memfit.llm.engine import candidates
from memfit.llm.engine.sampling import (
    InvalidSamplingParams,
    Sampler,
    SamplingParams,
    TokenLogprobs,
    make_generator,
)

V = 50


def _logits(B: int, V: int = V, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * 3  # (B, V), spread enough that distributions are not flat


def _sample(logits, params, gens=None):
    gens = gens if gens is not None else [None] * len(params)
    return Sampler().sample(logits, params, gens)


# -- parameters ------------------------------------------------------------------------------------------


def test_defaults_and_normalisation():
    p = SamplingParams()
    assert p.stop == [] and p.stop_token_ids == [] and not p.greedy
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=1, temperature=2.0).greedy
    assert not SamplingParams(top_k=0).greedy  # 0 = off is accepted
    assert SamplingParams(logprobs=0).logprobs == 0 and SamplingParams(logprobs=20).logprobs == 20


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", True),
        ("max_tokens", 2.0),
        ("temperature", -0.1),
        ("temperature", float("inf")),
        ("temperature", float("nan")),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", float("nan")),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("seed", 1.5),
        ("logprobs", -1),
        ("logprobs", 21),
        ("logprobs", True),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", [1]),
        ("stop", ["s"] * 17),
        ("stop", 5),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["x"]),
        ("ignore_eos", "yes"),
    ],
)
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(InvalidSamplingParams, match=field) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, ValueError)


def test_range_is_in_the_message():
    with pytest.raises(InvalidSamplingParams, match=r"\(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidSamplingParams, match=r"\[0, 20\]"):
        SamplingParams(logprobs=50)


# -- token choice ----------------------------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = _logits(8)
    tokens, lps = _sample(logits, [SamplingParams(temperature=0)] * 8)
    assert tokens.dtype == torch.long and tokens.shape == (8,)
    assert torch.equal(tokens, logits.argmax(-1))
    assert lps == [None] * 8


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = _logits(6)
    params = [SamplingParams(temperature=0) if i % 2 == 0 else SamplingParams(temperature=1.5) for i in range(6)]
    for _ in range(5):
        tokens, _ = _sample(logits, params)
        assert torch.equal(tokens[::2], logits.argmax(-1)[::2])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_1_equals_greedy(temperature):
    logits = _logits(16, seed=1)
    for _ in range(3):
        tokens, _ = _sample(logits, [SamplingParams(temperature=temperature, top_k=1)] * 16)
        assert torch.equal(tokens, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_tiny_top_p_equals_greedy(temperature):
    logits = _logits(16, seed=2)
    for _ in range(3):
        tokens, _ = _sample(logits, [SamplingParams(temperature=temperature, top_p=1e-6)] * 16)
        assert torch.equal(tokens, logits.argmax(-1))


def test_min_p_near_one_equals_greedy():
    logits = _logits(16, seed=3)
    tokens, _ = _sample(logits, [SamplingParams(temperature=2.0, min_p=0.999)] * 16)
    assert torch.equal(tokens, logits.argmax(-1))


def _counts(logits_row: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    """Token counts over n draws of the same row (batched as n identical rows: one sample() call)."""
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()  # (n, V)
    tokens, _ = _sample(logits, [params] * n)
    return torch.bincount(tokens, minlength=logits.shape[1]).double()


def _chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson chi-square against expected counts, on cells with expectation >= 5 (rest pooled)."""
    n = counts.sum()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    stat = (((obs - exp) ** 2) / exp)[keep].sum().item()
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty 99.9% quantile of chi-square(dof): fails ~1 in 1000 for a correct sampler.
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat < crit


def test_temperature_1_matches_softmax():
    torch.manual_seed(1234)
    row = _logits(1, V=20, seed=4)[0] / 3  # moderate spread: most tokens have visible mass
    counts = _counts(row, SamplingParams(temperature=1.0), 40_000)
    probs = torch.softmax(row, -1)
    assert _chi_square_ok(counts, probs)
    # and a gross error (sampling at the wrong temperature) is detected by the same check
    assert not _chi_square_ok(counts, torch.softmax(row / 2.0, -1))


def test_temperature_scales_the_distribution():
    torch.manual_seed(99)
    row = _logits(1, V=20, seed=5)[0] / 3
    counts = _counts(row, SamplingParams(temperature=2.0), 40_000)
    assert _chi_square_ok(counts, torch.softmax(row / 2.0, -1))


def test_top_k_stays_inside_top_k_and_renormalises():
    torch.manual_seed(7)
    row = _logits(1, V=V, seed=6)[0] / 3
    counts = _counts(row, SamplingParams(temperature=1.0, top_k=5), 20_000)
    top5 = set(row.topk(5).indices.tolist())
    assert set(counts.nonzero().flatten().tolist()) <= top5
    probs = torch.zeros(V)
    probs[list(top5)] = torch.softmax(row[list(top5)], -1)
    assert _chi_square_ok(counts, probs)


def test_top_k_bigger_than_vocab_is_no_filter():
    torch.manual_seed(8)
    row = _logits(1, V=10, seed=7)[0] / 3
    counts = _counts(row, SamplingParams(top_k=1000), 20_000)
    assert _chi_square_ok(counts, torch.softmax(row, -1))


def test_top_p_keeps_the_nucleus():
    torch.manual_seed(9)
    row = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04]))
    counts = _counts(row, SamplingParams(top_p=0.8), 20_000)
    # 0.5 + 0.25 = 0.75 < 0.8, so the third token (0.15) is needed; the last two are dropped.
    assert counts[3] == 0 and counts[4] == 0
    assert _chi_square_ok(counts, torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9)


def test_top_k_then_top_p_and_min_p():
    torch.manual_seed(10)
    row = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    # top_k=3 renormalises to [4/9, 3/9, 2/9]; top_p=0.7 then keeps the first two (4/9 < 0.7 <= 7/9).
    counts = _counts(row, SamplingParams(top_k=3, top_p=0.7), 10_000)
    assert counts[2] == 0 and counts[3] == 0 and counts[0] > 0 and counts[1] > 0
    # min_p=0.6: keep p >= 0.24 -> tokens 0 and 1
    counts = _counts(row, SamplingParams(min_p=0.6), 10_000)
    assert counts[2] == 0 and counts[3] == 0
    assert _chi_square_ok(counts, torch.tensor([0.4, 0.3, 0, 0]) / 0.7)


def test_mixed_parameters_in_one_batch():
    torch.manual_seed(11)
    row = _logits(1, V=30, seed=8)[0]
    top3 = set(row.topk(3).indices.tolist())
    n = 600
    params = [SamplingParams(top_k=3), SamplingParams(temperature=0), SamplingParams(top_p=1e-9),
              SamplingParams(temperature=0.7)] * (n // 4)
    logits = row.unsqueeze(0).expand(n, -1).contiguous()
    tokens, _ = _sample(logits, params)
    argmax = int(row.argmax())
    assert set(tokens[0::4].tolist()) <= top3
    assert (tokens[1::4] == argmax).all() and (tokens[2::4] == argmax).all()


def test_masked_vocabulary_is_never_sampled():
    torch.manual_seed(12)
    logits = torch.zeros(200, 10)
    logits[:, 5:] = float("-inf")  # e.g. padded vocabulary entries
    tokens, _ = _sample(logits, [SamplingParams()] * 200)
    assert tokens.max() < 5 and len(set(tokens.tolist())) == 5


def test_half_precision_logits():
    logits = _logits(4).to(torch.bfloat16)
    tokens, _ = _sample(logits, [SamplingParams(temperature=0)] * 4)
    assert torch.equal(tokens, logits.float().argmax(-1))


def test_shape_errors():
    with pytest.raises(ValueError, match="batch, vocab"):
        _sample(torch.zeros(5), [SamplingParams()])
    with pytest.raises(ValueError, match="params"):
        _sample(torch.zeros(2, 5), [SamplingParams()])


# -- seeds -----------------------------------------------------------------------------------------------


def test_make_generator():
    assert make_generator(None) is None
    g = make_generator(42)
    assert isinstance(g, torch.Generator) and g.device.type == "cpu"


def _run_steps(logits_steps, params, seeds):
    """Decode several steps; returns (steps, B) tokens. Generators persist across steps like in the engine."""
    gens = [make_generator(s) for s in seeds]
    return torch.stack([_sample(lg, params, gens)[0] for lg in logits_steps])


def test_seed_reproducible_regardless_of_batch():
    steps = 12
    target = [_logits(1, seed=100 + t)[0] for t in range(steps)]  # the seeded request's logits per step
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    alone = _run_steps([t.unsqueeze(0) for t in target], [p], [1234])[:, 0]

    # Same request at row 2 of a batch of 5 with other seeded and unseeded, greedy and sampled neighbours.
    others = [SamplingParams(temperature=0.8, seed=7), SamplingParams(), SamplingParams(temperature=0),
              SamplingParams(top_k=4, seed=99)]
    params = others[:2] + [p] + others[2:]
    seeds = [o.seed for o in others[:2]] + [1234] + [o.seed for o in others[2:]]
    batch = [torch.cat([_logits(2, seed=500 + t), target[t].unsqueeze(0), _logits(2, seed=900 + t)])
             for t in range(steps)]
    torch.manual_seed(0)  # the global RNG state must not matter to a seeded row
    in_batch = _run_steps(batch, params, seeds)[:, 2]
    torch.manual_seed(321)
    in_batch_again = _run_steps(batch, params, seeds)[:, 2]

    assert torch.equal(alone, in_batch) and torch.equal(alone, in_batch_again)


def test_different_seeds_differ():
    logits = [torch.zeros(1, 1000) for _ in range(10)]  # uniform: two seeds agreeing 10 times is ~1e-30
    a = _run_steps(logits, [SamplingParams(seed=1)], [1])
    b = _run_steps(logits, [SamplingParams(seed=2)], [2])
    assert not torch.equal(a, b)


# -- logprobs --------------------------------------------------------------------------------------------


def test_logprobs_match_log_softmax_of_raw_logits():
    logits = _logits(4, seed=13)
    params = [SamplingParams(temperature=0.5, logprobs=5), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=0), SamplingParams(top_k=3, logprobs=20)]
    tokens, lps = _sample(logits, params)
    ref = torch.log_softmax(logits.double(), -1)
    assert lps[1] is None
    for i in (0, 2, 3):
        lp = lps[i]
        assert isinstance(lp, TokenLogprobs)
        assert lp.token_id == int(tokens[i])
        # the model's distribution, not the temperature-scaled / filtered one
        assert lp.logprob == pytest.approx(float(ref[i, tokens[i]]), abs=1e-5)
        n = params[i].logprobs
        assert len(lp.top) == n
        expected_ids = ref[i].topk(n).indices.tolist() if n else []
        assert list(lp.top.keys()) == expected_ids  # most likely first
        for t, v in lp.top.items():
            assert v == pytest.approx(float(ref[i, t]), abs=1e-5)
        vals = list(lp.top.values())
        assert vals == sorted(vals, reverse=True)
    assert lps[2].top == {}
    # greedy row with logprobs: the chosen token is the top-1 alternative
    assert lps[0].top.get(lps[0].token_id, lps[0].logprob) == pytest.approx(lps[0].logprob)


def test_logprobs_include_chosen_when_in_top():
    logits = _logits(3, seed=14)
    _, lps = _sample(logits, [SamplingParams(temperature=0, logprobs=3)] * 3)
    for i, lp in enumerate(lps):
        assert lp.token_id in lp.top
        assert next(iter(lp.top)) == lp.token_id == int(logits[i].argmax())


def _reference_mask(scaled: torch.Tensor, k: int, p: float) -> torch.Tensor:
    """Kept tokens by the textbook method: full sort, top-k, renormalise, exclusive cumsum < top_p."""
    s, order = scaled.double().sort(descending=True)
    if k > 0:
        s[k:] = float("-inf")
    probs = torch.softmax(s, -1)
    before = probs.cumsum(-1) - probs
    keep_sorted = (before < p) & torch.isfinite(s) if p < 1 else torch.isfinite(s)
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


@pytest.mark.parametrize("spread", [0.05, 1.0, 8.0])  # 0.05: nearly flat, the nucleus spans most of V
def test_top_k_top_p_candidates_match_full_sort(spread, monkeypatch):
    V = 3000  # > 256 candidates so the widening search is exercised
    g = torch.Generator().manual_seed(int(spread * 100))
    cases = [(-1, 0.9), (-1, 0.5), (50, 0.95), (1000, 0.99), (7, 1.0), (2999, 0.3), (-1, 0.999), (3, 0.01)]
    logits = torch.randn(len(cases), V, generator=g) * spread
    params = [SamplingParams(top_k=k, top_p=p, temperature=0.7) for k, p in cases]
    together = _by_row(Sampler(), logits, params)
    # one row at a time too: then the search starts at 256 candidates and must widen for flat rows
    alone = [_by_row(Sampler(), logits[i : i + 1], params[i : i + 1])[0] for i in range(len(cases))]
    for i, (k, p) in enumerate(cases):
        for vals, ids in (together[i], alone[i]):
            _check_candidates(vals, ids, logits[i] / 0.7, k, p, V)
    # and in blocks of at most two rows (the bound a tight scratch budget gives), the search starting at 256
    # (no top-k near V among these rows): the same kept sets, with rows settling apart within a block
    rows = [i for i, (k, _) in enumerate(cases) if k < 1000]
    searched = []
    search = candidates._search

    def watched(sub, *args):
        found, settled = search(sub, *args)
        searched.append((len(settled), int(settled.sum())))
        return found, settled

    monkeypatch.setattr(candidates, "_search", watched)
    tight = {}
    for c in candidates.candidate_blocks(logits, params, rows, Sampler.first_candidates,
                                         candidates.row_cost_bytes(1024, V)):
        assert len(c.rows) <= 2
        tight.update({r: (c.vals[j], c.ids[j]) for j, r in enumerate(c.rows.tolist())})
    assert sorted(tight) == rows and max(n for n, _ in searched) == 2
    if spread < 1:  # flat rows widen: some block settles one row and sends the other on
        assert any(0 < done < n for n, done in searched), searched
    for i in rows:
        _check_candidates(*tight[i], logits[i] / 0.7, *cases[i], V)


def _by_row(sampler, logits, params):
    """Sampler._blocks' kept tokens, row by row: {row: (vals, ids)}; every row comes exactly once."""
    out = {}
    for c in sampler._blocks(logits, params, list(range(len(params)))):
        for j, r in enumerate(c.rows.tolist()):
            assert r not in out
            out[r] = (c.vals[j], c.ids[j])
    assert sorted(out) == list(range(len(params)))
    return out


def _check_candidates(vals, ids, scaled, k, p, V):
    ref = _reference_mask(scaled, k, p).nonzero().flatten()
    kept = torch.isfinite(vals)
    got = ids[kept]
    assert torch.equal(got, got.sort().values)  # vocabulary order
    assert (ids[~kept] == V).all()  # padding
    # float32 vs float64 cumsums may disagree on the one token sitting at the top_p boundary
    assert abs(len(got) - len(ref)) <= 1 and len(set(got.tolist()) ^ set(ref.tolist())) <= 1, (k, p)
    assert torch.allclose(vals[kept], scaled[got])


def test_filtered_and_unfiltered_paths_walk_the_same_order():
    # top_k = V-1 drops only a token of probability ~0, so both paths sample one distribution; with the same
    # seed they must pick the same tokens (the CDF is walked in vocabulary order by both).
    steps = [_logits(1, seed=300 + t) for t in range(20)]
    for lg in steps:
        lg[0, -1] = -1e9
    a = _run_steps(steps, [SamplingParams(top_k=V - 1, seed=5)], [5])
    b = _run_steps(steps, [SamplingParams(seed=5)], [5])
    assert torch.equal(a, b)
    assert len(set(a.flatten().tolist())) > 1  # really sampled, not argmax


def test_plain_seeded_row_reproducible_in_batch():
    steps = [_logits(1, seed=700 + t) for t in range(10)]
    alone = _run_steps(steps, [SamplingParams(seed=3)], [3])[:, 0]
    batch = [torch.cat([_logits(1, seed=800 + t), s, _logits(1, seed=850 + t)]) for t, s in enumerate(steps)]
    params = [SamplingParams(top_p=0.5), SamplingParams(seed=3), SamplingParams(temperature=0)]
    assert torch.equal(alone, _run_steps(batch, params, [None, 3, None])[:, 1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_logits_match_cpu():
    # draws come from CPU generators, so the same seed gives the same tokens on either device
    steps = [_logits(4, seed=1000 + t) for t in range(8)]
    params = [SamplingParams(temperature=0), SamplingParams(seed=1), SamplingParams(top_p=0.9, seed=2),
              SamplingParams(top_k=5, seed=3, logprobs=3)]
    seeds = [None, 1, 2, 3]
    cpu = _run_steps(steps, params, seeds)
    gpu = _run_steps([s.cuda() for s in steps], params, seeds)
    assert gpu.device.type == "cuda"
    assert torch.equal(cpu, gpu.cpu())
    _, lps = _sample(steps[0].cuda(), params)
    assert lps[3] is not None and len(lps[3].top) == 3


def test_top_p_that_underflows_float32_keeps_the_most_likely_token():
    logits = torch.tensor([[0.5, 3.0, 1.0, -2.0]])
    tokens, _ = Sampler().sample(logits, [SamplingParams(temperature=1.0, top_p=1e-162, seed=0)], [make_generator(0)])
    assert tokens.tolist() == [1]


def test_all_greedy_batch_in_bf16_picks_the_fp32_argmax_with_ties_to_the_first():
    logits = _logits(6, seed=77).to(torch.bfloat16)  # (6, V); bf16 rounding creates ties
    logits[2, 5] = logits[2, 9] = logits[2].max() + 1  # an exact tie: the first index wins
    tokens, lps = Sampler().sample(logits, [SamplingParams(temperature=0)] * 6, [None] * 6)
    assert torch.equal(tokens, logits.float().argmax(dim=-1)) and tokens[2].item() == 5
    assert lps == [None] * 6
    # Asking for logprobs takes the fp32 path, with the same tokens.
    tokens2, lps2 = Sampler().sample(logits, [SamplingParams(temperature=0, logprobs=2)] * 6, [None] * 6)
    assert torch.equal(tokens2, tokens) and all(lp is not None and lp.token_id == t for lp, t in zip(lps2, tokens.tolist()))
