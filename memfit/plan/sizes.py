"""Parse byte sizes: '4096', '1.5MiB', '64 KiB', '2GB'. (Small on purpose; may move to memfit.memory.)"""
from __future__ import annotations

import re

from memfit.plan.errors import SizeParseError

_UNITS = {
    "": 1, "b": 1,
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
    "k": 1 << 10, "m": 1 << 20, "g": 1 << 30,  # bare letters: binary, as most memory tools read them
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Return a byte count from an int or a string with an optional unit (KiB/MiB/GiB binary, KB/MB/GB decimal)."""
    if isinstance(text, int):
        if text < 0:
            raise SizeParseError(f"size must be non-negative, got {text}")
        return text
    match = _PATTERN.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise SizeParseError(
            f"cannot parse size {text!r}: use a number of bytes or a number with a unit, e.g. 4096, 512KiB, 1.5MiB, 2GiB"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    return round(value)


def format_size(n: int) -> str:
    """Human-readable binary size, e.g. 1572864 -> '1.50 MiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
