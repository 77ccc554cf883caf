"""Every system of a decode benchmark is read on one clock (benchmarks/decode_setup.decode_clock): the process's
CPU time with one CPU thread, else the wall time; vLLM's side (benchmarks/decode_vllm.py, run in its own venv) is
told which by its command line, and the bandwidth the limit comes from is read on it too."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks import decode_setup
from benchmarks.decode_setup import clock_name, decode_clock
from benchmarks.decode_throughput import vllm_command


def test_vllm_is_read_on_the_clock_memfit_is_read_on_at_every_thread_count():
    before = torch.get_num_threads()
    try:
        for threads, want in ((1, "process"), (2, "wall")):
            torch.set_num_threads(threads)
            memfit = decode_clock(torch.device("cpu"))
            cmd = vllm_command("py", Path("/m"), 8, 4000, 32, 3, threads)
            assert cmd[-1] == want and (memfit is time.process_time) == (want == "process")
            assert cmd[1].endswith("decode_vllm.py") and cmd[2:7] == ["/m", "8", "4000", "32", "3"]
        assert decode_clock(torch.device("cpu"), 1) is time.process_time  # vLLM's thread count, not torch's (2 here)
        assert decode_clock(torch.device("cuda")) is time.perf_counter  # a GPU's time is the wall's
    finally:
        torch.set_num_threads(before)
    assert clock_name(time.process_time) == "process CPU time" and clock_name(time.perf_counter) == "wall"


def test_the_bandwidth_is_read_on_the_decode_clock(monkeypatch):
    """A limit read on the wall clock under load is lower than one read on CPU time, which flattered CPU-time
    rates (0.91 of the limit in a loaded run whose bandwidth reading was 14.7 GB/s against 21-22 quiet)."""
    seen = []
    real = decode_setup.time_calls
    monkeypatch.setattr(decode_setup, "time_calls", lambda fn, reps, **kw: seen.append(kw.get("clock")) or real(fn, reps, **kw))
    decode_setup.measure_bandwidth(1, torch.device("cpu"), nbytes=1 << 22, reps=1)
    assert seen and all(c is time.process_time for c in seen)
