"""The Triton causal cross-attention forward at the shape of its open target, a few times: the
workload bench/gpu_check.sh profiles with Nsight Compute (bf16, B = 2, 16 heads of 128,
T = 8192, aligned = causal mask; bench_attention.py --quick's longest point). The tile is the
one the autotuner chose there on the H100 (128 x 128, 8 warps, 3 stages), fixed so that ncu
sees one kernel and no tuning sweep; CALM_FAST_TRITON_HEAD_GROUP applies as set."""
import torch

from calm_fast.ops import reference as ref
from calm_fast.ops import triton_xattn as tx

B, H, T, D = 2, 16, 8192, 128
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, H, T, D, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
tx._CONFIGS["_attn_fwd"] = [tx._cfg(128, 128, 8, 3)]   # the autotuner's pool, pruned to this one
with torch.no_grad():
    for _ in range(3):
        out = tx.cross_attention(q, k, v, "aligned")
    torch.cuda.synchronize()
    # Check a slice against the reference (all of it would take the eager path minutes).
    want = ref.cross_attention(q[:1, :1], k[:1, :1], v[:1, :1], "aligned")
err = ((out[:1, :1].float() - want.float()).norm() / want.float().norm()).item()
print(f"causal forward ok: |out - ref| / |ref| = {err:.2e} (batch 0, head 0)")
