"""One bridge decode step on the CUDA backend, a few times: the workload `ncu` profiles in
bench/gpu_check.sh (B = 1, or the batch given as the first argument; D_B = 4096, D_A = 2048,
32 heads of 128, 2048 cached rows, bf16, the same sizes as bench_bridge.py --quick's decode rows)."""
import sys

import torch

from calm_fast import ops
from calm_fast.ops import reference as ref

B = int(sys.argv[1]) if len(sys.argv) > 1 else 1
if B < 1:
    raise SystemExit(f"batch must be >= 1, got {B}")
D_B, D_A, HEAD, ROWS = 4096, 2048, 128, 2048
dev, dt = torch.device("cuda"), torch.bfloat16
gen = torch.Generator(device=dev).manual_seed(0)


def r(*shape, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dt)


h_b, h_a = r(B, 1, D_B), r(B, 1, D_A)
w_q, w_o = r(D_B, D_B, scale=D_B ** -0.5), r(D_B, D_B, scale=D_B ** -0.5)
w_kv, b_kv = r(2 * D_B, D_A, scale=D_A ** -0.5), r(2 * D_B)
k_cache, v_cache = r(B, D_B // HEAD, ROWS, HEAD), r(B, D_B // HEAD, ROWS, HEAD)
with torch.inference_mode():
    for _ in range(5):
        out = ops.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, ROWS - 1,
                                     D_B // HEAD, backend="cuda")
    torch.cuda.synchronize()
    want = ref.bridge_decode_step(h_b.float(), h_a.float(), w_q.float(), w_kv.float(), b_kv.float(),
                                  w_o.float(), k_cache.float(), v_cache.float(), ROWS - 1, D_B // HEAD)
print(f"decode step ok: |out - ref| / |ref| = {((out.float() - want).norm() / want.norm()).item():.2e}")
