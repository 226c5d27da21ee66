"""The Triton attention kernels compiled for an H100 (sm_90) on this CPU-only machine:
bench/triton_sm90_compile.py lowers them with triton's own compiler and assembles them with its
bundled ptxas. The interpreter tests check what the kernels compute; these check what a GPU
would run: that they lower for Hopper at all, on its tensor cores (wgmma), with a pipelined
K/V loop (cp.async), inside the shared memory, without register spills. Run in a subprocess:
the interpreter, once on in this process, replaces the kernels the compiler needs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "triton_sm90_compile.py"
SMEM_LIMIT = 227 * 1024


def compile_rows(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    if r.returncode == 2 and "no ptxas" in r.stderr:
        pytest.skip(r.stderr.strip())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())["rows"]


def test_default_configs_compile_for_hopper_without_spills(tmp_path):
    # The untuned configs (CALM_FAST_TRITON_AUTOTUNE=0) at head dim 128, bf16: both masks, with
    # and without key padding. dk/dv's tile is the one the autotuner chose on an H100; it spills
    # 20-84 bytes here, which the bound below allows (the 4-warp tile it replaced spilled 2.2 KB).
    rows = compile_rows(tmp_path)
    assert len(rows) == 12
    for r in rows:
        what = f"{r['kernel']} causal={r['causal']} kpm={r['kpm']} {r['tile']} w{r['warps']}"
        assert r["wgmma.mma_async"] > 0, f"{what}: no Hopper tensor-core MMA"
        assert r["cp.async.cg"] > 0, f"{what}: the K/V loop is not pipelined"
        assert r["smem"] <= SMEM_LIMIT, f"{what}: {r['smem']} bytes of shared memory"
        limit = 128 if r["kernel"] == "_attn_bwd_dkdv" else 0
        assert r["spill_bytes"] <= limit, f"{what}: {r['spill_bytes']} bytes spilled"


def test_fp32_odd_head_dim_forward_compiles_for_hopper(tmp_path):
    # fp32 takes IEEE dot products and head dim 33 the padded-column path (PAD_D).
    rows = compile_rows(tmp_path, "--dtype", "fp32", "--head-dim", "33", "--kernel", "_attn_fwd")
    assert len(rows) == 4 and all(r["registers"] > 0 for r in rows)
    assert all(r["smem"] <= SMEM_LIMIT for r in rows)


def test_tma_forward_compiles_to_tensor_copies_for_hopper(tmp_path):
    # CALM_FAST_TRITON_TMA=1: K/V tiles by TMA (cp.async.bulk.tensor), none by per-thread
    # cp.async, still on wgmma, inside the shared memory, without spills (default tile).
    rows = compile_rows(tmp_path, "--kernel", "_attn_fwd", "--tma")
    assert len(rows) == 4
    for r in rows:
        what = f"TMA forward causal={r['causal']} kpm={r['kpm']} {r['tile']} w{r['warps']}"
        assert r["tma"] and r["cp.async.bulk"] > 0 and r["cp.async.cg"] == 0, what
        assert r["wgmma.mma_async"] > 0, f"{what}: no Hopper tensor-core MMA"
        assert r["smem"] <= SMEM_LIMIT and r["spill_bytes"] == 0, what
