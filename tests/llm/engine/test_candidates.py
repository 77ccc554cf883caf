"""The sampler's top-k / top-p search (engine/candidates.py) stays within its scratch bound, measured by the
kernel (VmHWM) in a fresh process where every tensor is its own mapping, so resident memory follows what is
allocated: nearly flat rows widen the search to the whole vocabulary, where an unbounded search holds ~10
float32 copies of the rows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.memory.measure import reset_peak_rss

ROOT = Path(__file__).resolve().parents[3]

PROBE = r"""
import ctypes, json, sys
ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD: each tensor its own mapping, unmapped when freed
import torch
torch.set_num_threads(1)
from memfit.llm.engine.sampling import Sampler, SamplingParams
from memfit.memory.measure import peak_rss_bytes, reset_peak_rss, rss_bytes
R, V, spread, what = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
head = sys.argv[5] if len(sys.argv) > 5 else ""  # a dtype: the head's output is made in it inside the measure
source = torch.randn(R, V, generator=torch.Generator().manual_seed(0)) * spread
params = [SamplingParams(temperature=0.8, top_p=1.0 if what.endswith("-plain") else 0.9, seed=i) for i in range(R)]
what = what.removesuffix("-plain")
s = Sampler()
def run():
    logits = source.to(getattr(torch, head)) if head else source  # (R, V): a copy in the head's dtype
    if what == "probs":
        return s.probs(logits, params)
    return s.sample(logits, params, s.generators_for([(str(i), i) for i in range(R)]))[0]
run()  # library pages and thread pools, once
peaks = []
for _ in range(3):  # the least of 3: the search's own scratch is the floor; an interpreter arena or heap page touched
    reset_peak_rss()  # in one pass only adds to it (a CI run once read 12.2 rows where reruns read 10.7-11.2)
    base = rss_bytes()
    kept = run()
    peaks.append(peak_rss_bytes() - base)
    del kept
print(json.dumps({"peak": min(peaks), "rows_bytes": R * V * 4}))
"""


def _probe(rows: int, vocab: int, spread: float, what: str, head: str = "") -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(rows), str(vocab), str(spread), what, head], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_hwm = pytest.mark.skipif(not reset_peak_rss(), reason="the peak RSS mark cannot be reset here")


@needs_hwm
@pytest.mark.parametrize("what", ["probs", "sample"])
def test_a_flat_batch_searches_within_one_copy_of_its_rows(what):
    # 40 rows = speculative verification of 8 sequences x (4 drafts + 1); 0.01: the nucleus spans most of V
    r = _probe(40, 32768, 0.01, what)
    copy = r["rows_bytes"]  # 5 MiB
    # probs returns its (R, V) distribution (one copy) and may use one more for the search; sample returns tokens
    allowed = (2 if what == "probs" else 1) * copy + 512 * 1024
    assert r["peak"] <= allowed, (r["peak"] / copy, "copies of the rows")


@needs_hwm
def test_one_flat_row_is_bounded_by_a_row_at_full_width():
    from memfit.llm.engine.candidates import BYTES_PER_CANDIDATE

    r = _probe(1, 65536, 0.01, "sample")  # one row: searched where it lies, no copy (the old search: 13.8 rows)
    assert r["peak"] <= 65536 * BYTES_PER_CANDIDATE + 256 * 1024, (r["peak"] / (65536 * 4), "rows")


@needs_hwm
@pytest.mark.parametrize("what", ["probs", "sample"])
def test_temperature_only_rows_take_one_copy(what):
    # no top-k or top-p: the softmax over the whole vocabulary, made in the rows' one copy (it was ~2 beside it)
    r = _probe(40, 32768, 0.01, what + "-plain")
    allowed = (2 if what == "probs" else 1) * r["rows_bytes"] + 512 * 1024
    assert r["peak"] <= allowed, (r["peak"] / r["rows_bytes"], "copies of the rows")


@needs_hwm
@pytest.mark.parametrize("what", ["sample", "sample-plain"])
def test_bf16_logits_and_their_float32_copy_fit_the_ledgers_term(what):
    """In bf16 the sampler widens the head's (R, V) output to float32 (bf16 cumsums lose too much) while the
    output is still held: 2 + 4 bytes a logit before the search's scratch. The ledger's term for the sampled
    rows (accounting.sampled_logits_bytes) counted 4 (float32 logits) + 4 (the scratch); measured 10.0 (ratio in
    the assertion's message)."""
    import torch

    from memfit.llm.engine.accounting import sampled_logits_bytes

    rows, vocab = 40, 32768
    r = _probe(rows, vocab, 0.01, what, "bfloat16")  # the head's output is made inside the measured span
    counted = sampled_logits_bytes(rows, vocab, torch.bfloat16)
    assert r["peak"] <= counted + 512 * 1024, (r["peak"] / (rows * vocab), "bytes a logit")
