"""SSD swap space: round trips through both layouts, O_DIRECT fallback, space checks."""
from __future__ import annotations

import errno
import logging
import os
import shutil

import pytest
import torch

from memfit.memory import aio
from memfit.memory.aio import AioEngine, ExtentFile, FilePerKey, SwapSpaceError, wait
from memfit.memory.hostpool import aligned_buffer


@pytest.fixture
def engine():
    e = AioEngine(block_size=1 << 16, queue_depth=4)
    yield e
    e.close()


@pytest.mark.parametrize("layout", [ExtentFile, FilePerKey])
def test_round_trip_and_pieces(tmp_path, engine, layout):
    sizes = {"a": 300_000, "b": 5000}
    space = layout(tmp_path, sizes, engine)
    data = {k: torch.randint(0, 255, (n,), dtype=torch.uint8) for k, n in sizes.items()}
    for k, t in data.items():
        buf = aligned_buffer(n := sizes[k]).tensor
        buf[:n].copy_(t)
        wait(space.write(k, buf))
    for k, t in data.items():
        buf = aligned_buffer(sizes[k]).tensor
        wait(space.read(k, buf))
        assert torch.equal(buf[: sizes[k]], t)
    piece = aligned_buffer(8192).tensor  # a piece inside "a": bytes 65536..73727
    wait(space.read("a", piece, 8192, 65536))
    assert torch.equal(piece[:8192], data["a"][65536 : 65536 + 8192])
    with pytest.raises(ValueError, match="outside"):
        space.read("b", piece, 8192, 4096)
    assert engine.stats.bytes_written >= sum(sizes.values())
    assert space.files == (1 if layout is ExtentFile else 2)
    space.close()
    assert not list(tmp_path.glob("*.swp")) and not list(tmp_path.glob("swap.extents"))


def test_extent_file_is_preallocated(tmp_path, engine):
    space = ExtentFile(tmp_path, {"x": 10 << 20}, engine)
    st = os.stat(space.path)
    assert st.st_size == 10 << 20 and st.st_blocks * 512 >= 10 << 20  # blocks allocated, not a sparse file
    space.close()


def test_falls_back_to_buffered_io_with_a_warning(tmp_path, engine, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, mode=0o777):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(aio.os, "open", no_direct)
    aio._direct_warned.clear()
    with caplog.at_level(logging.WARNING, logger="memfit.memory.aio"):
        space = ExtentFile(tmp_path, {"k": 4096}, engine)
    assert not space.direct
    assert "does not support O_DIRECT" in caplog.text
    buf = torch.arange(4096, dtype=torch.int32).view(torch.uint8)[:4096].clone()
    wait(space.write("k", buf))
    back = torch.empty(4096, dtype=torch.uint8)
    wait(space.read("k", back))
    assert torch.equal(back, buf)
    space.close()


@pytest.mark.parametrize("layout", [ExtentFile, FilePerKey])
def test_a_file_system_that_reports_no_space_at_all_is_not_called_full(tmp_path, engine, monkeypatch, layout):
    """--ssd-dir /proc (statvfs: 0 blocks in all) was refused as '/proc has 0.00 GiB free', as if a disk were full."""
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(0, 0, 0))
    with pytest.raises(SwapSpaceError, match="not on a disk that can hold the swap files") as info:
        layout(tmp_path, {"k": 8 << 20}, engine)
    assert "reports no space at all" in str(info.value) and "GiB free" not in str(info.value)
    assert "--ssd-dir" in str(info.value)


@pytest.mark.parametrize("layout", [ExtentFile, FilePerKey])
def test_refuses_a_directory_without_space(tmp_path, engine, monkeypatch, layout):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(SwapSpaceError, match="--ssd-dir on a larger disk"):
        layout(tmp_path, {"k": 8 << 20}, engine)
