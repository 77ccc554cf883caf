"""MemoryTimeline (memfit/memory/timeline.py): per-step rows, JSON lines, the PNG plot and Perfetto counters."""
import json

import pytest

from memfit.memory.timeline import MemoryTimeline

MIB = 1024**2


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
