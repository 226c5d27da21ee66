"""Compile calm_fast's Triton attention kernels for an H100 (sm_90) on any machine, GPU or not.

Triton lowers a kernel to PTX without a device, and its bundled ptxas assembles the PTX for
sm_90a, so what the compiled kernels look like can be read before a GPU lease (and in CI):
registers, spill bytes, shared memory, and an op census of the PTX (wgmma = Hopper tensor
cores; cp.async = the K/V loop is software-pipelined). Timing still needs the GPU.

The compile is specialised as the JIT specialises a launch: int arguments equal to 1 become
constants, pointers and ints divisible by 16 get the divisibility hint (without it there is no
vectorised or asynchronous load at all). The values are those of a contiguous (B, H, T, d)
layout at the given T, H, d. This machine's triton may differ from the GPU machine's.

    PYTHONPATH=. .venv/bin/python bench/triton_sm90_compile.py                # the untuned defaults
    PYTHONPATH=. .venv/bin/python bench/triton_sm90_compile.py --all-configs  # every autotune candidate
    PYTHONPATH=. .venv/bin/python bench/triton_sm90_compile.py --kernel _attn_fwd --group 8
    PYTHONPATH=. .venv/bin/python bench/triton_sm90_compile.py --kernel _attn_fwd --tma   # K/V by TMA
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from calm_fast.ops import triton_xattn as tx  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")
OPS = ("wgmma.mma_async", "mma.sync", "cp.async.cg", "cp.async.bulk", "ld.global", "ex2.approx")
# cp.async.bulk counts cp.async.bulk.tensor too: the TMA copies of CALM_FAST_TRITON_TMA=1.
_POINTERS = {"Q", "K", "V", "KPM", "O", "LSE", "DO", "DELTA", "DQ", "DK", "DV"}
_FP32_PTRS = {"LSE", "DELTA"}
_UINT8_PTRS = {"KPM"}


def ptxas_path() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _int_args(seq: int, heads: int, head_dim: int, group: int) -> dict[str, int]:
    """Runtime int arguments of the attention kernels for contiguous (B, H, T, d) tensors."""
    vals = {"skpm": seq, "H": heads, "Tq": seq, "Tk": seq, "D": head_dim, "GROUP": group,
            "TQ_KEY": tx._bucket(seq), "TK_KEY": tx._bucket(seq)}
    for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):
        vals |= {f"s{t}b": heads * seq * head_dim, f"s{t}h": seq * head_dim,
                 f"s{t}m": head_dim, f"s{t}n": head_dim}
    return vals


def compile_sm90(name: str, causal: bool, has_kpm: bool, block_m: int, block_n: int,
                 num_warps: int, num_stages: int, seq: int = 8192, heads: int = 16,
                 head_dim: int = 128, group: int = 1, elt: str = "bf16", tma: bool = False,
                 split_p: bool = False):
    """The kernel `name` of ops/triton_xattn.py compiled for sm_90 (a triton CompiledKernel);
    tma: the forward's K/V loads through tensor descriptors (USE_TMA); split_p: the training
    forward's second P·V product and fp32 output (SPLIT_P)."""
    fn = getattr(tx, name)
    consts = dict(CAUSAL=causal, HAS_KPM=has_kpm, HEAD_DIM=tx._head_dim_tile(head_dim),
                  PAD_D=tx._head_dim_tile(head_dim) != head_dim,
                  PREC="ieee" if elt == "fp32" else "tf32", BLOCK_M=block_m, BLOCK_N=block_n)
    if "USE_TMA" in fn.arg_names:
        consts["USE_TMA"] = tma
    if "SPLIT_P" in fn.arg_names:
        consts["SPLIT_P"] = split_p
    consts["NAT"] = head_dim <= 2   # base e at head dims 1-2 (tx._score_scale)
    ints = _int_args(seq, heads, head_dim, group)
    sig, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in _POINTERS:
            fp32 = arg in _FP32_PTRS or (split_p and arg == "O")
            sig[arg] = "*fp32" if fp32 else "*u8" if arg in _UINT8_PTRS else f"*{elt}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in ("qk_scale", "sm_scale"):
            sig[arg] = "fp32"
        elif ints[arg] == 1:
            sig[arg] = "constexpr"
            consts[arg] = 1
        else:
            sig[arg] = "i32"
            if ints[arg] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})


def inspect_ptx(ptx: str) -> dict:
    """ptxas -v for sm_90a (registers, spill bytes) and the op census of the PTX."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([str(ptxas_path()), "-arch=sm_90a", "-v", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"ptxas failed: {r.stderr.strip()[-2000:]}")
    regs = re.search(r"Used (\d+) registers", r.stderr)
    spill = re.search(r"(\d+) bytes spill stores", r.stderr)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) if spill else 0,
            **{op: len(re.findall(re.escape(op), ptx)) for op in OPS}}


def report(name, causal, has_kpm, cfg, **kw) -> dict:
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    k = compile_sm90(name, causal, has_kpm, bm, bn, cfg.num_warps, cfg.num_stages, **kw)
    return {"kernel": name, "causal": causal, "kpm": has_kpm, "tma": kw.get("tma", False), "tile": f"{bm}x{bn}",
            "warps": cfg.num_warps, "stages": cfg.num_stages, "smem": k.metadata.shared,
            **inspect_ptx(k.asm["ptx"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=KERNELS, action="append", help="default: all three")
    ap.add_argument("--all-configs", action="store_true", help="every autotune candidate, not the default")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--group", type=int, default=1, help="CALM_FAST_TRITON_HEAD_GROUP the launch would use")
    ap.add_argument("--tma", action="store_true", help="the forward with CALM_FAST_TRITON_TMA=1 (other kernels unchanged)")
    ap.add_argument("--split-p", action="store_true",
                    help="the training forward (SPLIT_P: fp32 output, a second P·V product)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if not ptxas_path().is_file():
        print(f"no ptxas at {ptxas_path()}: this triton has no NVIDIA backend", file=sys.stderr)
        return 2
    elt = 4 if args.dtype == "fp32" else 2
    tile = tx._head_dim_tile(args.head_dim)
    print(f"triton {triton.__version__}, sm_90a, {args.dtype}, T={args.seq} H={args.heads} "
          f"d={args.head_dim} GROUP={args.group}" + (" TMA" if args.tma else "")
          + (" SPLIT_P" if args.split_p else ""))
    print(f"{'kernel':16s} {'mask':8s} {'kpm':4s} {'tile':8s} {'w':>2s} {'st':>2s} {'smem':>7s} {'regs':>4s} "
          f"{'spill':>5s} " + " ".join(f"{op:>15s}" for op in OPS))
    rows = []
    for name in args.kernel or KERNELS:
        cfgs = tx._candidates(name, tile, elt) if args.all_configs else [tx._default_config(name, tile, elt)]
        for causal in (True, False):
            for has_kpm in (False, True):
                for cfg in cfgs:
                    r = report(name, causal, has_kpm, cfg, seq=args.seq, heads=args.heads,
                               head_dim=args.head_dim, group=args.group, elt=args.dtype, tma=args.tma,
                               split_p=args.split_p and name == "_attn_fwd" and args.dtype != "fp32")
                    rows.append(r)
                    print(f"{name:16s} {'causal' if causal else 'context':8s} {str(has_kpm)[0]:4s} "
                          f"{r['tile']:8s} {r['warps']:2d} {r['stages']:2d} {r['smem']:7d} "
                          f"{r['registers']:4d} {r['spill_bytes']:5d} "
                          + " ".join(f"{r[op]:15d}" for op in OPS), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"triton": triton.__version__, "dtype": args.dtype,
                                         "head_dim": args.head_dim, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
