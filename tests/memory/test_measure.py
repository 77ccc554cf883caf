import json
import time

import numpy as np
import pytest
import torch

from memfit.memory import measure
from memfit.memory.measure import MemoryTimeline, PeakRSSSampler

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


# -- timeline ----------------------------------------------------------------------------------------------


def _timeline(**kw) -> MemoryTimeline:
    tl = MemoryTimeline(**kw)
    for i in range(5):
        tl.record(kv_committed_bytes=(i + 1) * 4 * MIB, kv_used_bytes=(i + 1) * 3 * MIB,
                  kv_waste_bytes=(i + 1) * MIB, tokens_held=100 * i, num_running=i, num_waiting=5 - i)
    return tl


def test_record_adds_step_time_and_rss():
    tl = _timeline()
    assert [r["step"] for r in tl.rows] == [0, 1, 2, 3, 4]
    times = [r["time_s"] for r in tl.rows]
    assert times == sorted(times) and times[0] >= 0
    assert all(r["rss_bytes"] > 10 * MIB for r in tl.rows)
    assert tl.rows[2]["kv_used_bytes"] == 9 * MIB
    assert tl.fields()[:2] == ["rss_bytes", "kv_committed_bytes"] and "num_waiting" in tl.fields()
    row = tl.record(step=42, rss_bytes=7, note="text is kept but not plotted")
    assert row["step"] == 42 and row["rss_bytes"] == 7 and "note" not in tl.fields()
    assert "rss_bytes" not in MemoryTimeline(track_rss=False).record(x=1)


def test_jsonl_round_trip(tmp_path):
    tl = _timeline()
    path = tl.write_jsonl(tmp_path / "sub" / "timeline.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and all(isinstance(json.loads(line), dict) for line in lines)
    assert MemoryTimeline.read_jsonl(path).rows == tl.rows


def test_read_jsonl_reports_bad_lines(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 0}\n\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3"):
        MemoryTimeline.read_jsonl(path)


def test_streaming_mode_appends_and_flushes(tmp_path):
    path = tmp_path / "live.jsonl"
    with MemoryTimeline(jsonl_path=path) as tl:
        tl.record(kv_used_bytes=1)
        # readable while the timeline is still open: each row is flushed as it is recorded
        assert [json.loads(line)["kv_used_bytes"] for line in path.read_text().splitlines()] == [1]
        tl.record(kv_used_bytes=2)
        assert len(path.read_text().splitlines()) == 2
    assert MemoryTimeline.read_jsonl(path).rows == tl.rows
    # a new timeline on the same path starts a fresh file unless asked to append
    with MemoryTimeline(jsonl_path=path, append=True) as tl2:
        tl2.record(kv_used_bytes=3)
    assert len(path.read_text().splitlines()) == 3
    with MemoryTimeline(jsonl_path=path) as tl3:
        tl3.record(kv_used_bytes=4)
    assert len(path.read_text().splitlines()) == 1


def test_plot_writes_a_png(tmp_path):
    tl = _timeline()
    path = tl.plot(tmp_path / "timeline.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    only_kv = tl.plot(tmp_path / "kv.png", fields=["kv_committed_bytes", "kv_used_bytes"], x="step")
    assert only_kv.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no_such_field"):
        tl.plot(tmp_path / "x.png", fields=["no_such_field"])


def test_perfetto_counters(tmp_path):
    tl = _timeline()
    path = tl.to_perfetto(tmp_path / "trace.json")
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    counters = [e for e in events if e["ph"] == "C"]
    assert {e["name"] for e in counters} == set(tl.fields())
    used = [e for e in counters if e["name"] == "kv_used_bytes"]
    assert [e["args"]["kv_used_bytes"] for e in used] == [r["kv_used_bytes"] for r in tl.rows]
    assert [e["ts"] for e in used] == pytest.approx([r["time_s"] * 1e6 for r in tl.rows])
    assert all(isinstance(e["pid"], int) and e["ts"] >= 0 for e in counters)
    assert any(e["ph"] == "M" and e["name"] == "process_name" for e in events)


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
