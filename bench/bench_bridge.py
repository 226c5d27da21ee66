"""The whole CALM bridge (projection + cross-attention + output projection + residual), per
backend, against the eager reference and against F.scaled_dot_product_attention with separate
linears, for prefill and for one decode step.

    PYTHONPATH=. python bench/bench_bridge.py --device cpu [--quick]
    PYTHONPATH=. python bench/bench_bridge.py --device cuda --dtype bfloat16

Variants (all timed round-robin in one process; medians):
  prefill  ref        reference.bridge_forward (eager, fp32 softmax)
           sdpa       the same linears + F.scaled_dot_product_attention (is_causal when Tq=Tk)
           <backend>  ops.bridge_forward(..., backend=<backend>) for each available backend
           X+fold     X with the inference form: P folded into W_k/W_v (one D_A x 2 D_B GEMM,
                      reference.fold_projection, done once at load so not timed)
           X+graph    (CUDA; sdpa+fold, triton+fold) X replayed from a CUDA graph
  decode   ref        reference.bridge_decode_step (folded W_kv)
           sdpa       linears + cache write + SDPA over the cache
           <backend>  ops.bridge_decode_step(..., backend=<backend>)
           X+graph    (CUDA) X captured once in a CUDA graph and replayed: the device time,
                      without Python's per-call dispatch, which at batch 1 can exceed it
  attention (CUDA, or --attention): the attention op alone vs SDPA (flash on CUDA), causal.
Reports ms, TFLOP/s and GB/s (minimum bytes: weights + cache + activations) next to the
machine's measured ceilings (bench/common.py). Writes bench/results/bridge_<device>.json + .png.
Forward only, under torch.inference_mode (the bridge's training path is bench_train's job).
"""
from __future__ import annotations

import argparse
import os
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
from calm_fast import ops  # noqa: E402
from calm_fast.ops import reference as ref  # noqa: E402


def sdpa_attention(q, k, v, mask, kpm):
    tq, tk = q.shape[2], k.shape[2]
    if kpm is None and (mask == "context" or tq == tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask == "aligned")
    allowed = ref.attention_mask(tq, tk, mask, kpm, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def make_weights(d_a, d_b, dtype, device, gen):
    def w(*shape):
        return (torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])).to(device, dtype)
    return {"w_proj": w(d_b, d_a), "b_proj": w(d_b), "w_q": w(d_b, d_b), "w_k": w(d_b, d_b),
            "w_v": w(d_b, d_b), "w_o": w(d_b, d_b)}


def bench_prefill(args, device, dtype, backends, es):
    rows = []
    gen = torch.Generator().manual_seed(0)
    for d_b, n_heads in args.prefill_widths:
        d_a = d_b // 2
        wts = make_weights(d_a, d_b, dtype, device, gen)
        for b in args.batches:
            for t in args.seqs:
                h_b = torch.randn(b, t, d_b, generator=gen).to(device, dtype)
                h_a = torch.randn(b, t, d_a, generator=gen).to(device, dtype)

                def sdpa_bridge():
                    k, v = ref.project_kv(h_a, wts["w_proj"], wts["b_proj"], wts["w_k"], wts["w_v"])
                    q = F.linear(h_b, wts["w_q"])
                    att = sdpa_attention(ref.split_heads(q, n_heads), ref.split_heads(k, n_heads),
                                         ref.split_heads(v, n_heads), "aligned", None)
                    return h_b + F.linear(ref.merge_heads(att), wts["w_o"])

                w_kv, b_kv = ref.fold_projection(wts["w_proj"], wts["b_proj"], wts["w_k"], wts["w_v"])

                def folded(attention):
                    # Inference form (DESIGN.md "Algebraic fusion"): one GEMM for K and V.
                    kv = F.linear(h_a, w_kv, b_kv)
                    q = ref.split_heads(F.linear(h_b, wts["w_q"]), n_heads)
                    k, v = ref.split_heads(kv[..., :d_b], n_heads), ref.split_heads(kv[..., d_b:], n_heads)
                    return h_b + F.linear(ref.merge_heads(attention(q, k, v)), wts["w_o"])

                variants = {"ref": lambda: ref.bridge_forward(h_b, h_a, **wts, n_heads=n_heads),
                            "sdpa": sdpa_bridge,
                            "sdpa+fold": lambda: folded(lambda q, k, v: sdpa_attention(q, k, v, "aligned", None))}
                for be in backends:
                    variants[be] = lambda be=be: ops.bridge_forward(h_b, h_a, **wts, n_heads=n_heads,
                                                                    backend=be)
                    variants[be + "+fold"] = lambda be=be: folded(
                        lambda q, k, v: ops.cross_attention(q, k, v, "aligned", None, be))
                with torch.inference_mode():
                    if device.type == "cuda":  # the folded paths' device time, without Python:
                        # whether a variant is host-bound at this size (triton + fold was, at 1 x 1024)
                        for name in ("sdpa+fold", "triton+fold"):
                            replay = cuda_graph_replay(variants[name]) if name in variants else None
                            if replay is not None:
                                variants[f"{name}+graph"] = replay
                    res = common.compare(variants, device, repeats=args.repeats)
                # Useful work of the training form (P, W_k, W_v, W_q, W_o + causal attention);
                # the folded variants do less, so their TFLOP/s reads as "effective".
                flops = (2 * b * t * (d_a * d_b + 4 * d_b * d_b) + 0.5 * 4 * b * t * t * d_b)
                nbytes = es * (d_a * d_b + 4 * d_b * d_b + b * t * (d_a + 2 * d_b))
                for name, r in res.items():
                    rows.append({"phase": "prefill", "variant": name, "B": b, "T": t, "D_B": d_b,
                                 "D_A": d_a, "heads": n_heads, "ms": r["ms"], "p20_ms": r["p20_ms"],
                                 "p80_ms": r["p80_ms"], "tflops": flops / (r["ms"] / 1e3) / 1e12,
                                 "gbps": nbytes / (r["ms"] / 1e3) / 1e9,
                                 "speedup_vs_sdpa": res["sdpa"]["ms"] / r["ms"],
                                 "speedup_vs_ref": res["ref"]["ms"] / r["ms"]})
                print(f"prefill B={b} T={t} D_B={d_b}: " +
                      "  ".join(f"{n} {r['ms']:.3f}ms" for n, r in res.items()), flush=True)
    return rows


def cuda_graph_replay(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream); replay() runs the same
    kernels with no Python in between. None when fn cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph.replay
    except Exception as e:  # noqa: BLE001 - report and time the un-graphed variant only
        print(f"cuda graph capture failed: {type(e).__name__}: {e}", flush=True)
        return None


def bench_decode(args, device, dtype, backends, es):
    rows = []
    gen = torch.Generator().manual_seed(1)
    head_dim = args.head_dim
    for d_b in args.decode_widths:
        n_heads = d_b // head_dim
        d_a = d_b // 2 if args.d_a is None else args.d_a
        s = args.cache_rows
        wts = make_weights(d_a, d_b, dtype, device, gen)
        w_kv, b_kv = ref.fold_projection(wts["w_proj"], wts["b_proj"], wts["w_k"], wts["w_v"])
        for b in args.decode_batches:
            h_b = torch.randn(b, 1, d_b, generator=gen).to(device, dtype)
            h_a = torch.randn(b, 1, d_a, generator=gen).to(device, dtype)
            k_cache = torch.randn(b, n_heads, s, head_dim, generator=gen).to(device, dtype)
            v_cache = torch.randn(b, n_heads, s, head_dim, generator=gen).to(device, dtype)
            pos = s - 1

            def sdpa_step():
                kv = F.linear(h_a, w_kv, b_kv)
                k_cache[:, :, pos:pos + 1] = ref.split_heads(kv[..., :d_b], n_heads)
                v_cache[:, :, pos:pos + 1] = ref.split_heads(kv[..., d_b:], n_heads)
                q = ref.split_heads(F.linear(h_b, wts["w_q"]), n_heads)
                att = F.scaled_dot_product_attention(q, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1])
                return h_b + F.linear(ref.merge_heads(att), wts["w_o"])

            args_ = (h_b, h_a, wts["w_q"], w_kv, b_kv, wts["w_o"], k_cache, v_cache, pos, n_heads)
            variants = {"ref": lambda: ref.bridge_decode_step(*args_), "sdpa": sdpa_step}
            for be in backends:
                variants[be] = lambda be=be: ops.bridge_decode_step(*args_, backend=be)
            with torch.inference_mode():
                if device.type == "cuda":  # device time without Python's per-call cost
                    for name in ["sdpa", *backends]:
                        replay = cuda_graph_replay(variants[name])
                        if replay is not None:
                            variants[f"{name}+graph"] = replay
                res = common.compare(variants, device, repeats=args.repeats, min_sample_s=args.min_sample_s)
            nbytes = es * (2 * d_b * d_a + 2 * d_b * d_b + 2 * b * (pos + 1) * d_b + 2 * d_b)
            flops = 2 * b * (2 * d_b * d_a + 2 * d_b * d_b + 2 * (pos + 1) * d_b)
            for name, r in res.items():
                rows.append({"phase": "decode", "variant": name, "B": b, "D_B": d_b, "D_A": d_a,
                             "heads": n_heads, "cache_rows": s, "ms": r["ms"], "us": r["ms"] * 1e3,
                             "p20_ms": r["p20_ms"], "p80_ms": r["p80_ms"],
                             "gbps": nbytes / (r["ms"] / 1e3) / 1e9, "bytes": nbytes,
                             "tflops": flops / (r["ms"] / 1e3) / 1e12,
                             "speedup_vs_ref": res["ref"]["ms"] / r["ms"],
                             "speedup_vs_sdpa": res["sdpa"]["ms"] / r["ms"]})
            print(f"decode B={b} D_B={d_b} D_A={d_a} rows={s}: " +
                  "  ".join(f"{n} {r['ms'] * 1e3:.1f}us" for n, r in res.items()), flush=True)
    return rows


def bench_attention(args, device, dtype, backends):
    rows = []
    gen = torch.Generator().manual_seed(2)
    d = args.head_dim
    n_heads = args.attn_channels // d
    for t in args.attn_seqs:
        b = max(1, args.attn_tokens // t)
        q, k, v = (torch.randn(b, n_heads, t, d, generator=gen).to(device, dtype) for _ in range(3))
        variants = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def flash():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            variants = {"sdpa_flash": flash}
        for be in backends:
            variants[be] = lambda be=be: ops.cross_attention(q, k, v, "aligned", None, be)
        if "cuda" in backends:  # the WMMA kernel the mma.sync one replaced, side by side
            variants["cuda_wmma"] = lambda: _with_env("CALM_FAST_CUDA_ATTN", "wmma", ops.cross_attention,
                                                      q, k, v, "aligned", None, "cuda")
        with torch.inference_mode():
            res = common.compare(variants, device, repeats=args.repeats)
        flops = 0.5 * 4 * b * n_heads * t * t * d
        for name, r in res.items():
            rows.append({"phase": "attention", "variant": name, "B": b, "T": t, "heads": n_heads,
                         "d": d, "ms": r["ms"], "tflops": flops / (r["ms"] / 1e3) / 1e12})
        print(f"attention causal B={b} H={n_heads} T={t} d={d}: " +
              "  ".join(f"{n} {r['ms']:.3f}ms" for n, r in res.items()), flush=True)
    return rows


def _with_env(name: str, value: str, fn, *args):
    """fn(*args) with environment variable `name` set (read by the native kernels at each launch)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn(*args)
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


DTYPES = ("float32", "bfloat16", "float16")


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Every argument the run would trip over later (a traceback, an empty median after the
    ceilings, a backend silently left out of the report), as an argparse error (exit 2) before
    anything is built or timed. Runs on the arguments as given, before the defaults fill in."""
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        p.error(f"--device must be cpu or cuda (optionally cuda:N), got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda (optionally cuda:N), got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        p.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.dtype is not None and args.dtype not in DTYPES:
        p.error(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    for flag in ("repeats", "cache_rows", "d_a", "head_dim", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.backends is not None:
        dtype = getattr(torch, args.dtype) if args.dtype else (
            torch.bfloat16 if device.type == "cuda" else torch.float32)
        here = [b for b in ops.available_backends(device, dtype) if b != "reference"]
        names = args.backends.split(",")
        if not all(names):
            p.error(f"--backends must be a comma list of backend names, got {args.backends!r}")
        for name in names:
            if name not in ops.BACKENDS or name == "reference":
                p.error(f"--backends: unknown backend {name!r} (choose from "
                        f"{', '.join(b for b in ops.BACKENDS if b != 'reference')}; the reference is always "
                        f"timed, as 'ref')")
            if name not in here:
                p.error(f"--backends: {name!r} is not available for device {device} and dtype "
                        f"{str(dtype).split('.')[-1]} (available here: {', '.join(here) or 'none'})")


def check_head_dim(p: argparse.ArgumentParser, args, sections) -> None:
    """--head-dim must split every width the chosen sections run (known once the defaults are in)."""
    widths = []
    if "prefill" in sections and torch.device(args.device).type != "cuda":  # CUDA prefill: fixed heads
        widths += [(w, "prefill width") for w, _ in args.prefill_widths]
    if "decode" in sections:
        widths += [(w, "decode width") for w in args.decode_widths]
    if "attention" in sections:
        widths.append((args.attn_channels, "attention channel count"))
    for width, what in widths:
        if width % args.head_dim:
            p.error(f"--head-dim {args.head_dim} does not divide the {what} {width} (heads = width / head dim)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 "
                   "on CPU, bf16 on CUDA)")
    p.add_argument("--quick", action="store_true", help="fewer sizes (CI smoke)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--only", choices=["prefill", "decode", "attention"], action="append")
    p.add_argument("--backends", default=None, help="comma list (default: all available)")
    p.add_argument("--cache-rows", type=int, default=None)
    p.add_argument("--d-a", type=int, default=None, help="augment width (default D_B/2)")
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--out-dir", default=str(common.RESULTS))
    p.add_argument("--tag", default=None, help="file-name tag (default: the device name)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch and the C++ kernels)")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    es = torch.tensor([], dtype=dtype).element_size()
    backends = [b for b in ops.available_backends(device, dtype) if b != "reference"]
    if args.backends:
        backends = [b for b in args.backends.split(",") if b in backends]
    q = args.quick
    args.repeats = args.repeats or (5 if q else (15 if gpu else 9))
    args.min_sample_s = 2e-3 if gpu else 5e-3
    args.head_dim = args.head_dim or (128 if gpu else 64)
    args.cache_rows = args.cache_rows or (2048 if gpu else 1024)
    if gpu:
        args.prefill_widths = [(4096, 32)] if q else [(2048, 16), (4096, 32)]
        args.batches, args.seqs = [1, 4], ([1024, 4096] if q else [512, 1024, 2048, 4096])
        args.decode_widths, args.decode_batches = ([4096] if q else [1024, 2048, 4096]), [1, 4]
        args.attn_seqs, args.attn_tokens, args.attn_channels = ([2048, 8192] if q else [1024, 2048, 4096, 8192]), 16384, 4096
    else:
        args.prefill_widths = [(512, 8)] if q else [(512, 8), (1024, 16)]
        args.batches, args.seqs = [1], ([256] if q else [128, 256, 512])
        args.decode_widths, args.decode_batches = ([512, 2048] if q else [512, 1024, 2048]), [1] if q else [1, 4]
        args.attn_seqs, args.attn_tokens, args.attn_channels = ([512] if q else [256, 512, 1024]), 1024, 1024
    if not gpu:
        args.prefill_widths = [(w, w // args.head_dim) for w, _ in args.prefill_widths]
    sections = args.only or (["prefill", "decode", "attention"] if gpu else ["prefill", "decode", "attention"])
    check_head_dim(p, args, sections)
    print(f"device={device} dtype={dtype} backends={backends} threads={torch.get_num_threads()}", flush=True)
    ceil = common.ceilings(device, quick=q)
    print("ceilings:", {k: round(v, 1) for k, v in ceil.items()}, flush=True)
    rows = []
    if "prefill" in sections:
        rows += bench_prefill(args, device, dtype, backends, es)
    if "decode" in sections:
        rows += bench_decode(args, device, dtype, backends, es)
    if "attention" in sections:
        rows += bench_attention(args, device, dtype, backends)
    tag = args.tag or common.device_tag(device)
    out_dir = Path(args.out_dir)
    payload = {"bench": "bridge", "command": " ".join(["python", "bench/bench_bridge.py", *(argv or sys.argv[1:])]),
               "dtype": str(dtype), "backends": backends, "env": common.environment(device),
               "ceilings": ceil, "rows": rows}
    path = common.write_json(out_dir / f"bridge_{tag}.json", payload)
    panels = []
    for phase, x, y, title in (("prefill", "T", "ms", "bridge prefill (B={B}, D_B={D_B})"),
                               ("decode", "D_B", "us", "bridge decode step (B={B})"),
                               ("attention", "T", "tflops", "causal attention fwd, TFLOP/s")):
        sel = [r for r in rows if r["phase"] == phase]
        if not sel:
            continue
        first = sel[0]
        key = {k: first[k] for k in ("B", "D_B") if k in first and k != x}
        sel = [r for r in sel if all(r.get(k) == v for k, v in key.items())]
        series = {}
        for r in sel:
            xs, ys = series.setdefault(r["variant"], ([], []))
            xs.append(r[x])
            ys.append(r[y])
        panels.append({"title": title.format(**first), "xlabel": x, "ylabel": y, "series": series,
                       "logx": True, "logy": y != "tflops"})
    png = common.plot_panels(out_dir / f"bridge_{tag}.png", panels)
    cols = ["phase", "variant", "B", "T", "D_B", "ms", "tflops", "gbps", "speedup_vs_ref", "speedup_vs_sdpa"]
    print(common.table(rows, cols))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
