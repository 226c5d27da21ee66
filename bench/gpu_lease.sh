#!/usr/bin/env bash
# Everything GPU-side in ONE device call (about 9 minutes), for a lease of a few minutes:
#   1. bench/gpu_check.sh (build, CUDA tests, benchmarks, Triton GPU tests, profile, the composed
#      model), within GPU_CHECK_BUDGET_S (default 400 s); meanwhile the decode sweep's variants
#      are compiled beside it at low CPU priority (they need no GPU);
#   2. bench/gpu_decode_sweep.sh's test + timing of each variant, within SWEEP_BUDGET_S
#      (default 175 s).
# From the repository root:  bash bench/gpu_lease.sh   (device call: timeout_s 600; the third
# lease ran it with 320 + 240 s in 528 s, and its calm stage did not fit in the 40 s left)
# Back in $OUT (or /tmp/calm_fast_lease), within a device call's 8-file limit:
# check_summary.txt, sweep_summary.txt, and gpu_lease.tgz with every log, JSON and PNG of both.
set -u -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
DEST=${OUT:-/tmp/calm_fast_lease}
WORK=${LEASE_WORK:-/tmp/calm_fast_lease_files}
rm -rf "$WORK"
mkdir -p "$WORK/check" "$WORK/sweep" "$DEST"

OUT="$WORK/sweep" SWEEP_PHASE=build nice -n 19 bash bench/gpu_decode_sweep.sh >"$WORK/sweep/build_stdout.log" 2>&1 &
BUILDS=$!
OUT="$WORK/check" GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-400} bash bench/gpu_check.sh
CHECK_RC=$?
wait "$BUILDS"
echo "=== decode sweep builds: $(cat "$WORK/sweep/build.log" 2>/dev/null | grep -c '^---') variants"
OUT="$WORK/sweep" SWEEP_PHASE=run SWEEP_BUDGET_S=${SWEEP_BUDGET_S:-175} bash bench/gpu_decode_sweep.sh
SWEEP_RC=$?

cp "$WORK/check/summary.txt" "$DEST/check_summary.txt" 2>/dev/null
cp "$WORK/sweep/summary.txt" "$DEST/sweep_summary.txt" 2>/dev/null
tar czf "$DEST/gpu_lease.tgz" -C "$WORK" .
echo "=== gpu_check rc=$CHECK_RC, decode sweep rc=$SWEEP_RC"
exit $(( CHECK_RC || SWEEP_RC ))
