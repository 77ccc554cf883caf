"""kernels/build.load_cpu_io: the SSD tier's CRC-32C and O_DIRECT loops need SSE4.2 only, not AVX-512."""
from __future__ import annotations

import pytest

from memfit.llm.kernels import build, crc32c, staged_io

needs = pytest.mark.skipif(build.compiler() is None or "sse4_2" not in build.cpu_flags(),
                           reason="no C++ compiler or no SSE4.2 here")


@pytest.fixture
def no_avx512(monkeypatch):
    """This CPU as if it had no AVX-512 (an AVX2 host): the big kernel library is refused, caches forgotten."""
    flags = frozenset(f for f in build.cpu_flags() if not f.startswith("avx512"))
    monkeypatch.setattr(build, "cpu_flags", lambda: flags)
    monkeypatch.setattr(crc32c, "cpu_flags", lambda: flags)
    build._forget_loaded()
    monkeypatch.setattr(crc32c, "_fn", None)
    monkeypatch.setattr(staged_io, "_io", None)
    yield
    build._forget_loaded()


@needs
def test_io_kernels_build_and_run_on_a_cpu_without_avx512(no_avx512, tmp_path):
    assert build.load_cpu_linear() is None  # the AVX-512 library cannot run here
    assert build.load_cpu_io() is not None
    assert crc32c.crc32c(b"123456789") == 0xE3069283  # CRC-32C's published check value
    from memfit.llm.kv.swap_ssd import SSDTier

    tier = SSDTier(tmp_path, 1 << 20)
    try:
        assert tier.checksum == "crc32c" and tier._io is not None  # not zlib and the Python loop
    finally:
        tier.close()


@needs
def test_the_io_library_is_a_cache_entry_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path))
    build._forget_loaded()
    try:
        lib = build.load_cpu_io()
        assert lib is not None
        built = sorted(p.name for p in tmp_path.iterdir())
        assert len(built) == 1 and built[0].startswith("cpu_io-")  # the AVX-512 library was not built for it
        before = build.compile_count
        build._forget_loaded()
        assert build.load_cpu_io() is not None and build.compile_count == before  # reused from the cache
    finally:
        build._forget_loaded()


@pytest.mark.parametrize("one_call", [True, False], ids=["c-call", "memmove-fallback"])
def test_copy_rows_moves_strided_rows_exactly_and_nothing_else(one_call, monkeypatch):
    """kernels/copy_rows.py: rows `src_stride` apart land `dst_stride` apart, byte for byte, in one C call where the
    I/O library builds (and through the memmove fallback); the gaps between the destination's rows are untouched."""
    import numpy as np

    from memfit.llm.kernels import copy_rows as mod
    from memfit.llm.kernels.copy_rows import copy_rows

    if one_call and not mod.in_one_call():
        pytest.skip("memfit's I/O kernels cannot run here")
    if not one_call:
        monkeypatch.setattr(mod, "_fn", None)
        monkeypatch.setattr(mod, "_tried", True)

    rng = np.random.default_rng(3)
    src = rng.integers(0, 256, 7 * 1000, dtype=np.uint8)
    dst = np.full(7 * 640, 9, dtype=np.uint8)
    copy_rows(dst.ctypes.data + 5, 640, src.ctypes.data + 3, 1000, 7, 611)
    want = np.full_like(dst, 9)
    for i in range(7):
        want[5 + i * 640 : 5 + i * 640 + 611] = src[3 + i * 1000 : 3 + i * 1000 + 611]
    assert np.array_equal(dst, want)
    copy_rows(dst.ctypes.data, 640, src.ctypes.data, 1000, 0, 611)  # no rows: nothing moves
    assert np.array_equal(dst, want)
