"""Cross-attention kernels: Triton backend vs torch SDPA (flash) vs the eager reference, on CUDA.
"sdpa_default" is SDPA with torch's own backend choice (cuDNN attention on an H100, faster than
flash there): not the target's yardstick, but what the "sdpa" backend would get.

    cd /work/main && PYTHONPATH=. python bench/bench_attention.py [--quick] [--out-dir bench/results]

Forward and backward, bf16, head dims 64 and 128, Tq = Tk from 512 to 8192, batch x heads chosen
so every point moves 16k tokens x 2048 channels (the GPU is full at every length). Masks:
"aligned" with Tq == Tk is plain causal (SDPA gets is_causal=True), "context" is unmasked.
FLOPs: forward 4*B*H*Tq*Tk*d (two matmuls), backward 2.5x forward (five matmuls), causal
halved. Times are medians of triton.testing.do_bench. The backward is timed alone (a retained
graph, backward only). Autotuning runs during warm-up, not in the timings.
Causal points also time "triton_grouped": the same kernels with their programs taken several
heads at a time, heaviest blocks first (CALM_FAST_TRITON_HEAD_GROUP=auto; see _program_order),
and, forward only (the backward does not change), "triton_tma" and "triton_tma_grouped": the
forward reading K/V through Hopper's TMA (CALM_FAST_TRITON_TMA=1), in each program order.
Also times one bridge decode step at batch 1 (D_B 4096, 32 heads, 2048 cached rows) and reports
the bytes it must move (weights + cache) and the bandwidth that implies.
Writes bench/results/attention_<device>.json and attention_<device>.png.
"""
import argparse
import json
import math
import os
import platform
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _device_tag() -> str:
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


def attention_flops(b, h, tq, tk, d, causal: bool, backward: bool) -> float:
    """4 FLOPs per (query, key, dim) the mask allows; backward 2.5x. Causal is the aligned mask
    (query i sees keys <= i + Tk - Tq): Tq*Tk - Tq(Tq-1)/2 pairs for Tq <= Tk, Tk(Tk+1)/2 for
    Tq > Tk, i.e. T(T+1)/2 at Tq = Tk (0.1% above the common T^2/2 at T = 1024)."""
    pairs = float(tq) * tk
    if causal:
        pairs = pairs - tq * (tq - 1) / 2 if tq <= tk else tk * (tk + 1) / 2
    return 4.0 * b * h * pairs * d * (2.5 if backward else 1.0)


def bench_attention(args, tx, ref, do_bench) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    seqs = [1024, 4096, 8192] if args.quick else [512, 1024, 2048, 4096, 8192]
    for d in ((128,) if args.quick else (64, 128)):
        n_heads = 2048 // d
        for mask in ("aligned", "context"):
            causal = mask == "aligned"
            for t in seqs:
                b = max(1, 16384 // t)
                q, k, v = (torch.randn(b, n_heads, t, d, device="cuda", dtype=torch.bfloat16,
                                       requires_grad=True) for _ in range(3))
                do = torch.randn_like(q)

                def sdpa(q=q, k=k, v=v, causal=causal):
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                                is_causal=causal)

                def sdpa_default(q=q, k=k, v=v, causal=causal):  # torch's own pick (cuDNN on Hopper)
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

                triton_fn = lambda q=q, k=k, v=v, mask=mask: tx.cross_attention(q, k, v, mask)  # noqa: E731
                providers = {"triton": triton_fn, "sdpa_flash": sdpa, "sdpa_default": sdpa_default}
                if causal:
                    providers.update(triton_grouped=triton_fn, triton_tma=triton_fn,
                                     triton_tma_grouped=triton_fn)
                # The eager reference materialises fp32 B*H*T*T scores (several copies).
                if 4 * b * n_heads * t * t * 4 <= args.eager_limit_gb * 2**30:
                    providers["reference"] = lambda q=q, k=k, v=v, mask=mask: ref.cross_attention(
                        q, k, v, mask)
                for name, fn in providers.items():
                    # The program order and TMA settings are read at every call.
                    os.environ["CALM_FAST_TRITON_HEAD_GROUP"] = "auto" if name.endswith("_grouped") else "1"
                    os.environ["CALM_FAST_TRITON_TMA"] = "1" if name.startswith("triton_tma") else "0"
                    # fwd_train: the forward with gradients on (Triton then keeps an fp32 output
                    # and a second P·V product for the backward's delta; FLOPs counted as fwd's).
                    passes = (("fwd",) if name.startswith("triton_tma") else
                              ("fwd", "bwd", "fwd_train") if name in ("triton", "sdpa_flash") else
                              ("fwd", "bwd"))
                    for pass_ in passes:
                        backward = pass_ == "bwd"
                        try:
                            if backward:
                                out = fn()
                                ms = do_bench(lambda out=out: torch.autograd.grad(
                                    out, (q, k, v), do, retain_graph=True), return_mode="median")
                            elif pass_ == "fwd_train":
                                ms = do_bench(fn, return_mode="median")
                            else:
                                with torch.no_grad():
                                    ms = do_bench(fn, return_mode="median")
                        except torch.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            continue
                        tflops = attention_flops(b, n_heads, t, t, d, causal, backward) / ms * 1e-9
                        row = dict(provider=name, pass_=pass_, mask=mask,
                                   head_dim=d, seq=t, batch=b, heads=n_heads, ms=ms, tflops=tflops)
                        rows.append(row)
                        print(f"{name:18s} {row['pass_']:9s} {mask:7s} d={d:3d} T={t:5d} B={b:3d} "
                              f"H={n_heads:2d}  {ms:8.3f} ms  {tflops:7.1f} TFLOP/s", flush=True)
                del q, k, v, do
                torch.cuda.empty_cache()
    os.environ.pop("CALM_FAST_TRITON_HEAD_GROUP", None)
    os.environ.pop("CALM_FAST_TRITON_TMA", None)
    return rows


def bench_decode(tx, ref, do_bench) -> list[dict]:
    torch.manual_seed(0)
    d_b, d_a, n_heads, cached, cap = 4096, 2048, 32, 2048, 4096
    hd = d_b // n_heads
    dt = torch.bfloat16
    dev = "cuda"
    h_b = torch.randn(1, 1, d_b, device=dev, dtype=dt)
    h_a = torch.randn(1, 1, d_a, device=dev, dtype=dt)
    w_q = torch.randn(d_b, d_b, device=dev, dtype=dt) / 64
    w_kv = torch.randn(2 * d_b, d_a, device=dev, dtype=dt) / 45
    b_kv = torch.randn(2 * d_b, device=dev, dtype=dt)
    w_o = torch.randn(d_b, d_b, device=dev, dtype=dt) / 64
    k_cache = torch.randn(1, n_heads, cap, hd, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    pos = cached   # rows [0, cached) are filled; this step writes row `cached` and attends to all
    elt = 2
    weight_bytes = (2 * d_b * d_b + 2 * d_b * d_a + 2 * d_b) * elt
    cache_bytes = 2 * n_heads * (pos + 1) * hd * elt
    total = weight_bytes + cache_bytes
    rows = []
    for name, fn in (("triton", tx.bridge_decode_step), ("reference", ref.bridge_decode_step)):
        us = 1e3 * do_bench(lambda fn=fn: fn(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos,
                                             n_heads, None), return_mode="median")
        rows.append(dict(provider=name, batch=1, d_b=d_b, d_a=d_a, heads=n_heads, cached_rows=pos,
                         us=us, bytes=total, gb_per_s=total / us * 1e-3))
        print(f"decode {name:10s} {us:8.1f} us   {total / 2**20:.1f} MiB moved   "
              f"{total / us * 1e-3:7.1f} GB/s", flush=True)
    return rows


def plot(rows, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), sharex=True)
    styles = {"triton": "-o", "triton_grouped": "-.o", "triton_tma": "-x", "triton_tma_grouped": "-.x",
              "sdpa_flash": "--s", "sdpa_default": ":s", "reference": ":^"}
    for i, pass_ in enumerate(("fwd", "bwd")):
        for j, mask in enumerate(("aligned", "context")):
            ax = axes[i][j]
            for prov, style in styles.items():
                for d in (64, 128):
                    pts = sorted((r["seq"], r["tflops"]) for r in rows if r["provider"] == prov
                                 and r["pass_"] == pass_ and r["mask"] == mask and r["head_dim"] == d)
                    if pts:
                        ax.plot(*zip(*pts), style, label=f"{prov} d={d}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{pass_}, {mask}{' (causal)' if mask == 'aligned' else ''}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="head dim 128, lengths 1024/4096/8192 only (fits a short GPU slot)")
    ap.add_argument("--eager-limit-gb", type=float, default=24.0,
                    help="skip the eager reference where its score tensors exceed this")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    if not args.eager_limit_gb >= 0:  # NaN too: it would silently drop the reference everywhere
        ap.error(f"--eager-limit-gb must be a number >= 0, got {args.eager_limit_gb}")
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (Triton kernels, SDPA flash); none found")
    import triton
    from triton.testing import do_bench

    from calm_fast.ops import reference as ref
    from calm_fast.ops import triton_xattn as tx

    attn = bench_attention(args, tx, ref, do_bench)
    decode = bench_decode(tx, ref, do_bench)

    def ratio(pass_, mask, d, t):
        pick = {r["provider"]: r["tflops"] for r in attn if (r["pass_"], r["mask"], r["head_dim"],
                                                             r["seq"]) == (pass_, mask, d, t)}
        return pick["triton"] / pick["sdpa_flash"] if "triton" in pick and "sdpa_flash" in pick else None

    summary = {f"{p}_{m}_d{d}_T{t}_triton_over_sdpa": ratio(p, m, d, t)
               for p in ("fwd", "bwd") for m in ("aligned", "context") for d in (64, 128)
               for t in sorted({r["seq"] for r in attn})}
    for r in attn:  # grouped program order, TMA and the training forward against the default
        variant = r["provider"] in ("triton_grouped", "triton_tma", "triton_tma_grouped")
        if variant or (r["provider"] == "triton" and r["pass_"] == "fwd_train"):
            want_pass = r["pass_"] if variant else "fwd"
            base = [b for b in attn if b["provider"] == "triton" and b["pass_"] == want_pass and all(
                b[k] == r[k] for k in ("mask", "head_dim", "seq"))]
            if base:
                print(f"{r['provider']} {r['pass_']} {r['mask']} d={r['head_dim']} T={r['seq']}: "
                      f"{r['tflops']:.1f} vs {base[0]['tflops']:.1f} TFLOP/s "
                      f"(x{r['tflops'] / base[0]['tflops']:.3f})")
    tag = _device_tag()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "python": platform.python_version(),
              "dtype": "bfloat16", "flops_note": "fwd 4BHd x (query, key) pairs the mask allows (causal: T(T+1)/2 at Tq = Tk; "
                            "before session 10, T^2/2), bwd 2.5x fwd",
              "attention": attn, "decode": decode, "triton_over_sdpa": summary,
              # which tile each tuned kernel chose per key (TQ/TK length buckets, head dim,
              # causal, padding, precision): what to start from when tuning further
              "autotuned_configs": {name: {str(k): str(c) for k, c in getattr(t, "cache", {}).items()}
                                    for name, t in tx._TUNED.items()}}
    json_path = out_dir / f"attention_{tag}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(attn, out_dir / f"attention_{tag}.png",
         f"cross-attention bf16 on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
         f"triton {triton.__version__})")
    print(f"wrote {json_path} and {json_path.with_suffix('.png')}")
    for name, chosen in result["autotuned_configs"].items():
        for key, cfg in chosen.items():
            print(f"autotuned {name} {key}: {cfg}")
    for pass_ in ("fwd", "bwd"):
        got = [v for k, v in summary.items() if k.startswith(pass_) and v is not None
               and not math.isnan(v)]
        if got:
            print(f"{pass_}: triton / sdpa_flash TFLOP/s ratio, min {min(got):.2f} "
                  f"max {max(got):.2f} over {len(got)} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
