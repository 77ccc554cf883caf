"""benchmarks/decode_setup.py's clock: every system of a decode benchmark is read on the same one, the process's
CPU time with one CPU thread (benchmarks/decode_vllm.py reads vLLM's side so), else the wall time."""
from __future__ import annotations

import time

import torch

from benchmarks.decode_setup import clock_name, decode_clock


def test_one_cpu_thread_reads_cpu_time_and_anything_else_the_wall_clock():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert decode_clock(torch.device("cpu")) is time.process_time
        assert decode_clock(torch.device("cuda")) is time.perf_counter  # a GPU's time is the wall's
        torch.set_num_threads(2)
        assert decode_clock(torch.device("cpu")) is time.perf_counter  # two threads' CPU time would add up
    finally:
        torch.set_num_threads(before)
    assert clock_name(time.process_time) == "process CPU time" and clock_name(time.perf_counter) == "wall"


def test_the_cpu_clock_leaves_out_time_spent_off_the_cpu():
    """What the choice is for: a process that sleeps (as one waiting for a core on a loaded machine does) adds
    to the wall clock, not to its CPU time."""
    c0, w0 = time.process_time(), time.perf_counter()
    time.sleep(0.2)
    assert time.perf_counter() - w0 >= 0.2 and time.process_time() - c0 < 0.05
