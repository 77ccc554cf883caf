"""Static figures of the x86-64 assembly IREE dumps for each executable (`.s`, AT&T syntax, from LLVM).

Only the dispatch functions' sections count (`.text.<...>_dispatch_<n>...`): the runtime helpers IREE links
into every executable (half-float conversions, the library query) are the same for every kernel."""
from __future__ import annotations

import re
import struct
from collections import Counter
from pathlib import Path

CLASSES = ("vector_fma", "vector_arith", "vector_move", "vector_other", "scalar_arith", "scalar_move", "branch",
           "call", "other")
_FMA = re.compile(r"^v(p?dp|f(n)?m(add|sub)|fmaddsub|fmsubadd|pmadd)")  # FMA, int8/bf16 dots, pmaddwd
_VARITH = re.compile(r"^v(p?(add|sub|mul|div|max|min|sqrt|rsqrt|rcp|and|or|xor|sra|srl|sll|abs)|"
                     r"(add|sub|mul|div|max|min|sqrt|rcp|rsqrt|rndscale|scalef|getexp|getmant|fixupimm))")
_VMOVE = re.compile(r"^v(mov|broadcast|pbroadcast|gather|scatter|extract|insert|perm|shuf|unpck|pshuf|"
                    r"pmovzx|pmovsx|pmov|blend|pblend|cvt|pack)")
_SARITH = re.compile(r"^(add|sub|imul|mul|div|idiv|inc|dec|neg|shl|shr|sar|and|or|xor|lea|cmp|test|not)")
_SMOVE = re.compile(r"^(mov|push|pop|xchg|cmov)")


def classify(mnemonic: str) -> str:
    if _FMA.match(mnemonic):
        return "vector_fma"
    if mnemonic.startswith("j"):
        return "branch"
    if mnemonic.startswith("call") or mnemonic.startswith("ret"):
        return "call"
    if _VARITH.match(mnemonic):
        return "vector_arith"
    if _VMOVE.match(mnemonic):
        return "vector_move"
    if mnemonic.startswith("v") or mnemonic.startswith("kmov") or mnemonic.startswith("k"):
        return "vector_other"
    if _SARITH.match(mnemonic):
        return "scalar_arith"
    if _SMOVE.match(mnemonic):
        return "scalar_move"
    return "other"


def static_figures(asm_text: str) -> dict:
    """Instruction counts by class, vector FMA count, spills and reloads (LLVM's `# N-byte Spill` and
    `Reload` comments) over the dispatch sections of one `.s` file."""
    counts: Counter[str] = Counter()
    spills = reloads = 0
    in_dispatch = False
    for line in asm_text.splitlines():
        s = line.strip()
        if s.startswith(".section"):
            name = s.split()[1].split(",")[0]
            in_dispatch = name.startswith(".text.") and "_dispatch_" in name
            continue
        if not in_dispatch or not s or s.startswith((".", "#")) or s.endswith(":"):
            continue
        mnemonic = s.split()[0]
        if mnemonic.endswith(":"):
            continue
        counts[classify(mnemonic)] += 1
        if "Spill" in s:
            spills += 1
        if "Reload" in s:
            reloads += 1
    out = {c: counts.get(c, 0) for c in CLASSES}
    out.update(instructions=sum(counts.values()), spills=spills, reloads=reloads)
    return out


def code_bytes(obj: bytes) -> int:
    """Bytes of the dispatch functions' `.text.*_dispatch_*` sections in an ELF64 little-endian object."""
    if obj[:4] != b"\x7fELF" or obj[4] != 2:
        return 0
    shoff, = struct.unpack_from("<Q", obj, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", obj, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    str_off = sections[shstrndx][4]
    total = 0
    for name_off, _type, _flags, _addr, _off, size in sections:
        end = obj.index(b"\0", str_off + name_off)
        name = obj[str_off + name_off:end].decode(errors="replace")
        if name.startswith(".text.") and "_dispatch_" in name:
            total += size
    return total


def dump_figures(dump_dir: Path) -> dict:
    """Sum the static figures over every executable IREE dumped into `dump_dir`."""
    total: Counter[str] = Counter()
    files = sorted(Path(dump_dir).glob("*.s"))
    for s in files:
        total.update(static_figures(s.read_text(errors="replace")))
    size = sum(code_bytes(o.read_bytes()) for o in Path(dump_dir).glob("*.o"))
    out = {k: int(total.get(k, 0)) for k in (*CLASSES, "instructions", "spills", "reloads")}
    out.update(code_bytes=size, executables=len(files))
    return out
