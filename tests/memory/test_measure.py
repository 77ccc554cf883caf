import os
import time

import numpy as np
import pytest
import torch

from memfit.memory import measure
from memfit.memory.measure import PeakRSSSampler

MIB = 1024**2
BUF = 96 * MIB  # big enough to stand out of allocator noise, small enough for a shared CI box


def _touch(nbytes: int) -> np.ndarray:
    buf = np.empty(nbytes, dtype=np.uint8)
    buf[::4096] = 1  # write one byte per page so every page is resident
    return buf


def test_rss_grows_when_a_buffer_is_touched():
    before = measure.rss_bytes()
    buf = _touch(BUF)
    during = measure.rss_bytes()
    assert during - before > 0.8 * BUF
    assert measure.peak_rss_bytes() >= during - MIB  # VmHWM granularity / rounding slack
    del buf


def test_torch_buffer_counts_too():
    before = measure.rss_bytes()
    t = torch.ones(BUF // 4, dtype=torch.float32)  # filled, so resident
    assert measure.rss_bytes() - before > 0.8 * BUF
    del t


def test_reset_peak_rss():
    buf = _touch(BUF)
    del buf
    peak_before = measure.peak_rss_bytes()
    ok = measure.reset_peak_rss()
    if not ok:
        pytest.skip("this kernel / sandbox cannot reset VmHWM (/proc/self/clear_refs not writable)")
    # after the reset the high-water mark falls back to about the current RSS
    assert measure.peak_rss_bytes() < peak_before - BUF // 2
    assert abs(measure.peak_rss_bytes() - measure.rss_bytes()) < 16 * MIB


@pytest.mark.parametrize("use_hwm", [False, True])
def test_peak_sampler_sees_a_transient_peak(use_hwm):
    with PeakRSSSampler(interval_s=0.001, use_hwm=use_hwm) as s:
        buf = _touch(BUF)
        time.sleep(0.05)  # give the polling thread time to see it (the HWM path does not need this)
        del buf
        time.sleep(0.01)
    end = measure.rss_bytes()
    assert s.num_samples >= 3
    assert s.peak_delta_bytes > 0.8 * BUF
    assert s.peak_bytes > end + 0.5 * BUF  # the peak was transient: freed before the block ended
    if not use_hwm:
        assert not s.hwm_used and s.peak_bytes == s.sampled_peak_bytes


def test_peak_sampler_without_allocation_stays_near_baseline():
    with PeakRSSSampler(use_hwm=False) as s:
        time.sleep(0.01)
    assert s.peak_delta_bytes < 16 * MIB
    with pytest.raises(ValueError, match="interval_s"):
        PeakRSSSampler(interval_s=0)


def test_cuda_memory():
    info = measure.cuda_memory()
    if not torch.cuda.is_available():
        assert info == {}
    else:
        assert {"allocated_bytes", "reserved_bytes", "peak_allocated_bytes"} <= set(info)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_sees_an_allocation():
    before = measure.cuda_memory()["allocated_bytes"]
    t = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
    assert measure.cuda_memory()["allocated_bytes"] - before >= 64 * MIB
    del t


# -- HeldMemoryMeter ---------------------------------------------------------------------------------------


def test_held_memory_meter_counts_anonymous_memory_and_the_named_files_only(tmp_path):
    import mmap

    mine, other = tmp_path / "model", tmp_path / "elsewhere"
    mine.mkdir(), other.mkdir()
    for d in (mine, other):
        (d / "w.bin").write_bytes(b"\x01" * (32 * MIB))
    with measure.HeldMemoryMeter(files_under=[mine]) as m:
        buf = _touch(BUF)
        maps = []
        for d in (mine, other):
            f = open(d / "w.bin", "rb")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            sum(mm[i] for i in range(0, len(mm), 4096))  # fault every page in
            maps.append((f, mm))
        # independent measure: the kernel's per-mapping page counts in /proc/self/smaps
        assert measure.mapped_file_rss_bytes([mine]) >= 31 * MIB
        assert measure.mapped_file_rss_bytes([other]) >= 31 * MIB
    # the anonymous buffer and the model's file count; the other file's pages (a library, say) do not
    assert BUF + 31 * MIB < m.end_delta_bytes < BUF + 32 * MIB + 16 * MIB
    assert m.peak_delta_bytes >= m.end_delta_bytes
    del buf
    for f, mm in maps:
        mm.close(), f.close()


def test_held_memory_meter_sees_a_transient_peak():
    with measure.HeldMemoryMeter() as m:
        buf = _touch(BUF)
        del buf
    assert m.peak_delta_bytes > 0.8 * BUF  # through VmHWM minus the file pages, even between two samples
    assert m.end_delta_bytes < 0.5 * BUF


def test_held_memory_meter_checkpoint_gives_each_stretch_its_own_peak():
    """A checkpoint reports the peak since the previous one from the kernel's VmHWM (the sampler here never
    wakes), then resets the mark: the stretch with a transient buffer sees it, the quiet one after it does not,
    and the meter's whole-block peak still does."""
    if not measure.reset_peak_rss():
        pytest.skip("VmHWM cannot be reset here")
    with measure.HeldMemoryMeter(interval_s=3600) as m:
        buf = _touch(BUF)
        del buf
        busy = m.checkpoint()
        quiet = m.checkpoint()
    assert busy > 0.8 * BUF
    assert quiet < 0.5 * BUF
    assert m.peak_delta_bytes > 0.8 * BUF


def test_machine_info_names_the_cpu_generation_and_its_vector_units():
    """A JSON records which CPU generation ran it (the development machine changes between sessions): family,
    model and the vector units, checked against what PyTorch's own dispatcher found on this CPU."""
    import torch

    from memfit.memory.measure import machine_info

    info = machine_info(1)
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    assert str(info["cpu_family"]).isdigit() and str(info["cpu_model"]).isdigit()
    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if cap == "AVX512":
        assert "avx512f" in info["cpu_vector_units"]
    if cap in ("AVX2", "AVX512"):
        assert "avx2" in info["cpu_vector_units"]
