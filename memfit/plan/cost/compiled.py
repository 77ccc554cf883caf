"""Compiled kernels kept on disk, so that compiling and timing can happen at different moments.

Labelling a kernel is mostly compiling it (1-2 s of iree-compile against a few tenths of a second of
timing). Compiling needs no quiet machine and parallelises; timing needs one quiet core. With a store, the
compiles run first, in parallel and beside other jobs (`label --compile-only --workers 2`), and the timings
afterwards in one short quiet stretch, so that every label of a dataset is taken under the same conditions
(labels taken in two sessions under different load disagreed by a third on large kernels: docs/costmodel.md).

Each entry is a directory named by a hash of everything the module depends on: the MLIR text, the compiler
flags, the IREE version and the host CPU (the modules are built for `--iree-llvmcpu-target-cpu=host`), so a
module is never reused for another compiler or machine. It holds `module.vmfb` and `figures.json` (the static
figures read from the assembly IREE dumped; the dump itself is not kept). Entries appear atomically (built in
a scratch directory, then renamed), so an interrupted or concurrent compile never leaves half an entry.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memfit.plan.cost import iree
from memfit.plan.cost.asm import dump_figures

MODULE, FIGURES = "module.vmfb", "figures.json"


@functools.cache
def _toolchain() -> str:
    """What every module of this process depends on besides its text and flags (one subprocess a process)."""
    return json.dumps([iree.version(), iree.host_cpu(), list(iree.TARGET_FLAGS)])


@dataclass(frozen=True)
class CompiledStore:
    root: Path

    def entry(self, mlir: str, extra_flags: tuple[str, ...] = ()) -> Path:
        digest = hashlib.sha256(json.dumps([_toolchain(), list(extra_flags), mlir]).encode()).hexdigest()
        return Path(self.root) / digest[:2] / digest[2:32]

    def get(self, mlir: str, extra_flags: tuple[str, ...] = ()) -> tuple[Path, dict] | None:
        """The stored module and its static figures, or None when this kernel was not compiled here."""
        entry = self.entry(mlir, extra_flags)
        try:
            figures = json.loads((entry / FIGURES).read_text())
        except (OSError, ValueError):
            return None
        return (entry / MODULE, figures) if (entry / MODULE).is_file() else None

    def compile(self, mlir: str, extra_flags: tuple[str, ...] = ()) -> tuple[Path, dict]:
        """The stored module, compiled now if it is not there; a compile failure raises CompileError (the
        compiler's message) and stores nothing, so a later run tries again."""
        found = self.get(mlir, extra_flags)
        if found is not None:
            return found
        entry = self.entry(mlir, extra_flags)
        entry.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=entry.parent))
        try:
            iree.compile_mlir(mlir, scratch, extra_flags)
            figures = dump_figures(scratch / "dump")
            shutil.rmtree(scratch / "dump", ignore_errors=True)
            (scratch / "input.mlir").unlink(missing_ok=True)
            (scratch / FIGURES).write_text(json.dumps(figures))
            try:
                os.rename(scratch, entry)
            except OSError:  # another worker stored the same kernel first: keep theirs
                if self.get(mlir, extra_flags) is None:
                    # an entry left incomplete (files removed or copied in part outside memfit): replace it
                    shutil.rmtree(entry, ignore_errors=True)
                    os.rename(scratch, entry)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return self.get(mlir, extra_flags)  # type: ignore[return-value]
