"""The hardware CRC-32C (kernels/cpu_crc32c.cpp): the standard check value, a bit-by-bit reference on lengths
around the kernel's three-stream rounds, and continuation over split buffers; zlib's CRC-32 where asked."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from memfit.llm.kernels.crc32c import _kernel, checksum, crc32c

needs_kernel = pytest.mark.skipif(_kernel() is None, reason="no SSE4.2 or memfit's C++ kernels cannot be built here")


def reference(data: bytes, crc: int = 0) -> int:
    """CRC-32C bit by bit (reflected polynomial 0x82F63B78), the definition the kernel must match."""
    c = crc ^ 0xFFFFFFFF
    for byte in data:
        c ^= byte
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


@needs_kernel
def test_the_check_value_of_123456789():
    assert crc32c(b"123456789") == 0xE3069283 == reference(b"123456789")


@needs_kernel
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 5, 2 * 3 * 8192 + 4097])
def test_matches_the_bitwise_reference_and_continues_over_splits(n):
    data = os.urandom(n)
    assert crc32c(data) == reference(data)
    for cut in (0, n // 3, n - 1 if n else 0):
        assert crc32c(data[cut:], crc32c(data[:cut])) == crc32c(data)
    arr = np.frombuffer(data, dtype=np.uint8)
    assert crc32c(memoryview(arr)) == crc32c(data)  # any buffer


@needs_kernel
def test_a_flipped_bit_changes_it():
    data = bytearray(os.urandom(100_000))
    before = crc32c(data)
    data[54_321] ^= 0x10
    assert crc32c(data) != before


def test_checksum_picks_crc32c_where_it_runs_and_zlib_when_asked():
    name, update = checksum("crc32")
    assert name == "crc32" and update(b"123456789", 0) == zlib.crc32(b"123456789")
    name, _ = checksum()
    assert name == ("crc32c" if _kernel() is not None else "crc32")
    with pytest.raises(ValueError, match="unknown checksum"):
        checksum("md5")
