#!/usr/bin/env bash
# Tuning sweep for the one-launch CUDA decode step, in one device call: builds _C_cuda once
# per setting of its knobs (the CF_DECODE_* macros at the top of csrc/cuda/decode_step.cu),
# then for each build, in turn: swaps it into calm_fast/, runs the decode and padded-key tests of
# tests/test_cuda_ops.py, and times it with bench/bench_bridge.py (bf16, --quick --only decode:
# B = 1 and 4, D_B 4096, 2048 cached rows, graph-replayed beside cuBLAS + SDPA). The original
# module is put back at the end. From the repository root, after a build of the tree
# (`python setup.py build_ext --inplace`, as bench/gpu_check.sh does):
#     bash bench/gpu_decode_sweep.sh
#     VARIANTS="base: wl16:-DCF_DECODE_WEIGHT_LOADS=16" bash bench/gpu_decode_sweep.sh
# A variant is NAME:FLAGS (flags with commas for spaces). Variants are built in parallel and
# run while SWEEP_BUDGET_S (default 360 s) lasts. SWEEP_PHASE=build only builds (no GPU
# needed: bench/gpu_lease.sh runs it beside gpu_check.sh), SWEEP_PHASE=run only tests and times
# what an earlier build left in SWEEP_WORK; the default does both. Back in $OUT (or
# /tmp/calm_fast_decode_sweep): sweep.log (build.log for the build phase), summary.txt and
# one bridge_<name>.json per variant.
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/calm_fast_decode_sweep}
WORK=${SWEEP_WORK:-/tmp/cf_sweep}
mkdir -p "$OUT_DIR" "$WORK"
PHASE=${SWEEP_PHASE:-all}
case $PHASE in all | build | run) ;; *) echo "SWEEP_PHASE must be all, build or run, not '$PHASE'" >&2; exit 2 ;; esac
LOG="$OUT_DIR/$([[ $PHASE == build ]] && echo build || echo sweep).log"
: >"$LOG"
DEADLINE=$(( $(date +%s) + ${SWEEP_BUDGET_S:-360} ))
log() { echo "$*" | tee -a "$LOG"; }

# base = the committed defaults. Third H100 lease (bench/RESULTS.md), graph-replayed µs at
# B = 1 / 4: base 107 / 195; MIN_CHUNK=32 106 / 195, CACHE_ROWS=8 108 / 196 (noise level);
# MIN_BLOCKS=1 (230-250 registers, no spill, one block per SM) and WEIGHT_LOADS=16 slower.
# Not yet timed (in the order run): df = CF_DECODE_DATAFLOW=1 (no grid barriers: per-head and
# merge counters in the workspace; sm_90 ptxas 128 registers, 128 B spill like base);
# xs = CF_DECODE_X_SMEM=1 (input vectors staged in shared memory, B <= 4);
# xsw = xs + CF_DECODE_STREAM_WEIGHTS=1 (weights read with L1::no_allocate; sm_90 ptxas: 128
# registers, 180 bytes of spill against base's 128); ufp = CF_DECODE_UNCHECKED_FULL_PASSES=1.
# Also untimed, left out for time: minb3 = -DCF_DECODE_MIN_BLOCKS=3,-DCF_DECODE_WEIGHT_LOADS=4,
# -DCF_DECODE_CACHE_ROWS=2 (3 blocks per SM, 80 registers, 240 bytes of spill).
VARIANTS=${VARIANTS:-"base: df:-DCF_DECODE_DATAFLOW=1 xsw:-DCF_DECODE_X_SMEM=1,-DCF_DECODE_STREAM_WEIGHTS=1 xs:-DCF_DECODE_X_SMEM=1 ufp:-DCF_DECODE_UNCHECKED_FULL_PASSES=1"}

GPU_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
GPU_ARCH=${GPU_ARCH:-90}

# ---- build every variant (in parallel; each its own cmake tree, the CUDA module only)
if [[ $PHASE != run ]]; then
PYBIND=$("$PY" -m pybind11 --cmakedir)
log "=== build (sm_$GPU_ARCH): $VARIANTS"
for v in $VARIANTS; do
  name=${v%%:*}; flags=${v#*:}; flags=${flags//,/ }
  rm -rf "${WORK:?}/$name"  # never time a module left over from an earlier build
  ( cmake -S "$ROOT" -B "$WORK/$name" -DCALM_FAST_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$GPU_ARCH" \
      -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$PYBIND" \
      -DCMAKE_CUDA_FLAGS="$flags" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$WORK/$name/mod" >"$WORK/$name.log" 2>&1 &&
    cmake --build "$WORK/$name" --target _C_cuda -j3 >>"$WORK/$name.log" 2>&1
    echo "$name build rc=$?" ) &
done
wait
for v in $VARIANTS; do
  name=${v%%:*}
  log "--- $name: $(grep -A2 'decode_step_kernelI13__nv_bfloat16Lb1' "$WORK/$name.log" | grep -E 'Used|spill' | tr -s ' ' | tr '\n' ' ')"
done
fi
[[ $PHASE == build ]] && exit 0

SO=$(ls calm_fast/_C_cuda*.so 2>/dev/null | head -1)
if [ -z "$SO" ]; then log "no calm_fast/_C_cuda*.so: build the tree first (python setup.py build_ext --inplace)"; exit 2; fi
cp "$SO" "$WORK/original.so"
restore() { cp "$WORK/original.so" "$SO.tmp" && mv "$SO.tmp" "$SO"; }
trap restore EXIT

# ---- test and time each variant in turn
SUMMARY="$OUT_DIR/summary.txt"
printf "%-12s %-8s %-12s %-12s %s\n" variant tests "B=1 us" "B=4 us" "flags" >"$SUMMARY"
for v in $VARIANTS; do
  name=${v%%:*}; flags=${v#*:}
  if (( $(date +%s) + 60 > DEADLINE )); then log "=== $name: skipped, no time left"; continue; fi
  built=$(ls "$WORK/$name/mod"/_C_cuda*.so 2>/dev/null | head -1)
  if [ -z "$built" ]; then
    log "=== $name: build failed"; tail -20 "$WORK/$name.log" | tee -a "$LOG"
    printf "%-12s %-8s %-12s %-12s %s\n" "$name" build - - "$flags" >>"$SUMMARY"; continue
  fi
  cp "$built" "$SO.tmp" && mv "$SO.tmp" "$SO"
  log "=== $name ($flags): $(md5sum "$SO" | cut -c1-12)"
  timeout 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda_ops.py -k "decode or padded" 2>&1 | tail -3 | tee -a "$LOG"
  t=${PIPESTATUS[0]}
  case $t in 0) tests=pass ;; 5) tests=none ;; *) tests=FAIL ;; esac  # 5: nothing ran (no GPU)
  if [[ $tests == FAIL ]]; then  # never time a wrong (or hanging: rc 124) kernel
    log "=== $name: tests failed (rc=$t), not timed"
    printf "%-12s %-8s %-12s %-12s %s\n" "$name" FAIL - - "$flags" >>"$SUMMARY"; continue
  fi
  timeout 150 "$PY" bench/bench_bridge.py --device cuda --dtype bfloat16 --quick --only decode \
    --out-dir "$WORK/$name/bench" --tag "$name" 2>&1 | grep -E "^decode B=" | tee -a "$LOG"
  cp "$WORK/$name/bench/bridge_$name.json" "$OUT_DIR/" 2>/dev/null
  us=$("$PY" - "$WORK/$name/bench/bridge_$name.json" <<'EOF' 2>/dev/null
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
got = {r["B"]: r["us"] for r in rows if r["phase"] == "decode" and r["variant"] == "cuda+graph"}
print(" ".join(f"{got.get(b, float('nan')):.1f}" for b in (1, 4)))
EOF
)
  printf "%-12s %-8s %-12s %-12s %s\n" "$name" "$tests" ${us:-- -} "$flags" >>"$SUMMARY"
done
log ""; log "=== summary (cuda decode step, graph-replayed device time; bench rows per variant in $OUT_DIR)"
tee -a "$LOG" <"$SUMMARY"
