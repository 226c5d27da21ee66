#!/usr/bin/env bash
# Build calm_fast._C with AddressSanitizer + UBSan (CMake option CALM_FAST_SANITIZE) into a
# separate tree and run the kernel tests against it; the CUDA kernels too, under the CPU emulator
# built with the same sanitizers (CF_EMU_SANITIZE=1, tests/cuda_emulator.py), so an out-of-bounds
# access of a CUDA kernel is reported at its line. Usage (from the repository root):
#   [ISA_DISPATCH=ON] scripts/asan_kernels.sh [build_dir] [pytest args...]
# ISA_DISPATCH=ON also builds the AVX2/AVX-512 copies (the run picks the widest this CPU has).
# Exit status: pytest's, or 1 when a sanitizer wrote a report (printed at the end).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="${1:-/tmp/calm_fast_asan}"; shift || true
PY="${PYTHON:-$ROOT/.venv/bin/python}"
cmake -S "$ROOT" -B "$BUILD" -DCALM_FAST_SANITIZE=ON -DCALM_FAST_CUDA=OFF \
      -DCALM_FAST_ISA_DISPATCH="${ISA_DISPATCH:-OFF}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" >/dev/null
cmake --build "$BUILD" -j"${JOBS:-2}" --target _C
SO="$(find "$BUILD" -path "$BUILD/overlay" -prune -o -name '_C*.so' -print | head -1)"
# A package overlay: calm_fast's Python files from the tree, _C from the ASan build.
PKG="$BUILD/overlay/calm_fast"
rm -rf "$BUILD/overlay"; mkdir -p "$PKG"
cp -r "$ROOT"/calm_fast/* "$PKG"/; rm -f "$PKG"/_C*.so; cp "$SO" "$PKG"/
# Python itself is not instrumented: preload the ASan runtime, skip leak checks (CPython
# keeps allocations alive at exit), stop at the first error.
LIBASAN="$(${CXX:-g++} -print-file-name=libasan.so)"
LIBUBSAN="$(${CXX:-g++} -print-file-name=libubsan.so)"
export LD_PRELOAD="$LIBASAN:$LIBUBSAN"
# Reports go to files (pytest captures the test's stderr, and an abort loses it); printed below.
REPORTS="$BUILD/reports"; rm -rf "$REPORTS"; mkdir -p "$REPORTS"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:log_path=$REPORTS/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$REPORTS/ubsan"
export PYTHONPATH="$BUILD/overlay:$ROOT"
cd "$ROOT"
"$PY" -P -c "import calm_fast._C as C, sys; assert C.__file__.startswith('$BUILD'), C.__file__; print('ASan _C:', C.__file__)"
# -P: do not put the working directory (the source tree, with the regular _C) first on sys.path.
export CF_EMU_SANITIZE=1
rc=0
"$PY" -P -m pytest -q -p no:cacheprovider tests/test_fuzz_kernels.py tests/test_ops_reference.py \
  tests/test_cuda_emulated.py "$@" || rc=$?
for f in "$REPORTS"/*; do  # the emulator's makecontext warning is not a finding
  [ -f "$f" ] && grep -qv "swapcontext" "$f" && { echo "=== $f"; cat "$f"; rc=${rc/#0/1}; }
done
exit $rc
