"""Random initialisation a piece at a time (weights.LlamaInit): the same bits as drawing each parameter whole
(init_group, which the DeepSpeed reference starts from), and no group-sized fp32 temporary, measured by the
tensor allocator's own events (the profiler), not by the store."""
from __future__ import annotations

import random

import pytest
import torch

from memfit.llm.models import ModelConfig
from memfit.memory.allocator import AllocatorMeter
from memfit.train.finetune.designs import make_design
from memfit.train.finetune.store import GroupStore
from memfit.train.finetune.units import Group, make_groups, skeleton
from memfit.train.finetune.weights import LlamaInit, init_group, random_weights

# sizes around the 16-element blocks of torch's normal_ and around a small chunk (monkeypatched below)
ODD = Group("odd", (("a.weight", (5, 3)), ("b.weight", (100,)), ("input_layernorm.weight", (17,)),
                    ("c.bias", (9,)), ("d.weight", (33, 3)), ("e.weight", (16,)), ("f.weight", (47,)),
                    ("g.weight", (64, 2)), ("h.weight", (1,))))


def _pieces(n: int, rng: random.Random) -> list[int]:
    out = []
    while n:
        k = min(n, rng.choice([1, 7, 16, 31, 64, 4096, 1 << 20]))
        out.append(k)
        n -= k
    return out


@pytest.mark.parametrize("chunk", [32, 48, 1 << 16])
def test_pieces_give_init_groups_bits(monkeypatch, chunk):
    monkeypatch.setattr(LlamaInit, "CHUNK", chunk)
    shape = ModelConfig(vocab_size=3001, hidden_size=96, intermediate_size=200, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=24, attention_bias=True)
    groups = [ODD, *make_groups(skeleton(shape))]
    ref_gen, gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    rng = random.Random(chunk)
    for g in groups:
        want = init_group(g, ref_gen)[0]
        got = torch.full((g.numel,), float("nan"))
        stream, at = LlamaInit(g, gen), 0
        for k in _pieces(g.numel, rng):
            stream.fill(got[at : at + k])
            at += k
        assert torch.equal(got, want), g.name
        with pytest.raises(ValueError, match="more values"):
            stream.fill(torch.empty(1))
    # both generators were left at the same point: the next draw agrees
    assert torch.equal(torch.randn(5, generator=ref_gen), torch.randn(5, generator=gen))


def test_a_whole_embedding_chunked_as_the_store_asks():
    # 0.1B's untied embedding (32000 x 768), in memascend's optimizer pieces of 2M elements
    g = Group("embed", (("model.embed_tokens.weight", (32000, 768)),))
    want = init_group(g, torch.Generator().manual_seed(0))[0]
    got, stream = torch.empty(g.numel), LlamaInit(g, torch.Generator().manual_seed(0))
    for start in range(0, g.numel, 1 << 21):
        stream.fill(got[start : start + (1 << 21)])
    assert torch.equal(got, want)


@pytest.mark.parametrize("tier", ["ssd", "host"])
def test_random_weights_store_init_groups_values_without_a_group_sized_temporary(tmp_path, tier):
    shape = ModelConfig(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=32)
    groups = make_groups(skeleton(shape))
    largest = max(g.numel for g in groups) * 4  # the embedding in fp32: 15.6 MiB

    def store(d):
        return GroupStore(groups, tier, make_design("memascend"), torch.bfloat16, torch.device("cpu"),
                          tmp_path / d if tier == "ssd" else None, in_flight=4)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    piecewise, whole = store("a"), store("b")
    try:
        with AllocatorMeter() as meter:
            random_weights(groups, piecewise, seed=3)
        gen = torch.Generator().manual_seed(3)
        with AllocatorMeter() as whole_meter:
            for gi, g in enumerate(groups):
                whole.write_group(gi, init_group(g, gen)[0])
        for gi in range(len(groups)):
            a, b = piecewise.read_group(gi), whole.read_group(gi)
            assert all(torch.equal(a[k], b[k]) for k in a)
        # the old way allocates the embedding whole; piece by piece, one chunk (256 KiB) and views
        assert whole_meter.peak_bytes >= largest
        if tier == "ssd":
            assert meter.peak_bytes <= 2 * LlamaInit.CHUNK * 4, meter.peak_bytes
    finally:
        piecewise.close()
        whole.close()


def test_safetensors_pieces_are_the_file_s_values(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from memfit.train.finetune.weights import SafetensorsFill

    shapes = {"a.weight": (37, 5), "n.weight": (7,), "b.weight": (3, 11), "c.weight": (1, 9)}
    tensors = {k: torch.randn(s).to(torch.bfloat16 if k != "b.weight" else torch.float32) for k, s in shapes.items()}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    g = Group("g", tuple(shapes.items()))
    want = torch.cat([t.float().reshape(-1) for t in tensors.values()])
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as h:
        where = dict.fromkeys(shapes, h)
        for seed in range(4):
            got, stream, at = torch.full((g.numel,), float("nan")), SafetensorsFill(g, where), 0
            for k in _pieces(g.numel, random.Random(seed)):
                stream.fill(got[at : at + k])
                at += k
            assert torch.equal(got, want)
        with pytest.raises(ValueError, match="more values"):
            stream.fill(torch.empty(1))


def test_a_checkpoint_of_other_shapes_is_refused_before_writing(tmp_path):
    from safetensors.torch import save_file

    from memfit.train.finetune.weights import WeightsError, load_weights

    class Store:
        def fill_group(self, gi, fill):
            raise AssertionError("nothing may be written")

    save_file({"a.weight": torch.zeros(4, 6)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"a.weight has shape \(4, 6\).*\(6, 4\)"):
        load_weights(tmp_path, [Group("g", (("a.weight", (6, 4)),))], Store())
    with pytest.raises(WeightsError, match="lacks weight"):
        load_weights(tmp_path, [Group("g", (("z.weight", (6, 4)),))], Store())


def test_loading_holds_a_piece_not_the_group(tmp_path):
    from safetensors.torch import save_file

    from memfit.train.finetune.weights import load_weights

    shape = ModelConfig(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=4, head_dim=32)
    groups = make_groups(skeleton(shape))
    gen = torch.Generator().manual_seed(5)
    save_file({n: v.to(torch.bfloat16).contiguous() for g in groups for n, v in init_group(g, gen)[1].items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "swap").mkdir()
    store = GroupStore(groups, "ssd", make_design("memascend"), torch.bfloat16, torch.device("cpu"),
                       tmp_path / "swap", in_flight=4)
    try:
        with AllocatorMeter() as meter:
            load_weights(tmp_path, groups, store)
        gen = torch.Generator().manual_seed(5)
        for gi, g in enumerate(groups):
            want = init_group(g, gen)[0].to(torch.bfloat16).float()
            assert torch.equal(store.read_group(gi)["master"], want)
        # the old way, a group whole in fp32 (15.6 MiB for the embedding), measured the same way
        from safetensors import safe_open

        with AllocatorMeter() as whole, safe_open(str(tmp_path / "model.safetensors"), framework="pt") as h:
            for gi, g in enumerate(groups):
                flat = torch.empty(g.numel, dtype=torch.float32)
                for name, view in g.views(flat).items():
                    view.copy_(h.get_tensor(name))
                store.write_group(gi, flat)
                del flat
        # both count the file's storage that safe_open maps (the profiler sees it as one allocation of the
        # file's size); beyond it, a piece (a layer's size here, 0.3 MiB in bf16) against the embedding's group
        mapped = (tmp_path / "model.safetensors").stat().st_size
        assert whole.peak_bytes >= mapped + max(g.numel for g in groups) * 4
        assert meter.peak_bytes <= mapped + (1 << 20), (meter.peak_bytes, mapped)
    finally:
        store.close()
