"""models/llama.py: RoPE tables limited to the positions an engine can reach, with the same values."""
from __future__ import annotations

import pytest
import torch

from tests.llm.models.test_packing import tiny


def test_rotary_limit_keeps_the_first_rows_bit_for_bit():
    model = tiny(tie=False, dtype=torch.float32)
    rotary = model.rotary
    cos, sin = rotary.tables(torch.device("cpu"), torch.float32)
    assert cos.shape == sin.shape == (64, 16)  # (max_position_embeddings, head_dim)
    full = cos.clone(), sin.clone()
    rotary.limit(20)
    cos, sin = rotary.tables(torch.device("cpu"), torch.float32)
    assert cos.shape == (20, 16) and cos.untyped_storage().nbytes() == 20 * 16 * 4  # not a view of the full table
    assert torch.equal(cos, full[0][:20]) and torch.equal(sin, full[1][:20])
    rotary.limit(1000)  # never past the model's own positions
    assert rotary.tables(torch.device("cpu"), torch.float32)[0].shape == (64, 16)
    rotary.limit(20)
    ids = torch.randint(0, 96, (1, 20))
    logits = model.dense_logits(ids)
    rotary.limit(64)
    assert torch.equal(logits, model.dense_logits(ids))
    rotary.limit(8)
    with pytest.raises(IndexError):
        model.dense_logits(ids)  # a position past the limit is an error, never a wrong rotation
