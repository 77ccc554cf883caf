"""Parse byte sizes: '4096', '1.5MiB', '64 KiB', '2GB'. (Small on purpose; may move to memfit.memory.)"""
from __future__ import annotations

import re
from fractions import Fraction

from memfit.plan.errors import SizeParseError

# The largest size a plan holds: plan files and the CP-SAT models keep byte counts and addresses in 64-bit signed
# integers (OR-Tools' int64), and a tensor's byte size in torch is one as well. Larger sizes used to be taken:
# '--scratchpad 1e99' planned and wrote a 100-digit scratchpad_bytes into the plan file.
MAX_BYTES = 2**63 - 1

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
        return _representable(text, text)
    match = _PATTERN.match(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise SizeParseError(
            f"cannot parse size {text!r}: use a number of bytes or a number with a unit, e.g. 4096, 512KiB, 1.5MiB, 2GiB"
        )
    unit = _UNITS[match.group(2).lower()]
    # exact (a float lost the last digits of byte counts above 2^53 and made 1e400 an OverflowError traceback), but
    # only once a float says the size is within reach: Fraction('1e10000000') builds 10**10000000 (seconds)
    rough = float(match.group(1)) * unit  # inf past 1.8e308; 0.0 for tiny exponents
    if rough > 2 * MAX_BYTES:
        desc = f"{rough:.2e}".replace("e+", "e") if rough < float("inf") else "more than 1.8e308"
        raise SizeParseError(f"size {text!r} is {desc} bytes, above the largest a plan holds: {_LIMIT}")
    if rough < 0.25:  # (below half a byte even where the float rounded up)
        return 0
    return _representable(round(Fraction(match.group(1)) * unit), text)


_LIMIT = f"{MAX_BYTES} bytes (2^63 - 1, 8 EiB; plan files and the CP-SAT solver use 64-bit integers)"


def _representable(n: int, text: str | int) -> int:
    if n > MAX_BYTES:
        raise SizeParseError(f"size {text!r} is {approx(n)} bytes, above the largest a plan holds: {_LIMIT}")
    return n


def approx(n: int) -> str:
    """A large integer in three digits, '1.00e99' (a float cannot hold 10**400)."""
    if n.bit_length() > 10_000:  # str() refuses integers past 4300 digits (and is quadratic before)
        return f"about 2^{n.bit_length() - 1}"
    digits = str(n)
    return digits if len(digits) <= 6 else f"{digits[0]}.{digits[1:3]}e{len(digits) - 1}"


def format_size(n: int) -> str:
    """Human-readable binary size, e.g. 1572864 -> '1.50 MiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
