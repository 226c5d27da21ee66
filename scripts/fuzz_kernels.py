#!/usr/bin/env python
"""The long kernel fuzz: tests/test_fuzz_kernels.py with many more hypothesis examples, on
every CPU backend and on the CUDA kernels under the CPU emulator ("cuda_emu"), plus the Triton
kernels under TRITON_INTERPRET=1 in a subprocess (the interpreter must be on before triton is
imported). Writes a JSON summary of case counts.

    PYTHONPATH=. .venv/bin/python scripts/fuzz_kernels.py --examples 2000 --triton-examples 100 \
        --out fuzz_report.json

Exit status: non-zero if any run failed (each run's pytest output is printed)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT / "tests" / "test_fuzz_kernels.py"


def run(name: str, examples: int, backends: str | None, extra_env: dict, timeout: int,
        select: str | None = None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = f.name
    env = dict(os.environ, PYTHONPATH=str(ROOT), CALM_FUZZ_EXAMPLES=str(examples),
               CALM_FUZZ_REPORT=report, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               **extra_env)
    if backends:
        env["CALM_FUZZ_BACKENDS"] = backends
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TEST)]
    if select:
        cmd += ["-k", select]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, f"timed out after {timeout}s\n{e.stdout or ''}"
    print(f"== {name}: rc={rc} in {time.time() - t0:.0f}s")
    print("\n".join(out.strip().splitlines()[-60:]))
    counts = {}
    if Path(report).is_file() and Path(report).stat().st_size:
        counts = json.loads(Path(report).read_text())
    os.unlink(report)
    return {"rc": rc, "seconds": round(time.time() - t0, 1), **counts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1000, help="hypothesis examples per test, CPU backends")
    ap.add_argument("--triton-examples", type=int, default=60,
                    help="examples per test for triton under TRITON_INTERPRET=1 (0 = skip)")
    ap.add_argument("--triton-dtypes", default="float32",
                    help="dtypes for the triton run (bfloat16 under the CPU interpreter gives garbage, "
                         "see docs/reliability.md; add it to check on a fixed interpreter)")
    ap.add_argument("--cuda-emu-examples", type=int, default=300,
                    help="examples per test for the emulated CUDA kernels (0 = skip)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--out", default=None, help="write the JSON summary here")
    args = ap.parse_args()
    summary = {"cpu": run("cpu backends (+ emulated CUDA)", args.examples, None,
                          {"CALM_FUZZ_CUDA_EMU_EXAMPLES": str(args.cuda_emu_examples)}, args.timeout)}
    if args.triton_examples > 0:
        try:
            import triton  # noqa: F401
            summary["triton"] = run("triton (interpreter)", args.triton_examples, "reference,triton",
                                    {"TRITON_INTERPRET": "1", "CALM_FUZZ_DTYPES": args.triton_dtypes,
                                     "CALM_FUZZ_CUDA_EMU_EXAMPLES": "0"},
                                    args.timeout,
                                    select="matches_reference or gradients")
        except ImportError:
            summary["triton"] = {"rc": 0, "skipped": "triton is not installed"}
    text = json.dumps(summary, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all(r["rc"] == 0 for r in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
