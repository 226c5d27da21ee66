"""Fuzzing the bridge kernels: every available CPU backend against ops/reference.py.

Hypothesis draws shapes (odd head dims, single rows, Tq < Tk), masks (aligned / context,
key padding, rows that see no key), layouts (transposed, strided, broadcast with stride 0,
caches that are slices of bigger buffers), dtypes (fp32, fp64, bf16) and values (tiny and
huge magnitudes, NaN / +inf / -inf). Derandomized: CI runs the same cases every time.

Oracle, per output row:
  * the reference finite  -> the backend finite and within tolerance (fp32/fp64 1e-5, bf16
    1e-2 relative); when q/k are huge the softmax is ill-conditioned (scores of 1e8 that
    differ in the last ulp), so there the check is the convex-hull property instead: every
    output lies between the min and the max of the values the row may see.
  * the reference NaN     -> the backend NaN (NaN in -> NaN out, never silently dropped).
  * never a crash: any exception is a failure.
Non-finite values are injected where the mask lets every row see them (a query row, or a key
every row may attend to), and, in half the cases, into every padded key or cache row (NaN,
inf, -inf): no row may see those, so they must change nothing. A non-finite value at a key in
the future of some rows is a separate, known issue (test_future_nonfinite_values_do_not_leak).

Scale: CALM_FUZZ_DTYPES (comma list of torch dtype names), CALM_FUZZ_EXAMPLES (default 60 per test in CI; scripts/fuzz_kernels.py runs more),
CALM_FUZZ_BACKENDS (comma list, default: every backend available on CPU except triton),
CALM_FUZZ_CUDA_EMU_EXAMPLES (default 25; 0 = off): the same attention-forward and decode cases
for the CUDA kernels run by the CPU emulator (backend "cuda_emu", tests/cuda_emulator.py;
fp32/bf16/fp16, no fp64 on CUDA),
CALM_FUZZ_REPORT (a JSON file that receives the case counts).
"""
from __future__ import annotations

import atexit
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calm_fast import ops
from calm_fast.ops import reference as R
import cuda_emulator
from padding_checks import check_decode_padded_rows_are_ignored, check_padded_keys_are_ignored, fill_padded

torch.set_num_threads(1)

EXAMPLES = int(os.environ.get("CALM_FUZZ_EXAMPLES", "60"))
_avail = ops.available_backends("cpu")
if os.environ.get("CALM_FUZZ_BACKENDS"):
    BACKENDS = [b for b in os.environ["CALM_FUZZ_BACKENDS"].split(",") if b]
    missing = [b for b in BACKENDS if b not in _avail]
    if missing:
        raise RuntimeError(f"CALM_FUZZ_BACKENDS asks for {missing}, available: {_avail}")
else:
    BACKENDS = [b for b in _avail if b != "triton"]
CUDA_EMU_EXAMPLES = int(os.environ.get("CALM_FUZZ_CUDA_EMU_EXAMPLES", "25"))
TOL = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = [getattr(torch, n) for n in
          os.environ.get("CALM_FUZZ_DTYPES", "float32,float64,bfloat16").split(",") if n]

COUNTS: dict[str, int] = {}


def _count(key: str, n: int = 1) -> None:
    COUNTS[key] = COUNTS.get(key, 0) + n


def _count_padded_garbage(prefix: str, c: dict, kpm) -> None:
    if c["pad_garbage"] and kpm is not None and not bool(kpm.all()):
        _count(f"{prefix}/padded_nonfinite")


def _write_report() -> None:
    path = os.environ.get("CALM_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"backends": BACKENDS, "examples_setting": EXAMPLES, "counts": COUNTS}, f,
                      indent=2, sort_keys=True)


atexit.register(_write_report)

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
FUZZ_CUDA_EMU = settings(FUZZ, max_examples=max(CUDA_EMU_EXAMPLES, 1))


def _supports(backend: str, dtype: torch.dtype) -> bool:
    if backend == "cuda_emu":
        return dtype in cuda_emulator.DTYPES
    return backend in ops.available_backends("cpu", dtype)


def _attend(backend, q, k, v, mask, kpm):
    if backend == "cuda_emu":
        return cuda_emulator.attend(cuda_emulator.build(), q, k, v, mask, kpm)[0]
    return ops.cross_attention(q, k, v, mask, kpm, backend)


def _decode(backend, *args):
    if backend == "cuda_emu":
        return cuda_emulator.decode_step(cuda_emulator.build(), *args)
    return ops.bridge_decode_step(*args, backend)


# ------------------------------------------------------------------------------- builders

def _layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as x (4-D), in another memory layout."""
    if how == "contiguous":
        return x.contiguous()
    if how == "transposed":  # (B, T, H, d) storage, viewed as (B, H, T, d)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "strided_inner":  # innermost stride 2
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    if how == "padded_rows":  # rows of a bigger buffer: outer strides larger than dense
        big = torch.full((x.shape[0], x.shape[1], x.shape[2] + 3, x.shape[3] + 5), 7.0, dtype=x.dtype)
        big[:, :, :x.shape[2], :x.shape[3]] = x
        return big[:, :, :x.shape[2], :x.shape[3]]
    raise AssertionError(how)


def _broadcast(x: torch.Tensor) -> torch.Tensor:
    """x with stride 0 on batch and heads (every (b, h) slice the same row block)."""
    return x[:1, :1].expand_as(x)


@st.composite
def attention_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 2, 3, 4, 7, 8, 16, 33, 64]))
    mask = draw(st.sampled_from(["aligned", "context"]))
    tk = draw(st.integers(1, 12))
    tq = draw(st.integers(1, tk)) if mask == "aligned" else draw(st.integers(1, 9))
    kpm_kind = draw(st.sampled_from(["none", "random", "one_row_empty", "all_empty", "left_pad"]))
    layouts = [draw(st.sampled_from(["contiguous", "transposed", "strided_inner", "padded_rows"]))
               for _ in range(3)]
    broadcast_kv = draw(st.booleans()) and draw(st.booleans())
    qk_scale = draw(st.sampled_from([1.0, 1.0, 1.0, 1e-30, 1e-3, 30.0, 1e4]))
    v_scale = draw(st.sampled_from([1.0, 1.0, 1e-30, 1e30]))
    special = draw(st.sampled_from(["none", "none", "none", "nan_q", "inf_q", "ninf_q", "nan_k",
                                    "inf_k", "nan_v", "inf_v", "ninf_v"]))
    pad_garbage = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(dtype=dtype, b=b, h=h, d=d, mask=mask, tq=tq, tk=tk, kpm_kind=kpm_kind,
                layouts=layouts, broadcast_kv=broadcast_kv, qk_scale=qk_scale, v_scale=v_scale,
                special=special, pad_garbage=pad_garbage, seed=seed)


def _build_attention(c):
    g = torch.Generator().manual_seed(c["seed"])
    b, h, tq, tk, d, dtype = c["b"], c["h"], c["tq"], c["tk"], c["d"], c["dtype"]
    q = (torch.randn(b, h, tq, d, generator=g, dtype=torch.float64) * c["qk_scale"]).to(dtype)
    k = (torch.randn(b, h, tk, d, generator=g, dtype=torch.float64) * c["qk_scale"]).to(dtype)
    # fp16 overflows past 65504: 1e30 would put inf at every key, future ones included, which is
    # the known dense-path leak (test_future_nonfinite_values_do_not_leak), not this test's subject.
    v_scale = min(c["v_scale"], 1e3) if dtype == torch.float16 else c["v_scale"]
    v = (torch.randn(b, h, tk, d, generator=g, dtype=torch.float64) * v_scale).to(dtype)
    kpm = None
    kind = c["kpm_kind"]
    if kind != "none":
        kpm = torch.rand(b, tk, generator=g) < 0.7
        if kind == "one_row_empty":
            kpm[0] = False
        elif kind == "all_empty":
            kpm[:] = False
        elif kind == "left_pad":
            n_pad = torch.randint(0, tk + 1, (b,), generator=g)
            kpm = torch.arange(tk)[None, :] >= n_pad[:, None]
        if torch.rand((), generator=g) < 0.5:  # a non-contiguous mask
            big = torch.zeros(b, 2 * tk, dtype=torch.bool)
            big[:, ::2] = kpm
            kpm = big[:, ::2]
    # Non-finite values only where every row may see them (see the module docstring).
    sp = c["special"]
    val = {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")}[sp.split("_")[0]] \
        if sp != "none" else None
    visible = [j for j in range(tk)
               if (c["mask"] == "context" or j <= tk - tq) and (kpm is None or bool(kpm[:, j].all()))]
    if sp.endswith("_q"):
        q[0, 0, int(torch.randint(0, tq, (), generator=g)), 0] = val
    elif sp != "none" and visible:
        j = visible[int(torch.randint(0, len(visible), (), generator=g))]
        (k if sp.endswith("_k") else v)[0, 0, j, 0] = val
    if c["pad_garbage"] and kpm is not None:
        # Broadcast K/V give every batch batch 0's rows: fill only keys no batch keeps.
        k, v = fill_padded(kpm.any(0, keepdim=True).expand_as(kpm) if c["broadcast_kv"] else kpm, k, v)
    if c["broadcast_kv"]:
        k, v = _broadcast(k), _broadcast(v)
    else:
        k, v = _layout(k, c["layouts"][1]), _layout(v, c["layouts"][2])
    q = _layout(q, c["layouts"][0])
    return q, k, v, kpm


def _excuse_all_nan_rows(backend, q, k, kpm, c, out, ref):
    """A known divergence (test_backends_agree_when_all_scores_are_neginf, xfail), excused row
    by row so the fuzz keeps testing everything else, and counted in the report: every
    visible score -inf (an infinite q or k, no NaN): cpp writes 0, the reference the mean of
    the visible values. Only rows where the kernel wrote exactly 0 are excused (they take the
    reference's row). (Rows of NaN scores were excused too until the cpp kernel was fixed.)"""
    if backend not in ("cpp", "cuda", "cuda_emu"):
        return out, None
    scores = q.float() @ k.float().transpose(-1, -2)
    allowed = _allowed(c["tq"], c["tk"], c["mask"], kpm, c["b"])
    bad = (scores.isneginf() | ~allowed).all(-1) & allowed.any(-1)  # (B, H, Tq)
    hit = (bad & (out == 0).all(-1)).expand(c["b"], c["h"], c["tq"])
    if hit.any():
        _count(f"{backend}/known_divergence_all_neginf_row_gave_0", int(hit.sum()))
        out = out.expand(c["b"], c["h"], c["tq"], c["d"]).clone()
        out[hit] = ref.expand_as(out)[hit]
    return out, hit


def _allowed(tq, tk, mask, kpm, b):
    a = R.attention_mask(tq, tk, mask, kpm, torch.device("cpu"))
    if a is None:
        a = torch.ones(1, 1, tq, tk, dtype=torch.bool)
    return a.expand(b, -1, tq, tk)


def _compare(out, ref, dtype, what, hull=None, atol=0.0):
    """The oracle of the module docstring, on (..., d) outputs, row by row."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    o, r = out.double(), ref.double()
    ref_nan = r.isnan()
    assert o[ref_nan].isnan().all(), f"{what}: reference NaN but backend gave {o[ref_nan]}"
    fin = r.isfinite()
    assert o[fin].isfinite().all(), f"{what}: reference finite, backend non-finite"
    inf = r.isinf()
    assert torch.equal(o[inf], r[inf]), f"{what}: reference inf, backend {o[inf]}"
    if hull is not None:
        lo, hi = hull
        slack = 1e-2 * (hi.abs() + lo.abs()) + 1e-30
        ok = ~fin | ((o >= lo - slack) & (o <= hi + slack))
        assert ok.all(), f"{what}: output outside the values the row may see"
        return
    rows_ok = fin.all(-1)
    if rows_ok.any():
        num = (o[rows_ok] - r[rows_ok]).norm()
        den = r[rows_ok].norm()
        tol = TOL[dtype]
        assert num <= tol * den + atol or num == 0, \
            f"{what}: relative error {float(num / max(den, 1e-300)):.3g} > {tol}"


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(c=attention_case())
def test_cross_attention_matches_reference(backend, c):
    _check_attention(backend, c)


@pytest.mark.skipif(CUDA_EMU_EXAMPLES == 0, reason="CALM_FUZZ_CUDA_EMU_EXAMPLES=0")
@FUZZ_CUDA_EMU
@given(c=attention_case())
def test_emulated_cuda_attention_matches_reference(c):
    _check_attention("cuda_emu", c)


def _check_attention(backend, c):
    if not _supports(backend, c["dtype"]):
        _count(f"attention/{backend}/skipped_dtype")
        return
    if backend == "sdpa" and c["special"] != "none":
        # Documented limit of the opt-in "sdpa" backend (ops/sdpa_backend.py): torch's fused CPU
        # kernel does not propagate NaN/inf like the reference.
        _count(f"attention/{backend}/skipped_nonfinite")
        return
    q, k, v, kpm = _build_attention(c)
    ref = R.cross_attention(q.contiguous(), k.contiguous(), v.contiguous(), c["mask"], kpm)
    out = _attend(backend, q, k, v, c["mask"], kpm)
    out, excused = _excuse_all_nan_rows(backend, q, k, kpm, c, out, ref)
    hull = None
    if c["qk_scale"] >= 30.0:
        allowed = _allowed(c["tq"], c["tk"], c["mask"], kpm, c["b"])[..., None]  # (B,H|1,Tq,Tk,1)
        vv = v.double()[:, :, None]  # (B, H, 1, Tk, d)
        lo = torch.where(allowed, vv, math.inf).amin(-2)
        hi = torch.where(allowed, vv, -math.inf).amax(-2)
        empty = ~allowed.any(-2)
        lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
        if excused is not None and excused.any():  # the reference's row is not a convex mix
            lo = torch.where(excused[..., None], -math.inf, lo.expand_as(out))
            hi = torch.where(excused[..., None], math.inf, hi.expand_as(out))
        hull = (lo, hi)
    _compare(out, ref, c["dtype"], f"{backend} {c}", hull)
    # A row that sees no key outputs exactly zero.
    empty_rows = ~_allowed(c["tq"], c["tk"], c["mask"], kpm, c["b"]).any(-1)
    if empty_rows.any():
        assert (out.expand(c["b"], c["h"], c["tq"], c["d"])[empty_rows.expand(-1, c["h"], -1)] == 0).all()
        _count(f"attention/{backend}/empty_rows")
    _count(f"attention/{backend}/cases")
    _count(f"attention/{backend}/special_{c['special']}")
    _count_padded_garbage(f"attention/{backend}", c, kpm)


@st.composite
def backward_case(draw):
    c = draw(attention_case())
    c.update(dtype=draw(st.sampled_from([torch.float32, torch.float64])),  # bf16: too coarse
 qk_scale=1.0, v_scale=1.0,
             special="none", broadcast_kv=False)
    return c


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@settings(FUZZ, max_examples=max(10, EXAMPLES // 3))
@given(c=backward_case())
def test_cross_attention_gradients_match_reference(backend, c):
    if backend not in ops.available_backends("cpu", c["dtype"]):
        _count(f"attention_backward/{backend}/skipped_dtype")
        return
    q, k, v, kpm = _build_attention(c)
    g = torch.Generator().manual_seed(c["seed"] + 1)
    dout = torch.randn(c["b"], c["h"], c["tq"], c["d"], generator=g, dtype=torch.float64).to(c["dtype"])
    grads = []
    for be in (None, backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        if be is None:
            out = R.cross_attention(*leaves, c["mask"], kpm)
        else:
            out = ops.cross_attention(*(_layout(t, lay) for t, lay in zip(leaves, c["layouts"])),
                                      c["mask"], kpm, be)
        out.backward(dout)
        grads.append([t.grad for t in leaves])
    # The reference runs in fp32. A gradient can be exactly 0 in theory (one visible key:
    # dq = 0) and a rounding residue in practice, so an absolute slack on the scale of
    # |dout| * |q, k, v| comes on top of the relative tolerance.
    # Norms over the finite entries: padded keys may hold inf/NaN (pad_garbage).
    scale = float(dout.double().norm() * max(float(t.double().nan_to_num(0.0, 0.0, 0.0).norm())
                                             for t in (q, k, v)))
    assert math.isfinite(scale)
    for name, r, o in zip("qkv", *grads):
        _compare(o, r, torch.float32, f"{backend} d{name} {c}", atol=1e-5 * scale)
    _count(f"attention_backward/{backend}/cases")
    _count_padded_garbage(f"attention_backward/{backend}", c, kpm)


# ----------------------------------------------------------------------------- decode step

@st.composite
def decode_case(draw):
    return dict(
        dtype=draw(st.sampled_from(DTYPES)), b=draw(st.integers(1, 3)), h=draw(st.integers(1, 3)),
        hd=draw(st.sampled_from([1, 2, 3, 4, 8, 16])), d_a=draw(st.integers(1, 20)),
        s=draw(st.integers(1, 10)), aligned=draw(st.booleans()), pos_frac=draw(st.floats(0, 1)),
        kpm_kind=draw(st.sampled_from(["none", "random", "one_row_empty"])),
        kpm_strided=draw(st.booleans()), weights_transposed=draw(st.booleans()), cache_slice=draw(st.booleans()),
        scale=draw(st.sampled_from([1.0, 1.0, 1e-30, 1e3])),
        special=draw(st.sampled_from(["none", "none", "nan_hb", "inf_hb", "nan_ha", "nan_cache"])),
        pad_garbage=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _build_decode(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, b, h, hd, d_a, s = c["dtype"], c["b"], c["h"], c["hd"], c["d_a"], c["s"]
    d_b = h * hd

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    h_b, h_a = rnd(b, 1, d_b, scale=c["scale"]), rnd(b, 1, d_a, scale=c["scale"])
    w_q, w_o = rnd(d_b, d_b, scale=d_b ** -0.5), rnd(d_b, d_b, scale=d_b ** -0.5)
    w_kv, b_kv = rnd(2 * d_b, d_a, scale=d_a ** -0.5), rnd(2 * d_b)
    if c["weights_transposed"]:  # column-major weights (innermost stride != 1)
        w_q, w_o, w_kv = (w.t().contiguous().t() for w in (w_q, w_o, w_kv))
    if c["aligned"]:
        pos = min(s - 1, int(c["pos_frac"] * s))
    else:
        pos = min(s, 1 + int(c["pos_frac"] * s))  # pos 0 (no rows): test_zero_keys_give_zero
        h_a = None
    k_cache, v_cache = rnd(b, h, s, hd), rnd(b, h, s, hd)
    kpm = None
    if c["kpm_kind"] != "none":
        kpm = torch.rand(b, s, generator=g) < 0.7
        if c["aligned"]:
            kpm[:, pos] = True  # the row being written is a real token
        if c["kpm_kind"] == "one_row_empty":
            kpm[0, :pos] = False
        if c["kpm_strided"]:
            big = torch.zeros(b, 2 * s, dtype=torch.bool)
            big[:, ::2] = kpm
            kpm = big[:, ::2]
    sp = c["special"]
    if sp == "nan_hb":
        h_b[0, 0, 0] = float("nan")
    elif sp == "inf_hb":
        h_b[0, 0, 0] = float("inf")
    elif sp == "nan_ha" and h_a is not None:
        h_a[0, 0, 0] = float("nan")
    elif sp == "nan_cache" and pos > 0 and (kpm is None or bool(kpm[:, 0].all())):
        k_cache[0, 0, 0, 0] = float("nan")  # row 0: seen by every query
    if c["pad_garbage"] and kpm is not None:
        k_cache, v_cache = fill_padded(kpm, k_cache, v_cache)
    return h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, kpm


def _cache_copy(c, t):
    if not c["cache_slice"]:
        return t.clone()
    big = torch.full((t.shape[0], t.shape[1] + 1, t.shape[2] + 2, t.shape[3]), 5.0, dtype=t.dtype)
    big[:, :t.shape[1], :t.shape[2]] = t
    return big[:, :t.shape[1], :t.shape[2]]  # outer strides of a bigger buffer


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(c=decode_case())
def test_decode_step_matches_reference(backend, c):
    _check_decode(backend, c)


@pytest.mark.skipif(CUDA_EMU_EXAMPLES == 0, reason="CALM_FUZZ_CUDA_EMU_EXAMPLES=0")
@FUZZ_CUDA_EMU
@given(c=decode_case())
def test_emulated_cuda_decode_step_matches_reference(c):
    _check_decode("cuda_emu", c)


def _check_decode(backend, c):
    if not _supports(backend, c["dtype"]):
        _count(f"decode/{backend}/skipped_dtype")
        return
    if backend == "sdpa" and c["special"] != "none":  # see test_cross_attention_matches_reference
        _count(f"decode/{backend}/skipped_nonfinite")
        return
    h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, kpm = _build_decode(c)
    kr, vr = k_cache.clone(), v_cache.clone()
    ref = R.bridge_decode_step(h_b, h_a, w_q.contiguous(), w_kv.contiguous(), b_kv, w_o.contiguous(),
                               kr, vr, pos, c["h"], kpm)
    kb, vb = _cache_copy(c, k_cache), _cache_copy(c, v_cache)
    out = _decode(backend, h_b, h_a, w_q, w_kv, b_kv, w_o, kb, vb, pos, c["h"], kpm)
    # The output: the residual h_b plus a small update; compare the update and the caches.
    tol_dtype = c["dtype"]
    _compare(out, ref, tol_dtype, f"{backend} out {c}")
    _compare(kb, kr, tol_dtype, f"{backend} k_cache {c}")
    _compare(vb, vr, tol_dtype, f"{backend} v_cache {c}")
    _count(f"decode/{backend}/cases")
    _count(f"decode/{backend}/special_{c['special']}")
    _count_padded_garbage(f"decode/{backend}", c, kpm)


# ----------------------------------------------------------------- the C API, through _C

def _native():
    try:
        from calm_fast import _C
    except ImportError:
        pytest.skip("calm_fast._C is not built")
    return _C


def _desc(t):
    return (t.data_ptr(), {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.bool: 4}[t.dtype],
            tuple(t.shape), tuple(t.stride()))


def test_c_api_rejects_null_negative_and_overflowing_sizes():
    C = _native()
    q = torch.randn(1, 2, 3, 4)
    k = torch.randn(1, 2, 5, 4)
    out, lse = torch.empty_like(q), torch.empty(1, 2, 3)
    good = [_desc(q), _desc(k), _desc(k), None, 1, _desc(out), _desc(lse)]
    C.attn_fwd(*good)  # the baseline call works
    bad = []
    # Null descriptors and null data pointers.
    for i in (0, 1, 2, 5, 6):
        args = list(good)
        args[i] = None
        bad.append(("None descriptor", args))
        args = list(good)
        args[i] = (0,) + tuple(good[i][1:])
        bad.append(("null data", args))
    # Negative sizes and strides, element counts and offsets past int64, wrong ranks.
    for field, value in (("shape", (1, 2, -3, 4)), ("shape", (2**40, 2**40, 2**40, 4)),
                         ("stride", (24, 12, -4, 1)), ("stride", (24, 2**62, 4, 1)),
                         ("shape", (1, 2, 3)), ("shape", (1, 2, 3, 4, 5))):
        args = list(good)
        ptr, dt, shape, stride = good[0]
        if field == "shape":
            shape = value
            stride = stride[:len(value)] + (1,) * max(0, len(value) - len(stride))
        else:
            stride = value
        args[0] = (ptr, dt, shape, stride)
        bad.append((f"{field}={value}", args))
    args = list(good)
    args[0] = (q.data_ptr(), 99, tuple(q.shape), tuple(q.stride()))
    bad.append(("dtype code 99", args))
    args = list(good)
    args[4] = 7
    bad.append(("mask 7", args))
    args = list(good)
    args[0] = (q.data_ptr(), 0, (2**63, 1, 1, 1), (1, 1, 1, 1))  # does not fit in int64
    bad.append(("size 2**63", args))
    args = list(good)
    args[0] = (-1, 0, tuple(q.shape), tuple(q.stride()))
    bad.append(("negative pointer", args))
    for what, args in bad:
        with pytest.raises((ValueError, TypeError), match=r"\S"):  # an exception with a message
            C.attn_fwd(*args)
            pytest.fail(f"attn_fwd accepted {what}")
    # Decode step: null required tensors, n_heads <= 0, overflowing n_heads / pos.
    hb, wq = torch.randn(1, 1, 4), torch.randn(4, 4)
    kc, vc = torch.zeros(1, 2, 3, 2), torch.zeros(1, 2, 3, 2)
    ha, wkv, bkv = torch.randn(1, 1, 5), torch.randn(8, 5), torch.randn(8)
    o = torch.empty_like(hb)
    dgood = [_desc(hb), _desc(ha), _desc(wq), _desc(wkv), _desc(bkv), _desc(wq), _desc(kc), _desc(vc),
             None, 1, 2, _desc(o)]
    C.decode_step(*dgood)
    dbad = []
    for i in (0, 2, 5, 6, 7, 11):
        args = list(dgood)
        args[i] = None
        dbad.append(args)
    for i in (3, 4):  # h_a given without its projection weights
        args = list(dgood)
        args[i] = None
        dbad.append(args)
    for pos in (-1, 3, 2**62):
        args = list(dgood)
        args[9] = pos
        dbad.append(args)
    for nh in (0, -2, 3):
        args = list(dgood)
        args[10] = nh
        dbad.append(args)
    for args in dbad:
        with pytest.raises((ValueError, TypeError)):
            C.decode_step(*args)
    for args in ([*dgood[:9], 2**64, *dgood[10:]], [*dgood[:10], 2**64, dgood[11]]):
        with pytest.raises((ValueError, TypeError, OverflowError)):
            C.decode_step(*args)
    _count("c_api/rejected_calls", len(bad) + len(dbad) + 2)


# ------------------------------------------------- non-finite values at keys a row may not see

# Regression test (was the strict xfail test_masked_nonfinite_values_do_not_leak): the reference
# and sdpa backends multiplied a padded key's weight 0 by its inf/NaN value.
@pytest.mark.parametrize("backend", ops.available_backends("cpu"))
def test_padded_nonfinite_keys_do_not_leak(backend):
    check_padded_keys_are_ignored(
        lambda q, k, v, mask, kpm: ops.cross_attention(q, k, v, mask, kpm, backend), "cpu")
    check_decode_padded_rows_are_ignored(
        lambda h_b, *rest: ops.bridge_decode_step(h_b, None, *rest, backend=backend), "cpu")


# Known issue, kept visible: under the aligned mask a key in the future of some rows sits in a
# dense P @ V (the reference's matmul, torch SDPA's kernels, the Triton and CUDA tiles on the
# diagonal) with weight 0 for those rows, and 0 * inf is NaN. Only the cpp kernel, which stops
# each row at its last visible key, keeps those rows finite. Padding does not have the issue
# (padded keys are zeroed, test above). Fixing the dense paths costs extra work in every
# diagonal tile and a second product in the reference; not done yet.
_DENSE = pytest.mark.xfail(strict=True, reason="dense P @ V multiplies 0 by a future key's inf/NaN")


@pytest.mark.parametrize("backend", [pytest.param(b, marks=() if b == "cpp" else _DENSE)
                                     for b in ops.available_backends("cpu")])
def test_future_nonfinite_values_do_not_leak(backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    v[0, 0, 4, 0] = float("inf")  # the last key: in the future of rows 0 and 1
    out = ops.cross_attention(q, k, v, "aligned", None, backend)
    assert out[:, :, :2].isfinite().all() and out[:, :, 2, 0].isinf().all()


# Regression test: found by this fuzz, fixed (was xfail).
def test_native_accepts_strided_key_padding_mask():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("cpp backend not built")
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    kpm = torch.tensor([[True, False, True, True, True, True, False, True, True, False]])[:, ::2]
    ref = R.cross_attention(q, k, v, "context", kpm)
    torch.testing.assert_close(ops.cross_attention(q, k, v, "context", kpm, "cpp"), ref)


# Regression test: found by this fuzz, fixed (was xfail).
def test_native_all_nan_scores_give_nan():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("cpp backend not built")
    q = torch.tensor([[[[float("nan")]]]])
    k = torch.tensor([0.5, 1.0]).view(1, 1, 2, 1)
    v = torch.tensor([2.0, 3.0]).view(1, 1, 2, 1)
    assert R.cross_attention(q, k, v, "context").isnan().all()
    assert ops.cross_attention(q, k, v, "context", None, "cpp").isnan().all()


# Regression test: found by this fuzz, fixed (was xfail): both give NaN.
def test_backends_agree_when_all_scores_are_neginf():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("cpp backend not built")
    q = torch.tensor([[[[float("inf")]]]])
    k = torch.tensor([-1.0, -2.0]).view(1, 1, 2, 1)
    v = torch.tensor([2.0, 4.0]).view(1, 1, 2, 1)
    ref = R.cross_attention(q, k, v, "context")
    torch.testing.assert_close(ops.cross_attention(q, k, v, "context", None, "cpp"), ref, equal_nan=True)


# Regression test: found by this fuzz, fixed (was xfail).
def test_zero_keys_give_zero():
    q, k = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 0, 4)
    hb, w, kc = torch.randn(1, 1, 4), torch.randn(4, 4), torch.randn(1, 2, 3, 2)
    for be in ops.available_backends("cpu"):
        assert (ops.cross_attention(q, k, k, "context", None, be) == 0).all(), be
        out = ops.bridge_decode_step(hb, None, w, None, None, w, kc.clone(), kc.clone(), 0, 2, None, be)
        assert torch.equal(out, hb), be


# Regression test: found by this fuzz, fixed (was xfail).
def test_native_decode_step_strided_weights():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("cpp backend not built")
    g = torch.Generator().manual_seed(0)
    d_b, d_a, h = 8, 6, 2
    h_b, h_a = torch.randn(1, 1, d_b, generator=g), torch.randn(1, 1, d_a, generator=g)
    w_q, w_o = (torch.randn(d_b, d_b, generator=g).t() for _ in range(2))  # column-major views
    w_kv, b_kv = torch.randn(d_a, 2 * d_b, generator=g).t(), torch.randn(2 * d_b, generator=g)
    kc, vc = torch.randn(1, h, 4, d_b // h, generator=g), torch.randn(1, h, 4, d_b // h, generator=g)
    ref = R.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kc.clone(), vc.clone(), 2, h)
    for _ in range(3):  # the freed memory is reused by the allocator in between
        junk = [torch.full((d_b, d_b), float("nan")) for _ in range(8)]  # noqa: F841
        out = ops.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kc.clone(), vc.clone(), 2, h,
                                     None, "cpp")
        torch.testing.assert_close(out, ref)


# Regression test: found by this fuzz in a work-in-progress build, fixed (was xfail).
def test_nonfinite_value_with_underflowed_weight_poisons_row():
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("cpp backend not built")
    # Found by the fuzz (seed 3): key 2 is visible, its weight exp(-687) underflows to 0.
    q = torch.tensor([[[[24.0983]]]])
    k = torch.tensor([5.2450, 2.6693, -18.4115, 1.3855, -41.0478, 10.1249]).view(1, 1, 6, 1)
    v = torch.tensor([1.0111, -1.4352, float("nan"), 0.5220, 1.2379, -0.8646]).view(1, 1, 6, 1)
    kpm = torch.tensor([[True, True, True, False, True, True]])
    assert R.cross_attention(q, k, v, "aligned", kpm).isnan().all()
    assert ops.cross_attention(q, k, v, "aligned", kpm, "cpp").isnan().all()
