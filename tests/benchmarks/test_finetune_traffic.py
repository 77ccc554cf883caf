"""benchmarks/finetune_traffic.py's meter on tiny SSD runs, and finetune_offload's --traffic summary."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from benchmarks.finetune_offload import traffic
from benchmarks.finetune_traffic import KINDS, TrafficMeter
from tests.train.test_finetune import cfg, make_tiny, run

UPDATE_PARTS = ("update_read_wait", "update_write_wait", "adamw", "copy_and_submit", "blockwise_grad")


@pytest.mark.parametrize("design", ["memascend", "zero-infinity-pipelined"])
def test_the_meter_counts_every_byte_the_engine_moves_and_the_update_parts_fit_in_the_update(tmp_path, design):
    """Its bytes, before the steps and per step, add up to the aio engine's own counters; the fp32 state moves
    whole each step in both designs, the 16-bit copy only in memascend's (written once a step, read at least
    once); its update parts are disjoint pieces of the trainer's optimizer_seconds."""
    meter = TrafficMeter()
    meter.install()
    try:
        model = make_tiny(tmp_path / "m")
        res = run(cfg(model, tmp_path / "run", steps=2, offload="ssd", host_memory=design, dtype="bfloat16"))
    finally:
        meter.uninstall()
    out = meter.result()
    assert len(out["ssd_bytes"]) == len(out["seconds"]) == len(out["cpu"]) == 2
    # CPU by thread from step 0's start to step 1's: the engine's threads ran the transfers; none for the last
    assert out["cpu"][0]["main"] > 0 and out["cpu"][0]["aio"] > 0 and out["cpu"][1] == {}
    every = [out["before_steps"], *out["ssd_bytes"]]
    for direction, counter in (("read", "bytes_read"), ("write", "bytes_written")):
        assert sum(b[direction][k] for b in every for k in KINDS) == res.ssd[counter]
    numel = sum(t.numel() for f in model.glob("*.safetensors") for t in load_file(f).values())
    for step in out["ssd_bytes"]:
        assert step["write"] == out["ssd_bytes"][0]["write"]  # (memascend's embedding reads the blocks hit)
        for k in ("master", "exp_avg", "exp_avg_sq"):
            assert step["read"][k] == step["write"][k] >= 4 * numel  # rounded up to O_DIRECT's alignment
        if design == "memascend":
            assert step["write"]["param"] >= 2 * numel and step["read"]["param"] > 0
        else:
            assert step["write"]["param"] == step["read"]["param"] == 0
    for s, parts in enumerate(out["seconds"]):
        assert min(parts[p] for p in ("forward", "backward", "head", "adamw")) > 0
        assert sum(parts.values()) <= res.step_seconds[s] + 1e-3  # disjoint parts of the step
        assert sum(parts[p] for p in UPDATE_PARTS) <= res.optimizer_seconds[s] + 1e-3  # parts rounded to 0.1 ms
        assert (parts["blockwise_grad"] > 0) == (design == "memascend")
    # uninstalled: a run after it is not counted
    run(cfg(model, tmp_path / "again", steps=1, offload="ssd", host_memory=design, dtype="bfloat16"))
    assert meter.result() == out


def _run(step: float, opt: float, param_read: int, head: float) -> dict:
    # 4 steps: the steady ones are 1 and 2
    b = {"read": {"param": param_read, "master": 8}, "write": {"param": 2, "master": 8}}
    seconds = [{"head": 9.0}, {"head": head}, {"head": head + 1}, {"head": 9.0}]
    sw = {"main_involuntary_switches": 700}  # a count: summarised apart from the seconds
    cpu = [{"aio": 9.0, **sw}, {"aio": head / 10, **sw}, {"aio": head / 10, **sw}, {}]
    return {"step_seconds": [9.0, step, step, 9.0], "optimizer_seconds": [9.0, opt, opt, 9.0],
            "traffic": {"ssd_bytes": [b, b, b, b], "seconds": seconds, "cpu": cpu}}


def test_the_summary_takes_a_steady_steps_bytes_and_medians_over_rounds():
    rounds = [{"designs": {"memascend": _run(2.0, 1.0, 4, 0.5), "zero-infinity-pipelined": _run(3.0, 2.0, 0, 1.0)}},
              {"designs": {"memascend": _run(4.0, 1.5, 4, 1.5), "zero-infinity-pipelined": _run(3.0, 2.0, 0, 2.0)}}]
    out = traffic(rounds, ["memascend", "zero-infinity-pipelined"], 4)
    ma = out["designs"]["memascend"]
    assert out["steady_steps"] == [1, 2]
    assert ma["read_bytes_per_step"] == 12 and ma["written_bytes_per_step"] == 10 and ma["bytes_constant"]
    assert ma["median_seconds"] == {"head": pytest.approx(1.5), "step": 3.0, "optimizer": 1.25}
    assert ma["median_cpu_seconds"] == {"aio": pytest.approx(0.1)}
    assert ma["median_main_switches"] == {"main_involuntary_switches": 700}
    assert out["designs"]["zero-infinity-pipelined"]["read_bytes_per_step"] == 8
    rounds[1]["designs"]["memascend"]["traffic"]["ssd_bytes"][2] = {"read": {"param": 5, "master": 8},
                                                                    "write": {"param": 2, "master": 8}}
    assert not traffic(rounds, ["memascend"], 4)["designs"]["memascend"]["bytes_constant"]
