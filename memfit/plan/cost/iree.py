"""The IREE tools: compile MLIR for llvm-cpu (dumping each executable's assembly) and time a function with
iree-benchmark-module on the local-sync device (one thread), the default configuration of the labels."""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from memfit.plan.cost.errors import CompileError, CostModelError, HarnessError, IreeMissingError
from memfit.plan.cost.parse import Function

TARGET_FLAGS = ("--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu",
                "--iree-llvmcpu-target-cpu=host")


def tool(name: str) -> str:
    """Path of an IREE tool: beside this Python (the venv the cost extra installed into), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise IreeMissingError(name)
    return found


def available() -> bool:
    try:
        tool("iree-compile"), tool("iree-benchmark-module")
    except IreeMissingError:
        return False
    return True


def version() -> str:
    out = subprocess.run([tool("iree-compile"), "--version"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "compiler version" in line:
            return line.split("version", 1)[1].split("@")[0].strip()
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def host_cpu() -> str:
    """Model name and the vector extensions that matter to llvm-cpu codegen."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    ext = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile") if f in flags]
    return f"{name} ({' '.join(ext)}; {os.cpu_count()} cpus)"


def compile_mlir(mlir: str, out_dir: Path, extra_flags: tuple[str, ...] = (), dump: bool = True,
                 timeout: float = 300) -> Path:
    """Compile `mlir` to out_dir/module.vmfb (and, with `dump`, the executables' .s/.o into out_dir/dump).
    A parse or compile failure raises CompileError carrying the compiler's own message."""
    out_dir.mkdir(parents=True, exist_ok=True)
    src, vmfb = out_dir / "input.mlir", out_dir / "module.vmfb"
    src.write_text(mlir)
    cmd = [tool("iree-compile"), str(src), *TARGET_FLAGS, *extra_flags, "-o", str(vmfb)]
    if dump:
        cmd.append(f"--iree-hal-dump-executable-intermediates-to={out_dir / 'dump'}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise CompileError(f"iree-compile took over {timeout:.0f} s") from exc
    if proc.returncode != 0:
        msg = proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}"
        raise CompileError("iree-compile failed:\n" + msg.replace(str(src), "<input>")[:4000])
    return vmfb


# What a label's latency is, read off one benchmark run's repetitions. Every kind estimates the same thing,
# the real time per call on a quiet machine; they differ in how much other jobs on a shared machine disturb
# them. Real time counts the time the process waits for a core; the process CPU time does not (the process
# is one thread on local-sync), so under load it stays near the quiet real time.
LABEL_KINDS = ("real_median", "real_min", "cpu_median", "cpu_min")
DEFAULT_LABEL_KIND = "cpu_median"


def label_value(kind: str, reps_us: list[float], cpu_reps_us: list[float]) -> float:
    """The label of kind `kind` from one run's repetitions (real and CPU time per call, us)."""
    if kind not in LABEL_KINDS:
        raise CostModelError(f"unknown label kind {kind!r}: one of {', '.join(LABEL_KINDS)}")
    reps = reps_us if kind.startswith("real") else cpu_reps_us
    if not reps:
        raise CostModelError(f"no {kind.split('_')[0]} time recorded for a label of kind {kind}")
    return min(reps) if kind.endswith("min") else statistics.median(reps)


@dataclass
class Timing:
    """Real and process CPU time per call (us) of each benchmark repetition, with their median and spread."""

    reps_us: list[float] = field(default_factory=list)
    cpu_reps_us: list[float] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return statistics.median(self.reps_us)

    def label(self, kind: str = DEFAULT_LABEL_KIND) -> float:
        return label_value(kind, self.reps_us, self.cpu_reps_us)

    @property
    def spread(self) -> float:
        """(max - min) / median of the repetitions."""
        return (max(self.reps_us) - min(self.reps_us)) / self.median_us if self.median_us > 0 else 0.0


def benchmark(vmfb: Path, fn: Function, repetitions: int = 5, min_time_s: float = 0.05,
              timeout: float = 300, pin_cpu: int | None = None) -> Timing:
    """iree-benchmark-module --device=local-sync on zero-filled inputs of the function's argument types;
    `pin_cpu` runs it under `taskset -c CPU` (one core: no migration between cores mid-repetition)."""
    pin = ["taskset", "-c", str(pin_cpu)] if pin_cpu is not None and shutil.which("taskset") else []
    cmd = [*pin, tool("iree-benchmark-module"), f"--module={vmfb}", "--device=local-sync", f"--function={fn.name}",
           *[f"--input={a.input_flag()}" for a in fn.args], f"--benchmark_repetitions={repetitions}",
           f"--benchmark_min_time={min_time_s}s", "--benchmark_format=json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise CostModelError(f"iree-benchmark-module took over {timeout:.0f} s") from exc
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip())[:4000]
        # taskset prefixes its own errors with its name and exits before starting the benchmark: a CPU it may
        # not use (--pin-cpu), not this kernel's failure
        if pin and msg.startswith("taskset:"):
            raise HarnessError(f"could not run the benchmark under taskset -c {pin_cpu}: {msg}")
        raise CostModelError("iree-benchmark-module failed:\n" + msg)
    text = proc.stdout[proc.stdout.index("{"):]
    runs = json.loads(text)["benchmarks"]
    scale = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "s": 1e6}
    reps = [r["real_time"] * scale[r.get("time_unit", "ns")] for r in runs if r.get("run_type") == "iteration"]
    cpu = [r["cpu_time"] * scale[r.get("time_unit", "ns")] for r in runs if r.get("run_type") == "iteration"]
    if not reps:
        raise CostModelError("iree-benchmark-module printed no timings")
    return Timing(reps, cpu)
