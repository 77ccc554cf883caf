"""memfit's benchmarks: one module per scenario, run from the repository root as `python -m benchmarks.NAME`.

Every benchmark prints exactly one JSON object on stdout (progress and logs go to stderr); the object states
the machine, versions, thread count and seed (`benchmarks.common.header`). `--out PATH` also writes the JSON
to PATH and, where the benchmark draws one, a PNG of the same stem beside it. Committed results live in
`benchmarks/results/<benchmark>[_<variant>].json` (device runs in `benchmarks/results/cuda/`); docs/benchmarks.md
gives each benchmark's command and headline figures. A suite of several files gets its own folder with a
`__main__.py` (benchmarks/train_local/).

A new benchmark, `benchmarks/NAME.py`, follows the same shape (tests/benchmarks checks the parts marked *):

    '''What it compares, side by side with what.

        python -m benchmarks.NAME --threads 1 --out benchmarks/results/NAME.json      (* the command)
    '''
    from benchmarks.common import emit, header, interleave, pin_threads

    def main() -> int:
        ap = argparse.ArgumentParser(description=__doc__.split("\\n")[0])
        ap.add_argument("--threads", type=int, default=1)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--out", help="also write the JSON here (and a PNG beside it)")
        args = ap.parse_args()
        pin_threads(args.threads)
        times = interleave({"ours": ours, "baseline": baseline}, reps=7)   # the rivals round by round
        result = {"benchmark": "NAME", **header(args.threads, args.seed), ...}   (* "benchmark" = NAME)
        emit(result, args.out, plot)             # plot(result: dict, png: Path) draws the PNG
        return 0

and once a result is committed, its command, one table and a conclusion go on docs/benchmarks.md (* every
benchmark with a committed result has its `python -m benchmarks.NAME` line there).

Nothing is imported here: `benchmarks.blocked_linear` sets OMP_NUM_THREADS before torch starts its pools.
"""
