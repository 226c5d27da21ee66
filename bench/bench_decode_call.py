"""What one bridge decode step costs on the CPU, layer by layer of the call path, with the
weights evicted from the cache before every call (as in generation, where the anchor streams
~200 MB between two bridges): the raw kernel (`_C.decode_step`), then each Python layer on top
(argument packing, the torch.ops dispatcher, validation, backend routing) and the eager
reference. Interleaved, medians; one torch thread. The composition-overhead analysis in
bench/peer/ANALYSIS.md quotes it.

    PYTHONPATH=. .venv/bin/python bench/bench_decode_call.py [--rounds 40]

Sizes: the reference configuration's bridge (D_B 512, D_A 256, 8 heads, fp32, 193 cached rows).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from calm_fast import ops
from calm_fast.ops import native, reference as ref


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--flush-mb", type=int, default=512, help="buffer rewritten before each call (> L3)")
    args = ap.parse_args(argv)
    # Checked before any work: --rounds 0 was an empty median after the warm-up rounds, a
    # negative --flush-mb a traceback from torch.zeros.
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.flush_mb < 0:
        ap.error(f"--flush-mb must be >= 0 (0: no eviction), got {args.flush_mb}")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    d_b, d_a, heads, rows, pos = 512, 256, 8, 256, 192

    def r(*shape):
        return torch.randn(*shape, generator=g)
    h_b, h_a = r(1, 1, d_b), r(1, 1, d_a)
    w_q, w_o, w_kv, b_kv = r(d_b, d_b), r(d_b, d_b), r(2 * d_b, d_a), r(2 * d_b)
    k_cache, v_cache = r(1, heads, rows, d_b // heads), r(1, heads, rows, d_b // heads)
    step = (h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, heads)
    descs, out, keep = native._decode_args(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, None)
    layers = {
        "raw _C.decode_step": lambda: native._C.decode_step(*descs, pos, heads, native._desc(out)),
        "+ argument packing": lambda: native._decode_step_cpu(*step, None),
        "+ torch.ops dispatcher": lambda: native.native_decode_step(*step, None),
        "+ validation": lambda: native.bridge_decode_step(*step),
        "+ backend routing (ops, auto)": lambda: ops.bridge_decode_step(*step),
        "eager reference": lambda: ref.bridge_decode_step(*step),
    }
    flush = torch.zeros(args.flush_mb << 20, dtype=torch.uint8)
    times = {k: [] for k in layers}
    with torch.inference_mode():
        for i in range(args.rounds + 3):  # 3 warm-up rounds
            for name, fn in layers.items():
                flush.add_(1)  # evict the weights and the cache rows
                t = time.perf_counter()
                fn()
                if i >= 3:
                    times[name].append(time.perf_counter() - t)
    nbytes = 4 * (3 * d_b * d_b + 2 * d_b + 2 * (pos + 1) * d_b)
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:32s} {m * 1e6:8.1f} us   {nbytes / m / 1e9:5.2f} GB/s of {nbytes / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
