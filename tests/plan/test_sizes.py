import pytest

from memfit.plan.errors import SizeParseError
from memfit.plan.sizes import format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("1KiB", 1024), ("1.5MiB", 1572864), ("2 GiB", 2 << 30), ("3MB", 3_000_000),
    ("64k", 65536), (123, 123), ("0.5kib", 512),
    ("9007199254740993", 2**53 + 1), ("9223372036854775807", 2**63 - 1), ("1e3", 1000),  # exact past 2^53
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "MiB", "1.5XB", "-3", "12 34"])
def test_parse_size_rejects(bad):
    with pytest.raises(SizeParseError, match="cannot parse size"):
        parse_size(bad)


def test_format_size():
    assert format_size(1572864) == "1.50 MiB"
    assert format_size(100) == "100 B"


@pytest.mark.parametrize("big", ["9223372036854775808", "1e99", "1e400", "10000000TB", 2**63])
def test_parse_size_refuses_sizes_past_64_bits(big):
    with pytest.raises(SizeParseError, match="above the largest a plan holds: 9223372036854775807 bytes"):
        parse_size(big)
