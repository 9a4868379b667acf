#!/usr/bin/env bash
# One call on a CUDA machine: the CUDA tests, the packed-runs benchmark, train.compile eager vs compiled
# (default and reduce-overhead = CUDA graphs), the mixture benchmark on CUDA, and a short real training on the GPU; logs and tables go to $OUT (or the folder given as the first argument).
# Sized to finish within ~9 minutes on one H200; on a machine without CUDA it says so and skips those parts.
#   bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-outputs/gpu_check}}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
DATA="${DATA_ROOT:-../shared/data}"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
have_cuda=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
$PY -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
  > "$OUT/device.txt" 2>&1
log "device: $(cat "$OUT/device.txt")"
if [ "$have_cuda" != "1" ]; then
  log "no CUDA on this machine: running the CPU-side smoke of this script only"
  timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$OUT/cuda_tests.txt" 2>&1
  log "cuda tests (expected: skipped): $(tail -1 "$OUT/cuda_tests.txt")"
  timeout 120 $PY bench/bench_packed.py --members 1,4 --reps 1 > "$OUT/bench_packed_cpu.md" 2>&1
  log "packed bench (CPU, M = 1, 4): $(grep -c '^| ' "$OUT/bench_packed_cpu.md") table lines"
  timeout 180 $PY bench/bench_compile.py --members 1 --estimators nvil --reps 2 --min-steps 8 \
    > "$OUT/bench_compile_cpu.md" 2>&1
  log "compile bench (CPU, M = 1, NVIL): $(grep -c '^| ' "$OUT/bench_compile_cpu.md") table lines"
  exit 0
fi
log "1/5 CUDA tests (every model x estimator, a few steps on cuda)"
timeout 120 $PY -m pytest -q -p no:cacheprovider -m gpu tests/ > "$OUT/cuda_tests.txt" 2>&1
log "   $(tail -1 "$OUT/cuda_tests.txt")"
log "2/5 packed-runs benchmark on CUDA"
timeout 180 $PY bench/bench_packed.py --device cuda --members 1,4,16,64,256 --reps 3 \
  > "$OUT/bench_packed_cuda.md" 2>&1
log "   done ($(grep -c '^| ' "$OUT/bench_packed_cuda.md") table lines)"
log "3/5 train.compile on CUDA: eager vs torch.compile default and reduce-overhead (MuProp-C, M = 1, 16)"
timeout 90 $PY bench/bench_compile.py --device cuda --members 1,16 --estimators muprop_c \
  --modes default,reduce-overhead --reps 4 > "$OUT/bench_compile_cuda.md" 2>&1
log "   done ($(grep -c '^| ' "$OUT/bench_compile_cuda.md") table lines)"
log "4/5 mixture rsample + backward on CUDA"
timeout 60 $PY bench/bench_mixture.py --quick --device cuda > "$OUT/bench_mixture_cuda.md" 2>&1 \
  || log "   bench_mixture.py has no --device cuda run (see its output)"
log "5/5 a packed training of one Table 3 row on the GPU: SBN 200-784, MuProp-C, 3 seeds x 3 lrs, member dimension, 120 s budget"
timeout 120 $PY run.py -m hydra/launcher=packed experiment=muprop_table3_sbn_1layer estimator=muprop_c \
  seed=1,2,3 optim.lr=3e-3,1e-3,3e-4 train.steps=3000 train.member_dim=true device=cuda data.root="$DATA" eval.samples=100 \
  logger.mode=offline quiet=true hydra.sweep.dir="$OUT/train_cuda_packed" > "$OUT/train_cuda.txt" 2>&1
log "   exit $? ; $(grep -h train_seconds "$OUT"/train_cuda_packed/*/summary.json | head -3 | tr -d '\n')"
log "finished"
