"""Triton backend of the bridge: flash cross-attention (forward + backward) and the fused decode step.

Backend contract (see ops/__init__.py): supports(), cross_attention(), bridge_decode_step(), with
exactly the semantics of ops/reference.py.

Layout and numerics
  q (B, H, Tq, d), k/v (B, H, Tk, d): any strides as long as the head dim is contiguous.
  Scores, softmax statistics and accumulators are fp32. fp32 inputs use IEEE dot products
  (input_precision="ieee"), not TF32, so the fp32 path meets the library's 1e-5 parity rule on
  GPU too; bf16/fp16 are the fast path. The log-sum-exp is kept in base 2 (exp2 is one MUFU op),
  except at head dims 1 and 2 (NAT): there log2(e)/sqrt(d) > 1, and a finite score near FLT_MAX
  scaled into base 2 would overflow, so those kernels scale by 1/sqrt(d) and use base e.
  Head dims that are not powers of two (80, 96, ...) run in the next power-of-two tile with the
  extra columns masked.
  Rows that see no key output 0 and get zero gradient: their LSE is stored as +inf, so every
  recomputed probability of such a row is exp2(s - inf) = 0 in the backward pass.

Settings (environment, read at each call)
  CALM_FAST_TRITON_AUTOTUNE=0: one fixed tile per kernel instead of autotuning (tests).
  CALM_FAST_TRITON_HEAD_GROUP=1 | auto | N: the order in which attention programs run, heads
  taken N at a time, heaviest causal blocks first (_program_order); 1, the default, is each
  head's blocks in turn.
  CALM_FAST_TRITON_TMA=1: the forward reads K/V tiles with Hopper's TMA (_tma_ok); off by
  default until timed.

Interpreter
  TRITON_INTERPRET is read by triton.jit when a kernel is *decorated*, for triton's own library
  functions (tl.zeros, tl.sum, ...) as much as for ours, so whether Triton runs interpreted is
  fixed for the whole process when triton.language is imported. This module follows that mode:
  interpreted kernels (CPU tensors, tests) run small fixed tiles; compiled kernels run autotuned
  Hopper-sized tiles. supports() says True on CPU only when the kernels really are interpreted.
"""
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# The package's own checks: ops/__init__.py defines them before it loads this module.
from . import _attn_out_dtype, _check_caches_writable, _check_decode_inputs, _unrounded_out_wanted
from .reference import MASKS

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreter_active() -> bool:
    """Whether this process's Triton (and so every kernel here) runs in the interpreter."""
    return not isinstance(_load_rows, JITFunction)


def supports(device, dtype) -> bool:
    device = torch.device(device)
    if dtype not in _DTYPES:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available() and not _interpreter_active()
    return (device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
            and _interpreter_active())


# --------------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, D, CHECK_ROWS: tl.constexpr, PAD_D: tl.constexpr):
    """Load a (rows, HEAD_DIM) tile; masks only what can be out of range (masks cost issue slots)."""
    if CHECK_ROWS:
        if PAD_D:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if PAD_D:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_kept_rows(ptrs, rows, n_rows, keep, offs_d, D, PAD_D: tl.constexpr):
    """_load_rows for key tiles under a key padding mask: padded rows load as 0. No query sees
    a padded key, but a dot product still multiplies its 0 weight by its value, and 0 * inf/NaN
    is NaN in every row."""
    ok = (rows < n_rows) & keep
    if PAD_D:
        x = tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    else:
        x = tl.load(ptrs, mask=ok[:, None], other=0.0)
    return x


@triton.jit
def _key_blocks(m0, Tk, causal_off, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key range of the query block starting at row m0: [0, full_end) needs no mask,
    [full_end, hi) is masked. Under the causal mask, key blocks at or below every row's
    diagonal need no mask and keys past the last row's diagonal are skipped outright (the
    saving over a dense mask)."""
    if CAUSAL:
        full_end = ((m0 + causal_off + 1) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(Tk, m0 + BLOCK_M + causal_off)
    else:
        full_end = (Tk // BLOCK_N) * BLOCK_N
        hi = Tk
    return full_end, hi


@triton.jit
def _program_order(pid, n_blk, GROUP):
    """Program `pid` of a 1-D grid of n_blk blocks times the batch's heads -> (rank, bh).

    Heads are taken GROUP at a time; inside a group the rank varies slowest, so the grid runs
    rank 0 of each of the group's heads, then rank 1, ... Kernels map rank 0 to their heaviest
    block under the causal mask: with GROUP > 1 the heavy blocks of every head in the group
    start early and the grid's last wave holds only light ones (with GROUP = 1 the last head's
    heaviest block starts near the end and the other SMs idle while it runs). GROUP = 1 is
    the plain per-head order. A 1-D grid also lifts the 65535 limit on heads x batch."""
    n_bh = tl.num_programs(0) // n_blk
    per_group = GROUP * n_blk
    g = pid // per_group
    g0 = g * GROUP
    size = tl.minimum(GROUP, n_bh - g0)
    r = pid - g * per_group
    return r // size, g0 + r % size


@triton.jit
def _exp(x, NAT: tl.constexpr):
    """e^x (NAT) or 2^x: the kernels' exponential in the base their scores are scaled for."""
    if NAT:
        return tl.exp(x)
    else:
        return tl.math.exp2(x)


@triton.jit
def _log(x, NAT: tl.constexpr):
    if NAT:
        return tl.log(x)
    else:
        return tl.math.log2(x)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, seen, q, k_src, v_src, kpm_base, offs_m, offs_n0, offs_d, lo, hi,
                    skn, svn, Tk, D, causal_off, qk_scale,
                    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                    PAD_D: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                    USE_TMA: tl.constexpr, SPLIT_P: tl.constexpr, NAT: tl.constexpr):
    # k_src / v_src: the head's K and V as row pointers, or (USE_TMA) as tensor descriptors
    # (Hopper's TMA copies a tile; rows past Tk and columns past D arrive as zeros).
    # Scores are scaled in fp32 (qk_scale = sm_scale*log2(e): exp2 domain). The row max on raw
    # scores (exp2 argument one FMA) was tried and dropped: on an H100 it gave 432 / 460 TFLOP/s
    # (causal / context, T = 8192) where this form gave 439 / 490 (bench/RESULTS.md).
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        if USE_TMA:
            k = k_src.load([start_n, 0])
        else:
            k = _load_rows(k_src + offs_n[:, None] * skn + offs_d[None, :], offs_n, Tk, offs_d, D,
                           MASKED, PAD_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASKED:
            allowed = offs_n[None, :] < Tk
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            s = tl.where(allowed, s, float("-inf"))
        if HAS_KPM:
            keep = tl.load(kpm_base + offs_n, mask=offs_n < Tk, other=0) != 0
            s = tl.where(keep[None, :], s, float("-inf"))
            if MASKED:
                seen = seen | (tl.max((allowed & keep[None, :]).to(tl.int32), 1) > 0)
            else:  # every row sees the whole block: one reduction over the keys
                seen = seen | (tl.max(keep.to(tl.int32), 0) > 0)
        # m_i starts at -FLT_MAX (finite, below every finite score), so a fully masked tile
        # gives p = 0, alpha = 1, no NaN, and rows whose scores are all tiny still normalise.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = _exp(s - m_new[:, None], NAT)
        alpha = _exp(m_i - m_new, NAT)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = v_src.load([start_n, 0])
            if HAS_KPM:  # padded rows as 0, as _load_kept_rows gives them
                v = tl.where(keep[:, None], v, 0.0)
        elif HAS_KPM:
            v = _load_kept_rows(v_src + offs_n[:, None] * svn + offs_d[None, :], offs_n, Tk, keep,
                                offs_d, D, PAD_D)
        else:
            v = _load_rows(v_src + offs_n[:, None] * svn + offs_d[None, :], offs_n, Tk, offs_d, D,
                           MASKED, PAD_D)
        acc = acc * alpha[:, None]
        p16 = p.to(v.dtype)
        acc = tl.dot(p16, v, acc, input_precision=PREC)
        if SPLIT_P:  # p's rounding error as a second 16-bit operand: the output to ~16 bits,
            # so a training backward's delta = dout·out agrees with the P it recomputes in fp32.
            # Non-finite values are left to the first product (which gives the reference's
            # inf/NaN): here 0 * inf or +inf - inf would turn an inf output into NaN.
            v_fin = tl.where(tl.abs(v) < float("inf"), v, 0.0)
            acc = tl.dot((p - p16.to(tl.float32)).to(v.dtype), v_fin, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i, seen


@triton.jit
def _attn_fwd(Q, K, V, KPM, O, LSE,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, skpm,
              H, Tq, Tk, D, qk_scale, GROUP, TQ_KEY, TK_KEY,
              CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr,
              PAD_D: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr,
              SPLIT_P: tl.constexpr, NAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_m = tl.cdiv(Tq, BLOCK_M)
    pid_m, pid_bh = _program_order(tl.program_id(0), n_m, GROUP)
    if CAUSAL:   # heaviest query blocks first (they see the most keys): a shorter tail wave
        pid_m = n_m - 1 - pid_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = _load_rows(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], offs_m, Tq,
                   offs_d, D, True, PAD_D)
    k_src = K + b * skb + h * skh
    v_src = V + b * svb + h * svh
    if USE_TMA:  # the host checked the alignment TMA needs (_tma_ok)
        k_src = tl.make_tensor_descriptor(k_src, shape=[Tk, D], strides=[skn, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
        v_src = tl.make_tensor_descriptor(v_src, shape=[Tk, D], strides=[svn, 1],
                                          block_shape=[BLOCK_N, HEAD_DIM])
    kpm_base = KPM + b * skpm

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 3.4028234663852886e38   # -FLT_MAX
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    causal_off = Tk - Tq
    # seen: the mask leaves the row at least one key (without padding, known from its index;
    # with padding, found while streaming the key blocks).
    if HAS_KPM:
        seen = offs_m < 0
    elif CAUSAL:
        seen = (offs_m + causal_off >= 0) & (Tk > 0)
    else:
        seen = (offs_m >= 0) & (Tk > 0)
    full_end, hi = _key_blocks(m0, Tk, causal_off, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i, seen = _attn_fwd_inner(acc, l_i, m_i, seen, q, k_src, v_src, kpm_base, offs_m,
                                          offs_n0, offs_d, 0, full_end, skn, svn, Tk, D, causal_off,
                                          qk_scale, False, CAUSAL, HAS_KPM, PAD_D, PREC, BLOCK_N, USE_TMA,
                                          SPLIT_P, NAT)
    acc, l_i, m_i, seen = _attn_fwd_inner(acc, l_i, m_i, seen, q, k_src, v_src, kpm_base, offs_m,
                                          offs_n0, offs_d, full_end, hi, skn, svn, Tk, D, causal_off,
                                          qk_scale, True, CAUSAL, HAS_KPM, PAD_D, PREC, BLOCK_N, USE_TMA,
                                          SPLIT_P, NAT)

    # l == 0: no key left by the mask (output 0, lse +inf: the backward's p is 0), or every
    # allowed score -inf from an infinite q or k (NaN, as softmax gives; lse NaN).
    empty = l_i == 0.0
    poisoned = empty & seen
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(poisoned[:, None], float("nan"), acc / l_safe[:, None])
    lse = tl.where(empty, tl.where(poisoned, float("nan"), float("inf")), m_i + _log(l_safe, NAT))
    row_ok = offs_m < Tq
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :]
    if PAD_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * Tq + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# backward (FA2): delta = rowsum(dO * O); dk/dv over key blocks; dq over query blocks
# --------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, soh, som, sdob, sdoh, sdom, H, Tq, D,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_bh = tl.program_id(0)   # grid axis 0 has no 65535 limit: batch x heads may exceed it
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    msk = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=msk,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_m0,
                         offs_d, lo, hi, sqm, sdom, Tq, D, causal_off, qk_scale,
                         MASKED: tl.constexpr, PAD_D: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, NAT: tl.constexpr):
    # Works on transposed tiles (keys x queries) so no accumulator needs a transpose.
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        q = _load_rows(q_base + offs_m[:, None] * sqm + offs_d[None, :], offs_m, Tq, offs_d, D,
                       True, PAD_D)
        # Rows past Tq load lse = +inf, so their probabilities are exactly 0.
        lse = tl.load(lse_base + offs_m, mask=offs_m < Tq, other=float("inf"))
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC)
        p_t = _exp(s_t * qk_scale - lse[None, :], NAT)
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, p_t, 0.0)
        do = _load_rows(do_base + offs_m[:, None] * sdom + offs_d[None, :], offs_m, Tq, offs_d, D,
                        True, PAD_D)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        delta = tl.load(delta_base + offs_m, mask=offs_m < Tq, other=0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, KPM, LSE, DELTA, DK, DV,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, skpm,
                   H, Tq, Tk, D, qk_scale, sm_scale, GROUP, TQ_KEY, TK_KEY,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PAD_D: tl.constexpr, PREC: tl.constexpr, NAT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Rank order = key block order: under the causal mask key block 0 sees the most queries.
    pid_n, pid_bh = _program_order(tl.program_id(0), tl.cdiv(Tk, BLOCK_N), GROUP)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)

    k = _load_rows(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], offs_n, Tk,
                   offs_d, D, True, PAD_D)
    v = _load_rows(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], offs_n, Tk,
                   offs_d, D, True, PAD_D)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    lse_base = LSE + pid_bh.to(tl.int64) * Tq
    delta_base = DELTA + pid_bh.to(tl.int64) * Tq

    causal_off = Tk - Tq
    if CAUSAL:
        # Query i sees key j iff i >= j - off: rows below n0 - off see none of this block,
        # rows at or past n0 + BLOCK_N - 1 - off see all of it.
        m_lo = (tl.maximum(n0 - causal_off, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                      offs_n, offs_m0, offs_d, m_lo, tl.minimum(m_full, Tq),
                                      sqm, sdom, Tq, D, causal_off, qk_scale, True, PAD_D, PREC, BLOCK_M,
                                      NAT)
    else:
        m_full = 0
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                  offs_n, offs_m0, offs_d, m_full, Tq, sqm, sdom, Tq, D, causal_off,
                                  qk_scale, False, PAD_D, PREC, BLOCK_M, NAT)
    dk = dk * sm_scale
    if HAS_KPM:
        # A padded key gets no probability from any row, hence no gradient at all.
        keep = tl.load(KPM + b * skpm + offs_n, mask=offs_n < Tk, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    msk = offs_n[:, None] < Tk
    if PAD_D:
        msk = msk & (offs_d[None, :] < D)
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=msk)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=msk)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, offs_m, offs_n0, offs_d,
                       lo, hi, skn, svn, Tk, D, causal_off, qk_scale,
                       MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                       PAD_D: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
                       NAT: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        k_ptrs = k_base + offs_n[:, None] * skn + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * svn + offs_d[None, :]
        if HAS_KPM:  # padded keys load as 0 (see _load_kept_rows): dp and ds * k stay finite
            keep = tl.load(kpm_base + offs_n, mask=offs_n < Tk, other=0) != 0
            k = _load_kept_rows(k_ptrs, offs_n, Tk, keep, offs_d, D, PAD_D)
            v = _load_kept_rows(v_ptrs, offs_n, Tk, keep, offs_d, D, PAD_D)
        else:
            k = _load_rows(k_ptrs, offs_n, Tk, offs_d, D, MASKED, PAD_D)
            v = _load_rows(v_ptrs, offs_n, Tk, offs_d, D, MASKED, PAD_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = _exp(s * qk_scale - lse[:, None], NAT)
        if MASKED:
            allowed = offs_n[None, :] < Tk
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + causal_off)
            p = tl.where(allowed, p, 0.0)
        if HAS_KPM:
            p = tl.where(keep[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, KPM, LSE, DELTA, DQ,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                 sdqb, sdqh, sdqm, skpm,
                 H, Tq, Tk, D, qk_scale, sm_scale, GROUP, TQ_KEY, TK_KEY,
                 CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr,
                 PAD_D: tl.constexpr, PREC: tl.constexpr, NAT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    n_m = tl.cdiv(Tq, BLOCK_M)
    pid_m, pid_bh = _program_order(tl.program_id(0), n_m, GROUP)
    if CAUSAL:   # heaviest query blocks first, as in the forward
        pid_m = n_m - 1 - pid_m
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q = _load_rows(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], offs_m, Tq,
                   offs_d, D, True, PAD_D)
    do = _load_rows(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], offs_m,
                    Tq, offs_d, D, True, PAD_D)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    kpm_base = KPM + b * skpm

    causal_off = Tk - Tq
    full_end, hi = _key_blocks(m0, Tk, causal_off, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, offs_m,
                            offs_n0, offs_d, 0, full_end, skn, svn, Tk, D, causal_off, qk_scale,
                            False, CAUSAL, HAS_KPM, PAD_D, PREC, BLOCK_N, NAT)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, offs_m,
                            offs_n0, offs_d, full_end, hi, skn, svn, Tk, D, causal_off, qk_scale,
                            True, CAUSAL, HAS_KPM, PAD_D, PREC, BLOCK_N, NAT)
    dq = dq * sm_scale
    msk = offs_m[:, None] < Tq
    if PAD_D:
        msk = msk & (offs_d[None, :] < D)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=msk)


# --------------------------------------------------------------------------------------------
# decode step: (1) q GEMV + K/V row into the caches, (2) split-K attention, (3) combine + W_o + residual
# --------------------------------------------------------------------------------------------
@triton.jit
def _gemv_tile(X, sx, W, sw, rows, n_rows, offs_o, n_out, K,
               BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_B, BLOCK_O) fp32 tile of X[rows] @ W[offs_o]^T; W row-major (out, in)."""
    acc = tl.zeros([BLOCK_B, BLOCK_O], dtype=tl.float32)
    offs_k0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        k_ok = offs_k[None, :] < K
        x = tl.load(X + rows[:, None].to(tl.int64) * sx + offs_k[None, :],
                    mask=(rows[:, None] < n_rows) & k_ok, other=0.0).to(tl.float32)
        w = tl.load(W + offs_o[:, None].to(tl.int64) * sw + offs_k[None, :],
                    mask=(offs_o[:, None] < n_out) & k_ok, other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], 2)
    return acc


@triton.jit
def _decode_proj(HB, HA, WQ, WKV, BKV, QOUT, KC, VC,
                 B, D_B, D_A, pos, hd, s_hb, s_ha, s_wq, s_wkv,
                 skc_b, skc_h, skc_s, svc_b, svc_h, svc_s,
                 HAS_KV: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    # One launch for both GEMVs: the first tiles compute q = h_b W_q^T, the rest [K|V] of h_a.
    pid = tl.program_id(0)
    n_q_tiles = tl.cdiv(D_B, BLOCK_O)
    offs_b0 = tl.arange(0, BLOCK_B)
    if pid < n_q_tiles:
        offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + offs_b0
            acc = _gemv_tile(HB, s_hb, WQ, s_wq, rows, B, offs_o, D_B, D_B,
                             BLOCK_B, BLOCK_O, BLOCK_K)
            # q is rounded to the activation dtype, as the reference's linear() does.
            tl.store(QOUT + rows[:, None] * D_B + offs_o[None, :], acc.to(QOUT.dtype.element_ty),
                     mask=(rows[:, None] < B) & (offs_o[None, :] < D_B))
    else:
        if HAS_KV:
            offs_o = (pid - n_q_tiles) * BLOCK_O + tl.arange(0, BLOCK_O)   # in [0, 2 D_B)
            o_ok = offs_o < 2 * D_B
            is_k = offs_o < D_B
            feat = tl.where(is_k, offs_o, offs_o - D_B)
            head = (feat // hd).to(tl.int64)
            col = feat % hd
            for b0 in range(0, B, BLOCK_B):
                rows = b0 + offs_b0
                acc = _gemv_tile(HA, s_ha, WKV, s_wkv, rows, B, offs_o, 2 * D_B, D_A,
                                 BLOCK_B, BLOCK_O, BLOCK_K)
                acc += tl.load(BKV + offs_o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
                r64 = rows[:, None].to(tl.int64)
                ok = (rows[:, None] < B) & o_ok[None, :]
                k_ptrs = KC + r64 * skc_b + head[None, :] * skc_h + pos * skc_s + col[None, :]
                v_ptrs = VC + r64 * svc_b + head[None, :] * svc_h + pos * svc_s + col[None, :]
                tl.store(k_ptrs, acc.to(KC.dtype.element_ty), mask=ok & is_k[None, :])
                tl.store(v_ptrs, acc.to(VC.dtype.element_ty), mask=ok & (~is_k)[None, :])


@triton.jit
def _decode_attn(QB, KC, VC, KPM, PM, PL, PACC,
                 n, H, hd, D_B, qk_scale, chunk,
                 skc_b, skc_h, skc_s, svc_b, svc_h, svc_s, skpm, NS,
                 HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 NAT: tl.constexpr):
    # Flash-decoding: program (b*H + h, split) attends over cache rows [split*chunk, ...) ∩ [0, n)
    # and writes unnormalised partials (max, sum, acc) for the combine in _decode_out.
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < hd
    q = tl.load(QB + b * D_B + h * hd + offs_d, mask=d_ok, other=0.0).to(tl.float32) * qk_scale
    k_base = KC + b * skc_b + h * skc_h
    v_base = VC + b * svc_b + h * svc_h
    m_i = tl.max(tl.zeros([BLOCK_N], dtype=tl.float32), 0) - 3.4028234663852886e38   # -FLT_MAX
    l_i = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), 0)
    seen = tl.max(tl.zeros([BLOCK_N], dtype=tl.int32), 0) > 0  # the mask kept some key here
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    start = pid_s * chunk
    end = tl.minimum(start + chunk, n)
    for s0 in range(start, end, BLOCK_N):
        offs_n = s0 + tl.arange(0, BLOCK_N)
        ok = offs_n < end
        if HAS_KPM:
            ok = ok & (tl.load(KPM + b * skpm + offs_n, mask=ok, other=0) != 0)
        msk = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * skc_s + offs_d[None, :], mask=msk, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)
        s = tl.where(ok, s, float("-inf"))
        seen = seen | (tl.max(ok.to(tl.int32), 0) > 0)
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = _exp(s - m_new, NAT)
        alpha = _exp(m_i - m_new, NAT)
        v = tl.load(v_base + offs_n[:, None] * svc_s + offs_d[None, :], mask=msk, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new
    # Kept keys whose scores were all -inf (an infinite q or k): the sum stays 0; mark the
    # partial NaN so the combine gives NaN, as softmax does, not an empty (zero) head.
    l_i = tl.where(seen & (l_i == 0.0), float("nan"), l_i)
    slot = pid_bh.to(tl.int64) * NS + pid_s
    tl.store(PM + slot, m_i)
    tl.store(PL + slot, l_i)
    tl.store(PACC + slot * HEAD_DIM + offs_d, acc)


@triton.jit
def _decode_out(HB, WO, PM, PL, PACC, OUT, B, D_B, H, hd, s_hb, s_wo, s_out, NS,
                NS_P: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, NAT: tl.constexpr):
    # Each program owns BLOCK_O output features; it re-combines the (tiny, L2-resident) split
    # partials of every head rather than paying a 4th launch, then streams its W_o rows once.
    pid = tl.program_id(0)
    offs_o = pid * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = offs_o < D_B
    offs_s = tl.arange(0, NS_P)
    s_ok = offs_s < NS
    offs_d = tl.arange(0, HEAD_DIM)
    d_ok = offs_d < hd
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        r_ok = rows < B
        acc = tl.zeros([BLOCK_B, BLOCK_O], dtype=tl.float32)
        for hh in range(0, H):
            slot = (rows.to(tl.int64) * H + hh) * NS
            ps = slot[:, None] + offs_s[None, :]
            ms = r_ok[:, None] & s_ok[None, :]
            m = tl.load(PM + ps, mask=ms, other=-3.4028234663852886e38)
            l = tl.load(PL + ps, mask=ms, other=0.0)
            m_max = tl.max(m, 1)
            w = _exp(m - m_max[:, None], NAT)
            l_sum = tl.sum(l * w, 1)
            a = tl.load(PACC + ps[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                        mask=ms[:, :, None] & d_ok[None, None, :], other=0.0)
            attn = tl.sum(a * w[:, :, None], 1) / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
            attn = tl.where((l_sum != l_sum)[:, None], float("nan"), attn)  # a poisoned split
            # The reference hands W_o the attention rounded to the activation dtype.
            attn = attn.to(HB.dtype.element_ty).to(tl.float32)
            wt = tl.load(WO + offs_o[:, None].to(tl.int64) * s_wo + hh * hd + offs_d[None, :],
                         mask=o_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(attn[:, None, :] * wt[None, :, :], 2)
        om = r_ok[:, None] & o_ok[None, :]
        hb = tl.load(HB + rows[:, None].to(tl.int64) * s_hb + offs_o[None, :], mask=om, other=0.0)
        y = acc.to(HB.dtype.element_ty).to(tl.float32) + hb.to(tl.float32)
        tl.store(OUT + rows[:, None].to(tl.int64) * s_out + offs_o[None, :],
                 y.to(OUT.dtype.element_ty), mask=om)


# --------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------
_SMEM_BYTES = 227 * 1024   # Hopper's per-block opt-in limit; bigger tiles cannot launch anyway


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Candidates for 16-bit inputs on Hopper. fp32 uses IEEE dot products (FMA, no tensor cores):
# large tiles spill and take minutes to compile, so fp32 gets its own small set.
# Kept short on purpose: every candidate is one more compile the first time a shape is seen.
_CONFIGS = {
    "_attn_fwd": [_cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3),
                  _cfg(128, 128, 8, 2), _cfg(128, 64, 8, 4), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2)],
    "_attn_bwd_dkdv": [_cfg(32, 128, 4, 3), _cfg(64, 128, 8, 3), _cfg(32, 128, 8, 2),
                       _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 2)],
    "_attn_bwd_dq": [_cfg(128, 32, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 2),
                     _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2)],
}
# The last entry of each pool is the smallest: the fallback when nothing else fits (head dim 256).
_FP32_CONFIGS = {"_attn_fwd": [_cfg(32, 32, 4, 2), _cfg(64, 32, 4, 2)],
                 "_attn_bwd_dkdv": [_cfg(32, 32, 4, 2), _cfg(32, 64, 4, 2)],
                 "_attn_bwd_dq": [_cfg(32, 32, 4, 2), _cfg(64, 32, 4, 2)]}
# Retune per power-of-two length bucket, not per exact length.
_KEYS = ["TQ_KEY", "TK_KEY", "HEAD_DIM", "CAUSAL", "HAS_KPM", "PREC"]
# Under the interpreter: small, deliberately unequal tiles so tests cross every block boundary.
_INTERP_BLOCKS = {"_attn_fwd": (32, 16), "_attn_bwd_dkdv": (16, 32), "_attn_bwd_dq": (32, 16)}


def _smem_ok(name: str, c: triton.Config, head_dim: int, elt: int) -> bool:
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    # Resident tiles: fwd q; dq q and dO; dk/dv k and v. Streamed per stage: K/V or Q/dO tiles.
    resident, streamed = {"_attn_fwd": (bm, 2 * bn), "_attn_bwd_dq": (2 * bm, 2 * bn),
                          "_attn_bwd_dkdv": (2 * bn, 2 * bm)}[name]
    return (resident + c.num_stages * streamed) * head_dim * elt <= _SMEM_BYTES


def _candidates(name: str, head_dim: int, elt: int) -> list:
    pool = _FP32_CONFIGS[name] if elt == 4 else _CONFIGS[name]
    return [c for c in pool if _smem_ok(name, c, head_dim, elt)] or pool[-1:]


def _pruner(name: str):
    def prune(configs, named_args, **kwargs):
        cands = _candidates(name, kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM")),
                            named_args["Q"].element_size())
        if kwargs.get("USE_TMA"):
            # The TMA forward is tuned over the 8-warp 128-row tiles only (what the H100 picked
            # without TMA; the 4-warp one spills for sm_90): four compiles per shape, not seven.
            return [c for c in cands if c.kwargs["BLOCK_M"] == 128 and c.num_warps == 8] or cands
        if kwargs.get("SPLIT_P"):
            # The training forward (tuned on its own: its output is fp32) skips the 4-warp
            # 128-row tile, which spills 0.4-2 KB with the second P·V product on sm_90.
            return [c for c in cands if not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4)] or cands
        return cands
    return prune


def _default_config(name: str, head_dim: int, elt: int) -> triton.Config:
    """One sensible config without tuning (CALM_FAST_TRITON_AUTOTUNE=0, used by the tests)."""
    cands = _candidates(name, head_dim, elt)
    if head_dim >= 256:   # accumulators of 256 columns: the smallest tile, or registers spill
        return cands[-1]
    if elt == 4 or head_dim <= 64:
        return cands[0]
    # Head dim 128: 8 warps halve the per-thread accumulators. In the backward pools the first
    # 8-warp candidate is what the autotuner chose on an H100 at T = 4096 and 8192 (lease 3,
    # bench/RESULTS.md); compiled for sm_90 the 4-warp firsts spill (dk/dv 1.4-2.2 KB, dq
    # ~0.2 KB: bench/triton_sm90_compile.py).
    return next((c for c in cands if c.num_warps == 8), cands[0])


# SPLIT_P (the training forward) is not in the key, but Triton's autotuner keys on every tensor
# argument's dtype too, and the training forward's output is fp32: it is tuned on its own.
_TUNED = {name: triton.autotune(pool, key=_KEYS + (["USE_TMA"] if name == "_attn_fwd" else []),
                                prune_configs_by={"early_config_prune": _pruner(name)})(
    globals()[name]) for name, pool in _CONFIGS.items()}


def _autotune_enabled() -> bool:
    return os.environ.get("CALM_FAST_TRITON_AUTOTUNE", "1") != "0"


def _launch_tuned(name: str, device: torch.device, grid_fn, *args, **constexprs) -> None:
    if _interpreter_active():
        bm, bn = _INTERP_BLOCKS[name]
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        globals()[name][grid_fn(meta)](*args, **constexprs, **meta)
    elif _autotune_enabled():
        _TUNED[name][grid_fn](*args, **constexprs)
    else:
        c = _default_config(name, constexprs["HEAD_DIM"], args[0].element_size())
        globals()[name][grid_fn(c.kwargs)](*args, **constexprs, **c.kwargs,
                                           num_warps=c.num_warps, num_stages=c.num_stages)


def _launch(name: str, device: torch.device, grid, *args, num_warps: int = 4, **constexprs) -> None:
    globals()[name][grid](*args, **constexprs, num_warps=num_warps)


def auto_head_group(n_blk: int, n_bh: int, n_sm: int) -> int:
    """Heads per group for the causal kernels (bench/model_program_order.py models the choice).

    A group of G heads is ~G * n_blk^2 / 2 block steps, its heaviest block n_blk of them:
    G >= 2 * SMs / n_blk keeps every SM busy for longer than that block takes (twice that, for
    margin); G heads' K/V then stay near 35 MB, within an H100's L2. The heads are then split
    into groups of near-equal size: a last group of one head would bring the tail back."""
    want = max(1, min(n_bh, math.ceil(4 * n_sm / max(n_blk, 1))))
    return math.ceil(n_bh / math.ceil(n_bh / want))


def _head_group(causal: bool, n_blk: int, n_bh: int, device: torch.device) -> int:
    """Heads per group in the programs' order (_program_order). CALM_FAST_TRITON_HEAD_GROUP:
    "1" (default: each head's blocks in turn), "auto" (causal only: enough heads per group that
    a group's work per SM exceeds its heaviest block, so no SM is left with a heavy block at the
    end; not yet timed on a GPU, bench_attention.py compares both) or a positive integer."""
    how = os.environ.get("CALM_FAST_TRITON_HEAD_GROUP", "1").strip()
    if how == "auto":
        if not causal or _interpreter_active():
            return 1
        return auto_head_group(n_blk, n_bh, _sm_count(device))
    try:
        group = int(how)
    except ValueError:
        group = 0
    if group < 1:
        raise ValueError(f"CALM_FAST_TRITON_HEAD_GROUP must be 'auto' or a positive integer, not {how!r}")
    # Never more than the heads there are: the kernel's GROUP * blocks then stays within the grid
    # size (int32), whatever the setting.
    return min(group, max(n_bh, 1))


def _tma_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    """CALM_FAST_TRITON_TMA=1 and K/V laid out as TMA needs: the forward then reads its K/V tiles
    through tensor descriptors (Hopper's tensor memory accelerator) instead of per-thread
    cp.async, which frees the registers and issue slots of the address arithmetic. Opt-in until
    timed on an H100 (bench_attention.py's "triton_tma" rows). TMA wants 16-byte aligned row
    starts and strides, and a Hopper GPU (or the interpreter). 16-bit inputs only on the GPU:
    fp32 tiles through TMA spill ~600 B for sm_90 where the pointer path spills none
    (bench/triton_sm90_compile.py --dtype fp32 --head-dim 64 [--tma]); the interpreter takes
    fp32, so that the CPU tests run this path (it computes bf16 wrongly)."""
    if os.environ.get("CALM_FAST_TRITON_TMA", "0").strip() != "1":
        return False
    if not _interpreter_active() and (k.element_size() != 2
                                      or torch.cuda.get_device_capability(k.device)[0] < 9):
        return False
    for t in (k, v):
        elt = t.element_size()
        if t.data_ptr() % 16 or any(st * elt % 16 for st in t.stride()[:3]) or t.shape[3] * elt % 16:
            return False
    _set_tma_allocator()
    return True


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors a kernel builds on the device (triton's allocator hook)."""
    device = "cpu" if _interpreter_active() else torch.device("cuda", torch.cuda.current_device())
    return torch.empty(size, dtype=torch.int8, device=device)


def _set_tma_allocator() -> None:
    # triton keeps the allocator in a context variable (per thread); an allocator the caller
    # installed is left alone.
    from triton.runtime import _allocation
    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_tma_scratch)


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _head_dim_tile(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"   # "tf32" is ignored for 16-bit inputs


def _rowmajor_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _kpm_bytes(kpm: Optional[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int]:
    if kpm is None:
        return torch.empty(1, dtype=torch.uint8, device=device), 0
    kpm = kpm.contiguous().view(torch.uint8)
    return kpm, kpm.stride(0)


def _score_scale(d: int) -> tuple[float, bool]:
    """(scale applied to q·k, NAT): log2(e)/sqrt(d) for the kernels' base-2 softmax, or
    1/sqrt(d) in base e at head dims 1 and 2, where log2(e)/sqrt(d) > 1 would overflow a
    finite score above FLT_MAX/log2(e) (~2.36e38) that the reference's softmax handles."""
    nat = _LOG2E / math.sqrt(d) > 1.0
    return (1.0 if nat else _LOG2E) / math.sqrt(d), nat


def _new_attn_out(q: torch.Tensor, unrounded: bool = False) -> torch.Tensor:
    # (B, Tq, H, d) storage seen as (B, H, Tq, d): merge_heads() after the op is then a free view.
    # unrounded: fp32 for 16-bit q (the kernel stores its accumulator as is; _unrounded_out_wanted).
    b, h, t, d = q.shape
    return q.new_empty((b, t, h, d), dtype=_attn_out_dtype(q.dtype, unrounded)).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# attention: host functions
# --------------------------------------------------------------------------------------------
def _attn_forward(q, k, v, causal: bool, kpm, unrounded_out: bool = False):
    b, h, tq, d = q.shape
    tk = k.shape[2]
    out = _new_attn_out(q, unrounded_out)
    lse = torch.empty((b, h, tq), dtype=torch.float32, device=q.device)
    if b * h * tq == 0:
        return out, lse
    if tk == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    q, k, v = _rowmajor_last(q), _rowmajor_last(k), _rowmajor_last(v)
    kpm_t, skpm = _kpm_bytes(kpm, q.device)
    hd = _head_dim_tile(d)
    qk_scale, nat = _score_scale(d)

    def grid(meta):
        return (triton.cdiv(tq, meta["BLOCK_M"]) * b * h,)

    _launch_tuned("_attn_fwd", q.device, grid, q, k, v, kpm_t, out, lse,
                  q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                  v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                  skpm, h, tq, tk, d, qk_scale,
                  _head_group(causal, triton.cdiv(tq, 128), b * h, q.device), _bucket(tq), _bucket(tk),
                  CAUSAL=causal, HAS_KPM=kpm is not None, HEAD_DIM=hd, PAD_D=hd != d,
                  PREC=_precision(q.dtype), USE_TMA=_tma_ok(k, v),
                  SPLIT_P=out.dtype != q.dtype,   # the unrounded out of a 16-bit training step
                  NAT=nat)
    return out, lse


def _attn_backward(do, q, k, v, out, lse, causal: bool, kpm):
    b, h, tq, d = q.shape
    tk = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if b * h * tq == 0 or tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    do = _rowmajor_last(do.to(q.dtype))
    q, k, v, out = _rowmajor_last(q), _rowmajor_last(k), _rowmajor_last(v), _rowmajor_last(out)
    dq, dk, dv = _rowmajor_last(dq), _rowmajor_last(dk), _rowmajor_last(dv)
    kpm_t, skpm = _kpm_bytes(kpm, q.device)
    hd = _head_dim_tile(d)
    sm_scale = 1.0 / math.sqrt(d)
    qk_scale, nat = _score_scale(d)
    flags = dict(CAUSAL=causal, HAS_KPM=kpm is not None, HEAD_DIM=hd, PAD_D=hd != d,
                 PREC=_precision(q.dtype), NAT=nat)

    delta = torch.empty((b, h, tq), dtype=torch.float32, device=q.device)
    block = 32 if _interpreter_active() else 128
    _launch("_attn_bwd_delta", q.device, (b * h, triton.cdiv(tq, block)), out, do, delta,
            out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
            h, tq, d, HEAD_DIM=hd, BLOCK_M=block)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    group = _head_group(causal, triton.cdiv(max(tq, tk), 128), b * h, q.device)
    scalars = (h, tq, tk, d, qk_scale, sm_scale, group, _bucket(tq), _bucket(tk))
    _launch_tuned("_attn_bwd_dkdv", q.device,
                  lambda meta: (triton.cdiv(tk, meta["BLOCK_N"]) * b * h,),
                  q, k, v, do, kpm_t, lse, delta, dk, dv, *common,
                  dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                  skpm, *scalars, **flags)
    _launch_tuned("_attn_bwd_dq", q.device,
                  lambda meta: (triton.cdiv(tq, meta["BLOCK_M"]) * b * h,),
                  q, k, v, do, kpm_t, lse, delta, dq, *common,
                  dq.stride(0), dq.stride(1), dq.stride(2), skpm, *scalars, **flags)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# custom ops (registered once, at import)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("calm_fast::triton_xattn_fwd", mutates_args=())
def _xattn_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  key_padding_mask: Optional[torch.Tensor],
                  unrounded_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return _attn_forward(q, k, v, causal, key_padding_mask, unrounded_out)


@_xattn_fwd_op.register_fake
def _(q, k, v, causal, key_padding_mask, unrounded_out=False):
    b, h, tq, _ = q.shape
    return (_new_attn_out(q, unrounded_out),
            q.new_empty((b, h, tq), dtype=torch.float32))


@torch.library.custom_op("calm_fast::triton_xattn_bwd", mutates_args=())
def _xattn_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, causal: bool,
                  key_padding_mask: Optional[torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attn_backward(grad_out, q, k, v, out, lse, causal, key_padding_mask)


@_xattn_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, key_padding_mask):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _xattn_setup_context(ctx, inputs, output):
    q, k, v, causal, kpm, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm)
    ctx.causal = causal
    ctx.mark_non_differentiable(lse)


def _xattn_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kpm = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None
    # grad_out may be fp32 (the gradient of the cast of an unrounded out): _attn_backward casts
    # it to q's dtype, exactly, since it came through that cast.
    dq, dk, dv = torch.ops.calm_fast.triton_xattn_bwd(grad_out, q, k, v, out, lse, ctx.causal, kpm)
    return dq, dk, dv, None, None, None


_xattn_fwd_op.register_autograd(_xattn_backward, setup_context=_xattn_setup_context)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str = "aligned",
                    key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Flash cross-attention; same semantics as reference.cross_attention (differentiable)."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, T, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in _DTYPES or not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if not 0 < q.shape[3] <= 256:
        raise ValueError(f"head dim must be in [1, 256] for the triton backend, got {q.shape[3]}")
    if mask == "aligned" and q.shape[2] > k.shape[2]:
        raise ValueError(f"aligned mask needs Tq <= Tk, got Tq={q.shape[2]} Tk={k.shape[2]}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or tuple(
            key_padding_mask.shape) != (k.shape[0], k.shape[2])):
        raise ValueError(f"key_padding_mask must be bool (B, Tk)={(k.shape[0], k.shape[2])}, got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if _unrounded_out_wanted(q, k, v):  # fp32 out for the backward's delta, cast down here
        out, _ = torch.ops.calm_fast.triton_xattn_fwd(q, k, v, mask == "aligned", key_padding_mask, True)
        return out.to(q.dtype)
    out, _ = torch.ops.calm_fast.triton_xattn_fwd(q, k, v, mask == "aligned", key_padding_mask)
    return out


# --------------------------------------------------------------------------------------------
# decode step: host function, custom op, backend entry point
# --------------------------------------------------------------------------------------------
_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos: int, n_heads: int, kpm):
    bsz, _, d_b = h_b.shape
    if bsz == 0:  # nothing to write or attend (a zero-wide block would not compile)
        return h_b.new_empty((0, 1, d_b))
    hd = d_b // n_heads
    dev = h_b.device
    interp = _interpreter_active()
    hb2 = _rowmajor_last(h_b[:, 0, :])
    w_q, w_o = _rowmajor_last(w_q), _rowmajor_last(w_o)
    q_buf = torch.empty((bsz, d_b), dtype=h_b.dtype, device=dev)
    has_kv = h_a is not None
    if has_kv:
        ha2, w_kv = _rowmajor_last(h_a[:, 0, :]), _rowmajor_last(w_kv)
        bias = b_kv.contiguous()
        d_a = ha2.shape[1]
    else:
        ha2, w_kv, bias, d_a = hb2, w_q, q_buf, 0   # placeholders: never read when HAS_KV=False
    n = pos + 1 if has_kv else pos
    sms = 4 if interp else _sm_count(dev)

    # (1) q GEMV + K/V row. Batch 1 is bandwidth-bound: enough tiles to cover every SM twice.
    block_b = min(triton.next_power_of_2(bsz), 4)
    block_o = 16 if interp else (32 if triton.cdiv(3 * d_b, 32) >= 2 * sms else 16)
    block_k = 32 if interp else 128
    n_tiles = triton.cdiv(d_b, block_o) + (triton.cdiv(2 * d_b, block_o) if has_kv else 0)
    _launch("_decode_proj", dev, (n_tiles,), hb2, ha2, w_q, w_kv, bias, q_buf, k_cache, v_cache,
            bsz, d_b, d_a, pos, hd, hb2.stride(0), ha2.stride(0), w_q.stride(0), w_kv.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            HAS_KV=has_kv,
            BLOCK_B=block_b, BLOCK_O=block_o, BLOCK_K=block_k)

    # (2) split-K attention: splits so that B*H*splits programs fill the machine.
    qk_scale, nat = _score_scale(hd)
    head_tile = _head_dim_tile(hd)
    block_n = 16 if interp else 64
    max_splits = 3 if interp else 32
    splits = max(1, min(triton.cdiv(2 * sms, bsz * n_heads), triton.cdiv(max(n, 1), block_n),
                        max_splits))
    chunk = triton.cdiv(triton.cdiv(max(n, 1), splits), block_n) * block_n
    splits = max(1, triton.cdiv(n, chunk))
    part_m = torch.empty((bsz * n_heads * splits,), dtype=torch.float32, device=dev)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((bsz * n_heads * splits, head_tile), dtype=torch.float32, device=dev)
    kpm_t, skpm = _kpm_bytes(kpm, dev)
    _launch("_decode_attn", dev, (bsz * n_heads, splits), q_buf, k_cache, v_cache, kpm_t,
            part_m, part_l, part_acc, n, n_heads, hd, d_b, qk_scale, chunk,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), skpm, splits,
            HAS_KPM=kpm is not None, HEAD_DIM=head_tile, BLOCK_N=block_n, NAT=nat)

    # (3) combine the splits, project with W_o, add the residual.
    out = torch.empty((bsz, 1, d_b), dtype=h_b.dtype, device=dev)
    out2 = out[:, 0, :]
    block_o3 = 16 if interp else next((c for c in (64, 32) if triton.cdiv(d_b, c) >= 2 * sms), 16)
    block_b3 = min(triton.next_power_of_2(bsz), 2)
    _launch("_decode_out", dev, (triton.cdiv(d_b, block_o3),), hb2, w_o, part_m, part_l, part_acc,
            out2, bsz, d_b, n_heads, hd, hb2.stride(0), w_o.stride(0), out2.stride(0), splits,
            NS_P=triton.next_power_of_2(splits), HEAD_DIM=head_tile,
            BLOCK_B=block_b3, BLOCK_O=block_o3, NAT=nat)
    return out


# Defined through torch.library.Library, as native.py's decode step is: custom_op's Python
# layer for an op that mutates its inputs costs ~20-30 us per call (measured on the CPU: 30-37
# vs 8-9 us for an empty op), paid once per bridge and token. The schema's alias annotations
# tell the dispatcher and torch.compile which inputs are written.
_decode_lib = torch.library.Library("calm_fast", "FRAGMENT")
_decode_lib.define("triton_bridge_decode_step(Tensor h_b, Tensor? h_a, Tensor w_q, Tensor? w_kv, "
                   "Tensor? b_kv, Tensor w_o, Tensor(a!) k_cache, Tensor(b!) v_cache, SymInt pos, "
                   "int n_heads, Tensor? key_padding_mask) -> Tensor")
_decode_lib.impl("triton_bridge_decode_step", _decode_step, "CUDA")
_decode_lib.impl("triton_bridge_decode_step", _decode_step, "CPU")  # the interpreter


@torch.library.register_fake("calm_fast::triton_bridge_decode_step")
def _(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, key_padding_mask):
    return torch.empty_like(h_b, memory_format=torch.contiguous_format)


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses `t` may touch."""
    span = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def _check_writes_disjoint(written: dict, read: dict) -> None:
    """Every tensor written in place against the other written ones and every input, by byte
    range (conservative, as csrc/validate.cpp: interleaved tensors are refused too). The kernels
    read inputs while they write, so shared memory would give a silently wrong result. Element
    ranges are compared only where two allocations overlap (almost never): the decode step pays
    this check per bridge and token."""
    def allocations(tensors):
        out = []
        for name, t in tensors.items():
            if t is not None:
                st = t.untyped_storage()
                out.append((name, t, st.data_ptr(), st.data_ptr() + st.nbytes()))
        return out
    outs, ins = allocations(written), allocations(read)
    for i, (name, t, a0, a1) in enumerate(outs):
        for other, u, b0, b1 in outs[i + 1:] + ins:
            if a0 < b1 and b0 < a1 and t.numel() and u.numel() and _overlap(t, u):
                if other in written:
                    raise ValueError(f"bridge_decode_step: {name}: overlaps {other} in memory (both "
                                     f"are written in place); pass separate tensors")
                raise ValueError(f"bridge_decode_step: {name}: overlaps the input {other} in memory "
                                 f"(an output must not share memory with an input)")


def _overlap(t: torch.Tensor, u: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _byte_range(t), _byte_range(u)
    return a0 < b1 and b0 < a1


def bridge_decode_step(h_b: torch.Tensor, h_a: Optional[torch.Tensor], w_q: torch.Tensor,
                       w_kv: Optional[torch.Tensor], b_kv: Optional[torch.Tensor], w_o: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, n_heads: int,
                       key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decode step of a bridge in three launches; same semantics as the reference.

    Writes the new K/V row into k_cache/v_cache (aligned mode, h_a given) in place.
    """
    _check_decode_inputs(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, key_padding_mask)
    return bridge_decode_step_checked(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads,
                                      key_padding_mask)


def bridge_decode_step_checked(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads,
                               key_padding_mask=None) -> torch.Tensor:
    """bridge_decode_step for inputs that passed the dispatcher's _check_decode_inputs: only
    what these kernels add (a dtype they handle, head dim <= 256, caches writable in place)."""
    if h_b.dtype not in _DTYPES:
        raise TypeError(f"bridge_decode_step: dtype {h_b.dtype} is not handled by the triton backend "
                        f"(use one of {_DTYPES})")
    hd = h_b.shape[2] // n_heads
    if hd > 256:
        raise ValueError(f"bridge_decode_step: head dim must be <= 256 for the triton backend, got {hd}")
    _check_caches_writable(h_a, k_cache, v_cache)
    # The native kernels check this in csrc/validate.cpp; fake tensors (compiling) have no addresses.
    if h_a is not None and not torch.compiler.is_compiling():
        _check_writes_disjoint({"k_cache": k_cache, "v_cache": v_cache},
                               {"h_b": h_b, "h_a": h_a, "w_q": w_q, "w_kv": w_kv, "b_kv": b_kv,
                                "w_o": w_o, "key_padding_mask": key_padding_mask})
    return torch.ops.calm_fast.triton_bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache,
                                                          v_cache, int(pos), int(n_heads),
                                                          key_padding_mask)
