"""Runs the emulated CUDA kernels' test cases under ThreadSanitizer: the race checker of
csrc/cuda/emulator (emu_core.hpp). Run by tests/test_cuda_racecheck.py in a subprocess with
libtsan preloaded and CF_EMU_SANITIZE=thread; by hand:

    CF_EMU_SANITIZE=thread OMP_NUM_THREADS=1 LD_PRELOAD=$(g++ -print-file-name=libtsan.so) \\
      PYTHONPATH=.:tests python tests/cuda_racecheck.py [--knobs] [--only attention|decode]

Every case is also compared with the reference. TSan prints each race it finds on stderr and
makes the process exit with status 66 (TSAN_OPTIONS exitcode); exit 1 is a wrong result."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from cuda_emulator import ROOT, attend, build, decode_step, emulated_gpu
from test_cuda_emulated import (ATTN_PARAMS, DECODE_CASES, KNOBS, TOL, _attn_inputs, _decode_args, _decode_want)
from test_native_ops import rel
from calm_fast.ops import reference as ref


def attention_cases(lib) -> int:
    for shape, mask, kind, dtype, kernel in ATTN_PARAMS:
        q, k, v, kpm = _attn_inputs(shape, kind, dtype)
        with emulated_gpu(CALM_FAST_CUDA_ATTN=kernel):
            out, _ = attend(lib, q, k, v, mask, kpm)
        want = ref.cross_attention(q.double(), k.double(), v.double(), mask, kpm)
        if not rel(out, want) <= TOL[dtype]:
            sys.exit(f"attention {shape} {mask} {kind} {dtype} {kernel}: wrong result ({rel(out, want):.2e})")
    return len(ATTN_PARAMS)


def decode_cases(lib) -> int:
    runs = 0
    for case in DECODE_CASES:
        b, h, d, d_a, s, pos, context, kind, dtype = case
        for sms in (1, 3):  # one chunk per head; several chunks merged across blocks
            args = _decode_args(b, h, d, d_a, s, context, kind, dtype)
            want, _, _ = _decode_want(args, pos, h)
            with emulated_gpu(CF_EMU_SMS=sms):
                out = decode_step(lib, *args[:8], pos, h, args[8])
            if not rel(out, want) <= TOL[dtype]:
                sys.exit(f"decode step {case} on {sms} SMs: wrong result ({rel(out, want):.2e})")
            runs += 1
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--knobs", action="store_true", help="the decode step's sweep knobs on (no grid barriers)")
    parser.add_argument("--only", choices=("attention", "decode"))
    parser.add_argument("--root", type=Path, default=ROOT, help="source tree to build (default: this checkout)")
    args = parser.parse_args()
    if os.environ.get("CF_EMU_SANITIZE") != "thread":
        sys.exit("set CF_EMU_SANITIZE=thread and preload libtsan (see this file's docstring)")
    torch.set_num_threads(1)
    lib = build(*(KNOBS if args.knobs else ()), root=args.root)
    done = []
    if args.only in (None, "attention"):
        done.append(f"{attention_cases(lib)} attention cases")
    if args.only in (None, "decode"):
        done.append(f"{decode_cases(lib)} decode steps")
    print("racecheck ran " + ", ".join(done), flush=True)


if __name__ == "__main__":
    main()
