#!/usr/bin/env bash
# One prepared run of memfit's CUDA checks on a lent GPU machine (the `device` tool; see docs/benchmarks.md).
# It uses the machine's own python3/torch (nothing is installed) and writes logs and JSON under $OUT.
#   OUT=/tmp/gpu scripts/gpu_check.sh                 # every section (about 12 minutes: more than one device call)
#   OUT=/tmp/gpu scripts/gpu_check.sh env kv spec     # only these sections
# Sections: env pytest nccl generate vmem kv spec preempt engine-kv decode. Narrower runs: PYTEST_PATHS (default: the memory,
# LLM and training tests), SPEC_BATCHES / SPEC_GAMMAS (1,4,10,16 / 2,4), PREEMPT_SINGLE=0 (multi-turn only).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/memfit-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1   # the whole run's output also comes back as one file
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
py=python3
step() { echo; echo "=== $* ($(date +%T))"; }
sections=" ${*:-env pytest nccl generate vmem kv spec preempt engine-kv decode} "
want() { [[ $sections == *" $1 "* ]]; }

if want env; then
step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import torch, transformers; from cuda.bindings import driver; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), 'transformers', transformers.__version__)"
fi

if want pytest; then
step "pytest -m cuda (arena, KV caches, swap, loader, sampling, speculative, whole engine, fine-tuning)"
timeout 240 $py -m pytest -q -p no:cacheprovider -m cuda -o addopts="-ra" ${PYTEST_PATHS:-tests/memory tests/llm tests/train} \
    --ignore=tests/llm/server 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40
fi

if want nccl; then
step "NCCL at N = 1 (tensor parallelism's group on CUDA; a one-GPU machine cannot run N > 1)"
timeout 60 $py -m pytest -q -p no:cacheprovider -m cuda -o addopts="-ra" tests/llm/parallel 2>&1 | tail -5
fi

if want generate; then
step "memfit generate on cuda with speculative decoding and swap preemption"
timeout 60 $py -m memfit.cli generate --device cuda --speculative-model memfit-tiny-draft --num-speculative-tokens 2 \
    --max-tokens 48 --temperature 0 "def fibonacci(n):" 2>&1 | tail -6
timeout 60 $py -m memfit.cli generate --device cuda --speculative-model memfit-tiny-draft --speculative-tree 3,3 \
    --max-tokens 48 --temperature 0 "def fibonacci(n):" 2>&1 | tail -6
timeout 60 $py -m memfit.cli generate --device cuda --preemption-mode swap --kv-budget 8MiB --max-tokens 48 \
    --temperature 0 "def fibonacci(n):" 2>&1 | tail -6

for kv in virtual paged; do
  step "memfit generate on cuda, kv=$kv"
  timeout 60 $py -m memfit.cli generate --device cuda --kv-cache $kv --max-tokens 48 --temperature 0 \
      --timeline "$OUT/timeline_$kv.jsonl" "def fibonacci(n):" 2>&1 | tail -12
done
fi

if want vmem; then
step "vmem commit/decommit cost (2 MiB driver pages)"
timeout 60 $py -m benchmarks.vmem_commit --device cuda --reps 5 > "$OUT/vmem_commit_cuda.json" 2>/dev/null
$py -c "import json;[print(r) for r in json.load(open('$OUT/vmem_commit_cuda.json'))['rows']]"
fi

if want kv; then
step "kv_cache benchmark (virtual vs paged attention step, paged on flex attention, workload, concurrency)"
# 24 layers a step (Qwen2.5-0.5B's): the step's planning (the paged cache's block table and flex mask, the virtual
# cache's slot runs) is shared by the layers, as in the engine; times are per layer
timeout 300 $py -m benchmarks.kv_cache --threads 4 --reps 9 --steps 200 --layers 24 --out-dir "$OUT" > /dev/null 2>"$OUT/kv_cache.err"
$py -c "import json;d=json.load(open('$OUT/kv_cache.json'));[print(r['batch'],r['context'],r['paged_over_virtual'],r.get('paged_over_virtual_device'),r['torch']) for r in d['attention']['decode']];print(d['targets'])" || tail -5 "$OUT/kv_cache.err"
fi

if want spec; then
step "speculative decoding on cuda (bundled pair, wall clock; the issue asks for batch 10 on a GPU)"
timeout 190 $py -m benchmarks.speculative --clock wall --threads 4 --batches ${SPEC_BATCHES:-1,4,10,16} --gammas ${SPEC_GAMMAS:-2,4} --reps 3 --no-adaptive \
    --out "$OUT/speculative_cuda.json" > /dev/null 2>"$OUT/speculative.err"; grep "^batch" "$OUT/speculative.err" | cut -c1-300
fi

if want preempt; then
step "preemption on cuda (0.5b, pinned host tier; single and multi-turn, one rep each)"
[[ ${PREEMPT_SINGLE:-1} == 1 ]] && timeout 200 $py -m benchmarks.preemption --model 0.5b --requests 24 --reps 1 --threads 4 \
    --variants recompute,swap-run,swap-run-async,swap-run-reuse-async --out "$OUT/preemption_cuda.json" > /dev/null 2>"$OUT/preemption.err"
timeout ${PREEMPT_MT_TIMEOUT:-240} $py -m benchmarks.preemption --model 0.5b --workload multiturn --requests 24 --reps 1 --threads 4 \
    --variants recompute,swap-run-async,swap-run-reuse-async,swap-run-reuse-async-wait --out "$OUT/preemption_multiturn_cuda.json" > /dev/null 2>>"$OUT/preemption.err"
grep '^{' "$OUT/preemption.err" | cut -c1-400
fi

if want engine-kv; then
step "decode throughput on cuda, virtual vs paged (flex) KV cache in the engine (0.5b, 1k-token prompts)"
timeout 240 $py -m benchmarks.decode_throughput --device cuda --threads 4 --shapes 0.5b --dtypes bfloat16 --batches 8 32 \
    --prompt-len 1024 --new-tokens 64 --reps 3 --skip-transformers --kv-caches virtual paged \
    --out "$OUT/decode_throughput_kv_cuda.json" 2>&1 | grep '^{"shape"' | cut -c1-600
fi

if want decode; then
step "decode throughput vs transformers on cuda"
timeout 180 $py -m benchmarks.decode_throughput --device cuda --threads 4 --shapes 0.1b 0.5b --dtypes bfloat16 \
    --batches 1 8 32 --reps 3 --out "$OUT/decode_throughput_cuda.json" 2>&1 | grep '^{"shape"'
fi

step done
