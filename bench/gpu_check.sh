#!/usr/bin/env bash
# One run on a CUDA machine, < 10 minutes: the gpu-marked tests, then the GPU bench rows (device cuda vs cpu,
# effective GB/s, GPU utilisation sampled by nvidia-smi), then a summary. Results also go to $OUT (or
# ./gpu-check-out) as gpu-tests.txt, gpu-bench.txt and gpu-bench.json.
#
#   bash bench/gpu_check.sh             # 400m and 4g models (~5 min on a 16-core CUDA box)
#   SIZES="400m" bash bench/gpu_check.sh
#   TEST_TIMEOUT=180 BENCH_TIMEOUT=330 bash bench/gpu_check.sh   # the two stages' limits (seconds)
set -u
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-./gpu-check-out}"
mkdir -p "$OUTDIR"
SIZES="${SIZES:-400m 4g}"
TEST_TIMEOUT="${TEST_TIMEOUT:-240}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-420}"
export PYTHONUNBUFFERED=1
t0=$(date +%s)

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: CUDA is not available here (torch $(python -c 'import torch; print(torch.__version__)')); nothing to check"
  exit 3
fi
python -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

echo "== pytest -m gpu =="
timeout "$TEST_TIMEOUT" python -m pytest -m gpu -q -rs -p no:cacheprovider --continue-on-collection-errors tests/ 2>&1 | tee "$OUTDIR/gpu-tests.txt"
tests_rc=${PIPESTATUS[0]}

echo "== GPU bench rows =="
size_args=()
for s in $SIZES; do size_args+=(--size "$s"); done
timeout "$BENCH_TIMEOUT" python bench/merge_bench.py "${size_args[@]}" --rows copy,loraport,loraport-cuda,loraport-x8,loraport-x8-cuda \
  --json "$OUTDIR/gpu-bench.json" 2>&1 | tee "$OUTDIR/gpu-bench.txt"
bench_rc=${PIPESTATUS[0]}

echo
echo "== summary ($(( $(date +%s) - t0 )) s) =="
echo "gpu tests: $(tail -n 1 "$OUTDIR/gpu-tests.txt") (rc=$tests_rc)"
python - "$OUTDIR/gpu-bench.json" <<'PY' || true
import json, sys
res = json.load(open(sys.argv[1]))
by = {(r["size"], r["row"]): r for r in res}
for (size, row), r in by.items():
    if not row.endswith("-cuda") or r.get("rc") != 0:
        continue
    cpu = by.get((size, row.removesuffix("-cuda")))
    g = r.get("gpu") or {}
    speed = f"{cpu['net'] / r['net']:.2f}x the cpu path" if cpu and cpu.get("rc") == 0 else "cpu row missing"
    print(f"{size:>5} {row:<17} net {r['net']:.2f}s  {r['bytes'] / r['net'] / 1e9:.2f} GB/s  {speed}  "
          f"GPU util mean {g.get('mean', '?')}% max {g.get('max', '?')}%  peak anon {r['anon'] / 2**20:.0f} MiB")
PY
echo "bench rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
