"""A learned hardware cost model over MLIR (issue 21): generate linalg kernels, label them with IREE on
llvm-cpu (latency and static figures of the dumped assembly), train models that predict those labels from
the MLIR text alone, and use them to rank compilation choices.

Modules: `emit` (MLIR text helpers), `families` (kernel families and their shape distributions), `store`
(SQLite dataset), `iree` (compiler and benchmark tools), `asm` (static figures of assembly), `label`
(the labelling loop), `parse`/`features`/`tokens` (what the models read), `roofline`, `gbm`, `seq`
(the models), `train`, `evaluate`, `cli`."""
