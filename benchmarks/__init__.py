"""memfit's benchmarks: one module per scenario, run from the repository root as `python -m benchmarks.NAME`.

Every benchmark prints exactly one JSON object on stdout (progress and logs go to stderr); the object states
the machine, versions, thread count and seed (`benchmarks.common.header`). `--out PATH` also writes the JSON
to PATH and, where the benchmark draws one, a PNG of the same stem beside it. Committed results live in
`benchmarks/results/<benchmark>[_<variant>].json` (device runs in `benchmarks/results/cuda/`); docs/benchmarks.md
gives each benchmark's command and headline figures.

Nothing is imported here: `benchmarks.blocked_linear` sets OMP_NUM_THREADS before torch starts its pools.
"""
