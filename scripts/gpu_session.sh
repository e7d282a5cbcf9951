#!/usr/bin/env bash
# Everything a lent GPU machine should check and measure, in one go:
#   scripts/gpu_session.sh [OUTDIR] [STAGES]   (default results/gpu, "tests bench throughput";
#                                               also "variants"; CASES=a,b limits throughput)
# 1. tests: the GPU fast path against the plain path on CUDA (tests/test_gpu_kernels.py)
#    and the engine on CUDA through the test suite's GPU tests;
# 2. bench: `python -m adamwprune.bench` on CUDA (step ratios, bandwidth, mask updates, engine);
# 3. throughput: scripts/gpu_throughput.py (tokens/s, MFU, images/s, peak memory of presets).
# Runs from a checkout without `pip install` (lib/ is put on PYTHONPATH as adamwprune),
# so it works with a machine's own torch; each stage's log lands in OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-results/gpu}
STAGES=${2:-tests bench throughput}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR" /tmp/awp-pkg
ln -sfn "$PWD/lib" /tmp/awp-pkg/adamwprune
export PYTHONPATH=/tmp/awp-pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUTDIR/env.txt"
status=0
for stage in $STAGES; do
  echo "=== $stage $(date +%T)"
  case $stage in
    tests) timeout 240 $PY -m pytest -q -x tests/test_gpu_kernels.py -p no:cacheprovider \
             2>&1 | tee "$OUTDIR/tests.log" ;;
    variants) timeout 240 $PY scripts/gpu_kernel_variants.py ${VARIANT_ARGS:-} 2>&1 | tee "$OUTDIR/variants.log" ;;
    bench) timeout 420 $PY -m adamwprune.bench --device cuda ${BENCH_ARGS:---plain} --out "$OUTDIR" \
             2>&1 | tee "$OUTDIR/bench.log" ;;
    throughput) timeout 540 $PY scripts/gpu_throughput.py --out "$OUTDIR" ${CASES:+--cases $CASES} \
             2>&1 | tee "$OUTDIR/throughput.log" ;;
    *) echo "unknown stage $stage"; false ;;
  esac
  rc=$?; [ $rc -ne 0 ] && status=$rc && echo "=== $stage failed ($rc)"
done
exit $status
