import threading

import pytest

from memfit.memory.budget import (
    MemoryBudget,
    MemoryBudgetExceeded,
    Tier,
    format_bytes,
    parse_budget,
    parse_bytes,
    resolve_budget,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (4096, 4096), ("4096", 4096), ("512MiB", 512 * 2**20), ("1.5 GiB", int(1.5 * 2**30)),
        ("2GB", 2 * 10**9), ("3kb", 3000), ("1KiB", 1024), ("0", 0), (2.0, 2),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "12 parsecs", "-5", "1.2.3GiB", True])
def test_parse_bytes_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="byte size|negative"):
        parse_bytes(bad)


def test_format_bytes():
    assert format_bytes(100) == "100 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


def test_resolve_budget_bytes_and_fraction():
    assert resolve_budget("1GiB") == 2**30
    half = resolve_budget(0.5, Tier.HOST)
    assert half > 0
    assert abs(resolve_budget("0.25", Tier.HOST) - half / 2) < 0.05 * half  # memory moves a little
    with pytest.raises(ValueError, match="positive"):
        resolve_budget(0)


def test_reserve_release_by_owner():
    b = MemoryBudget(1000, name="kv_budget")
    b.reserve(300, "kv")
    assert b.try_reserve(500, "act")
    assert (b.used_bytes, b.available_bytes, b.peak_bytes) == (800, 200, 800)
    assert b.by_owner() == {"kv": 300, "act": 500}
    assert not b.try_reserve(201, "kv")  # refused: nothing changes
    assert b.used_bytes == 800
    with pytest.raises(MemoryBudgetExceeded, match="kv needs .* but only"):
        b.reserve(300, "kv")
    b.release(300, "kv")
    assert b.used_bytes == 500 and b.by_owner()["kv"] == 0 and b.peak_bytes == 800
    with pytest.raises(ValueError, match="holds only"):
        b.release(1, "kv")
    with pytest.raises(ValueError, match="negative"):
        b.reserve(-1)
    with pytest.raises(ValueError, match="positive"):
        MemoryBudget(0)


def test_transfer_moves_a_reservation_between_owners_with_the_totals_and_the_parents_unchanged():
    parent = MemoryBudget(1000, name="ledger")
    b = MemoryBudget(600, name="swap_space", parent=parent)
    b.reserve(400, "host_region")
    b.transfer(150, "host_region", "swap")
    assert b.by_owner() == {"host_region": 250, "swap": 150} and b.used_bytes == 400 == b.peak_bytes
    assert parent.by_owner() == {"swap_space": 400}
    with pytest.raises(ValueError, match="holds only"):
        b.transfer(251, "host_region", "swap")
    with pytest.raises(ValueError, match="negative"):
        b.transfer(-1, "host_region", "swap")
    assert b.by_owner() == {"host_region": 250, "swap": 150}  # refused: nothing moved
    b.release(150, "swap")
    b.release(250, "host_region")
    assert b.used_bytes == 0 == parent.used_bytes


def test_budget_is_thread_safe():
    b = MemoryBudget(10**9)

    def work():
        for _ in range(2000):
            b.reserve(3, "t")
            b.release(3, "t")
            b.reserve(1, "t")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert b.used_bytes == 8000 == b.by_owner()["t"]


@pytest.mark.parametrize(
    "spec, expected",
    [("0.3", 0.3), (0.3, 0.3), ("1.0", 1.0), ("30%", 0.3), ("512MiB", 512 * 2**20), ("4096", 4096), (4096, 4096),
     ("2e9", 2.0e9)],
)
def test_parse_budget_one_rule(spec, expected):
    # A decimal point or percent sign means a fraction of available memory; whole numbers and units mean bytes.
    # "2e9" has no unit but an exponent: it is a float out of (0, 1], so it must be refused, not read as bytes.
    if expected == 2.0e9:
        with pytest.raises(ValueError, match="fraction must be in"):
            parse_budget(spec)
        return
    got = parse_budget(spec)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.2", "150%", "abc%", "lots", True])
def test_parse_budget_refuses(bad):
    with pytest.raises(ValueError, match="budget|byte size"):
        parse_budget(bad)


def test_resolve_budget_fraction_is_not_zero_bytes():
    # The old CLI read `--kv-budget 0.3` through parse_bytes as 0 bytes; a fraction must give a share of RAM.
    assert resolve_budget("0.3", Tier.HOST) > 2**20
