"""The Triton backend (ops/triton_xattn.py) against the eager reference.

CPU part: the kernels run under the Triton interpreter. Triton reads TRITON_INTERPRET when
triton.language is imported, for its own library functions too, so the interpreter can only be
switched on before anything imports triton. If this module is the first, it does that in-process
(and sets the variable only around its own tests, so other test modules do not see the backend on
CPU); if another test
module imported triton first, one test re-runs this file in a subprocess with TRITON_INTERPRET=1.
The interpreter computes fp32 exactly (and bf16 wrongly), so CPU checks are fp32 at 1e-5.

GPU part (skipped without CUDA): bf16 at 1e-2 and fp32 at 1e-5 (the fp32 kernels use IEEE dot
products, not TF32), opcheck and torch.compile with inductor. Autotuning is switched off there
(CALM_FAST_TRITON_AUTOTUNE=0) so each shape costs one compile, not a tuning sweep; the
autotuned path runs in bench/bench_attention.py.
"""
import os
import subprocess
import sys

import pytest
import torch

_CUDA = torch.cuda.is_available()


def _import_backend():
    """Import the backend, with the interpreter on when this process can still choose it."""
    if _CUDA or "triton" in sys.modules:
        from calm_fast.ops import triton_xattn
        return triton_xattn
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from calm_fast.ops import triton_xattn
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev
    return triton_xattn


try:
    tx = _import_backend()
except ImportError as exc:  # triton itself missing
    pytest.skip(f"triton is not installed: {exc}", allow_module_level=True)

from calm_fast import ops  # noqa: E402
from calm_fast.ops import reference as ref  # noqa: E402
from padding_checks import check_decode_padded_rows_are_ignored, check_padded_keys_are_ignored  # noqa: E402
from precision_checks import check_16bit_grads_with_alike_values  # noqa: E402

INTERP = tx._interpreter_active()
interp_only = pytest.mark.skipif(
    not INTERP, reason="Triton interpreter not active in this process (CUDA present, or triton was "
                       "imported before this module; see test_interpreter_suite_in_subprocess)")
gpu_only = pytest.mark.skipif(not _CUDA or INTERP, reason="needs CUDA (compiled Triton kernels)")


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    # The interpreter consults TRITON_INTERPRET again while it runs (lazy imports inside triton),
    # so it is set around each test here, and unset for the other test modules.
    if INTERP:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    out, want = out.detach().double(), want.detach().double()
    assert not torch.isnan(out).any(), "NaN in output"
    denom = want.norm()
    return float((out - want).norm() / denom) if denom > 0 else float((out - want).norm())


def make_kpm(kind, b, tk, gen):
    if kind is None:
        return None
    if kind == "rand":
        kpm = torch.rand(b, tk, generator=gen) > 0.3
        kpm[:, -1] = True
        return kpm
    if kind == "left":   # left padding: in aligned mode the first rows see no key at all
        kpm = torch.ones(b, tk, dtype=torch.bool)
        kpm[0, : tk // 2] = False
        return kpm
    if kind == "all":    # a batch row with every key padded: every one of its rows is empty
        kpm = torch.rand(b, tk, generator=gen) > 0.5
        kpm[0] = False
        return kpm
    raise ValueError(kind)


def visible(tq, tk, mask, kpm):
    """(B or 1, Tq, Tk) bool: which keys each row sees."""
    allowed = ref.attention_mask(tq, tk, mask, kpm, torch.device("cpu"))
    if allowed is None:
        return torch.ones(1, tq, tk, dtype=torch.bool)
    return allowed[:, 0]


def check_attention(b, h, tq, tk, d, mask, kpm_kind, dtype, device, tol, seed=0, strided=False):
    gen = torch.Generator().manual_seed(seed)
    if strided:   # the bridge's layout: (B, T, H*d) split into heads, a non-contiguous view
        q = ref.split_heads(torch.randn(b, tq, h * d, generator=gen), h)
        k = ref.split_heads(torch.randn(b, tk, h * d, generator=gen), h)
        v = ref.split_heads(torch.randn(b, tk, h * d, generator=gen), h)
    else:
        q, k, v = (torch.randn(b, h, t, d, generator=gen) for t in (tq, tk, tk))
    g = torch.randn(b, h, tq, d, generator=gen)
    kpm = make_kpm(kpm_kind, b, tk, gen)
    q, k, v, g = (t.to(device=device, dtype=dtype) for t in (q, k, v, g))
    kpm = None if kpm is None else kpm.to(device)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)

    out = tx.cross_attention(q, k, v, mask, kpm)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    want = ref.cross_attention(q, k, v, mask, kpm)
    wq, wk, wv = torch.autograd.grad(want, (q, k, v), g)

    assert out.shape == want.shape and out.dtype == dtype
    for name, got, exp in (("out", out, want), ("dq", dq, wq), ("dk", dk, wk), ("dv", dv, wv)):
        err = rel_err(got.float(), exp.float())
        assert err <= tol, f"{name}: rel err {err:.2e} > {tol:.0e}"

    vis = visible(tq, tk, mask, None if kpm is None else kpm.cpu()).to(device)
    empty_rows = ~vis.any(-1)                                  # (B or 1, Tq)
    if empty_rows.any():   # exactly zero, not merely small
        e = empty_rows[:, None, :, None].expand_as(out)
        assert (out.detach()[e] == 0).all() and (dq[e] == 0).all()
    if kpm is not None:
        padded = (~kpm)[:, None, :, None].expand_as(dk)
        assert (dk[padded] == 0).all() and (dv[padded] == 0).all()


# --------------------------------------------------------------------------------------------
# CPU, interpreter
# --------------------------------------------------------------------------------------------
ATTN_CASES = [
    # b, h, tq, tk, d, mask, kpm
    (1, 1, 1, 1, 16, "aligned", None),          # all sizes 1
    (2, 3, 37, 37, 32, "aligned", None),        # primes, plain causal, crosses tile edges
    (1, 2, 19, 53, 24, "aligned", "rand"),      # Tq < Tk, head dim padded 24 -> 32
    (2, 1, 41, 23, 16, "context", "rand"),      # Tq > Tk in context mode
    (1, 2, 1, 29, 64, "aligned", "left"),       # one query (decode-shaped)
    (2, 2, 33, 33, 16, "aligned", "left"),      # left padding: the first rows see no key
    (2, 1, 17, 31, 80, "context", "all"),       # a fully padded batch row; head dim 80
    (1, 1, 64, 96, 128, "aligned", None),       # exact multiples of every tile, head dim 128
]


@interp_only
@pytest.mark.parametrize("b,h,tq,tk,d,mask,kpm", ATTN_CASES)
def test_attention_interpreter_fp32(b, h, tq, tk, d, mask, kpm):
    check_attention(b, h, tq, tk, d, mask, kpm, torch.float32, "cpu", tol=1e-5)


# Programs taken in groups of heads (_program_order): groups that do not divide B * H, a group
# larger than B * H, forward and both backward kernels. Group 1 is covered by every other test.
@interp_only
@pytest.mark.parametrize("group", ["2", "5", "2000000000"])
@pytest.mark.parametrize("b,h,tq,tk,d,mask,kpm", [(2, 3, 37, 37, 32, "aligned", None),
                                                   (1, 2, 19, 53, 24, "aligned", "rand"),
                                                   (3, 1, 40, 23, 16, "context", "rand")])
def test_attention_interpreter_head_groups(monkeypatch, group, b, h, tq, tk, d, mask, kpm):
    monkeypatch.setenv("CALM_FAST_TRITON_HEAD_GROUP", group)
    check_attention(b, h, tq, tk, d, mask, kpm, torch.float32, "cpu", tol=1e-5)


def test_auto_head_group_sizes():
    # H100 (132 SMs), bench shapes: 8 heads of 32 at T = 8192 (64 blocks of 128 rows).
    assert tx.auto_head_group(64, 32, 132) == 8
    for n_blk in (1, 3, 8, 64, 1000):
        for n_bh in (1, 2, 7, 31, 64, 256, 1000):
            g = tx.auto_head_group(n_blk, n_bh, 132)
            assert 1 <= g <= n_bh
            groups = -(-n_bh // g)
            last = n_bh - (groups - 1) * g
            assert last >= g - groups + 1, (n_blk, n_bh, g)   # near-equal groups, no stub at the end


def test_head_group_setting_is_clamped_to_the_heads(monkeypatch):
    # On the GPU, GROUP * blocks must stay within int32: a group above the head count is cut.
    monkeypatch.setenv("CALM_FAST_TRITON_HEAD_GROUP", "2000000000")
    assert tx._head_group(True, 64, 32, torch.device("cpu")) == 32
    monkeypatch.setenv("CALM_FAST_TRITON_HEAD_GROUP", "3")
    assert tx._head_group(False, 64, 32, torch.device("cpu")) == 3


@interp_only
@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_head_group_setting_is_checked(monkeypatch, value):
    monkeypatch.setenv("CALM_FAST_TRITON_HEAD_GROUP", value)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="CALM_FAST_TRITON_HEAD_GROUP"):
        tx.cross_attention(q, q, q, "aligned")


# CALM_FAST_TRITON_TMA=1: the forward reads K/V through tensor descriptors (TMA on Hopper; the
# interpreter emulates them). Every case above is TMA-eligible in fp32 (head dims multiples of 4).
@interp_only
@pytest.mark.parametrize("b,h,tq,tk,d,mask,kpm", ATTN_CASES)
def test_attention_interpreter_tma(monkeypatch, b, h, tq, tk, d, mask, kpm):
    monkeypatch.setenv("CALM_FAST_TRITON_TMA", "1")
    k = torch.randn(b, h, tk, d)
    assert tx._tma_ok(k, k)  # the descriptor path is the one under test
    check_attention(b, h, tq, tk, d, mask, kpm, torch.float32, "cpu", tol=1e-5)


@interp_only
def test_tma_nonfinite_rows_and_padded_keys_interpreter(monkeypatch):
    monkeypatch.setenv("CALM_FAST_TRITON_TMA", "1")
    check_nonfinite_rows("cpu")
    check_padded_keys_are_ignored(tx.cross_attention, "cpu")


def test_tma_only_where_its_layout_rules_hold(monkeypatch):
    k = torch.randn(2, 3, 40, 16)
    monkeypatch.delenv("CALM_FAST_TRITON_TMA", raising=False)
    assert not tx._tma_ok(k, k)                      # off by default
    monkeypatch.setenv("CALM_FAST_TRITON_TMA", "1")
    if not INTERP:
        pytest.skip("eligibility on CPU tensors is decided by the interpreter")
    assert tx._tma_ok(k, k)
    assert tx._tma_ok(k[:, :, 7:], k)                # row offset 7 * 64 bytes: still aligned
    assert not tx._tma_ok(torch.randn(2 * 3 * 40 * 16 + 1)[1:].view(2, 3, 40, 16), k)  # 4-byte offset
    assert not tx._tma_ok(torch.randn(2, 3, 40, 3), k)  # 12-byte rows
    assert not tx._tma_ok(k, torch.randn(2, 3, 40, 17)[..., :16])  # rows 68 bytes apart


@interp_only
def test_attention_interpreter_strided_views():
    # q/k/v as split_heads() views of (B, T, H*d): no copies needed, same answer.
    check_attention(2, 3, 21, 26, 16, "aligned", "rand", torch.float32, "cpu", tol=1e-5,
                    strided=True)


@interp_only
def test_attention_output_layout_merges_for_free():
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    out = tx.cross_attention(q, k, v, "context")
    merged = ref.merge_heads(out)
    assert merged.data_ptr() == out.data_ptr() and merged.is_contiguous()


def check_nonfinite_rows(device):
    """Rows whose allowed scores are all -inf (an infinite q, negative keys) are NaN, as the
    reference's softmax gives; a row the mask leaves without keys is 0; a NaN q poisons its
    row only. Both masks, with and without padding."""
    q = torch.randn(2, 2, 4, 16)
    k = -torch.rand(2, 2, 6, 16) - 0.1  # every key negative in every dim
    v = torch.randn(2, 2, 6, 16)
    q[0, 0, 1] = float("inf")    # q . k = -inf for every key
    q[1, 1, 2, 3] = float("nan")
    kpm = torch.ones(2, 6, dtype=torch.bool)
    kpm[1] = False                # batch 1 sees no key at all
    kpm[0, 0] = False
    for mask in ("aligned", "context"):
        for m in (None, kpm):
            want = ref.cross_attention(q.double(), k.double(), v.double(), mask, m)
            got = tx.cross_attention(q.to(device), k.to(device), v.to(device), mask,
                                     None if m is None else m.to(device)).cpu()
            torch.testing.assert_close(got.double(), want, equal_nan=True, atol=1e-5, rtol=1e-5)
            assert got[0, 0, 1].isnan().all() and (m is None or (got[1] == 0).all())


@interp_only
def test_attention_nonfinite_rows_interpreter():
    check_nonfinite_rows("cpu")


@interp_only
def test_padded_nonfinite_keys_interpreter():
    check_padded_keys_are_ignored(tx.cross_attention, "cpu")
    check_decode_padded_rows_are_ignored(lambda h_b, *rest: tx.bridge_decode_step(h_b, None, *rest), "cpu")


@interp_only
def test_attention_causality_holds():
    # Aligned mode: changing key/value j must not change rows that cannot see it.
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, t, 16, generator=gen) for t in (20, 24, 24))
    base = tx.cross_attention(q, k, v, "aligned")
    k2, v2 = k.clone(), v.clone()
    k2[..., 15, :] += 3.0
    v2[..., 15, :] -= 3.0
    moved = tx.cross_attention(q, k2, v2, "aligned")
    first_seeing = 15 - (24 - 20)   # row i sees j iff j <= i + (Tk - Tq)
    assert torch.equal(base[..., :first_seeing, :], moved[..., :first_seeing, :])
    assert not torch.allclose(base[..., first_seeing:, :], moved[..., first_seeing:, :])


DECODE_CASES = [
    # b, h, hd, d_a, s, pos, context, kpm
    (1, 2, 16, 24, 40, 37, False, None),        # aligned, several splits
    (3, 3, 24, 20, 29, 11, False, "rand"),      # B=3, head dim 24, padding
    (2, 2, 32, 16, 33, 33, True, "rand"),       # context mode over the whole cache
    (1, 4, 16, 8, 20, 0, False, None),          # first step
    (2, 2, 16, 16, 12, 0, True, None),          # context mode, empty cache: output = h_b
    (2, 2, 16, 16, 24, 10, False, "left"),      # aligned, a row whose keys are all padded
]


def check_decode(b, h, hd, d_a, s, pos, context, kpm_kind, dtype, device, tol, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d_b = h * hd
    h_b = torch.randn(b, 1, d_b, generator=gen)
    h_a = None if context else torch.randn(b, 1, d_a, generator=gen)
    w_q = torch.randn(d_b, d_b, generator=gen) / d_b ** 0.5
    w_kv = torch.randn(2 * d_b, d_a, generator=gen) / d_a ** 0.5
    b_kv = torch.randn(2 * d_b, generator=gen)
    w_o = torch.randn(d_b, d_b, generator=gen) / d_b ** 0.5
    k_cache = torch.randn(b, h, s, hd, generator=gen)
    v_cache = torch.randn(b, h, s, hd, generator=gen)
    kpm = None
    if kpm_kind == "rand":
        kpm = torch.rand(b, s, generator=gen) > 0.3
    elif kpm_kind == "left":
        kpm = torch.ones(b, s, dtype=torch.bool)
        kpm[0, : pos + 1] = False
    args = [h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache]
    args = [None if t is None else t.to(device=device, dtype=dtype) for t in args]
    kpm = None if kpm is None else kpm.to(device)
    ref_args = [None if t is None else t.clone() for t in args]

    out = tx.bridge_decode_step(*args, pos, h, kpm)
    if context and pos == 0:
        # No cached row to attend to: the attention is zero by definition (the reference's
        # amax cannot reduce an empty axis), so the step returns h_b unchanged.
        want = ref_args[0]
    else:
        want = ref.bridge_decode_step(*ref_args, pos, h, kpm)
    assert out.shape == (b, 1, d_b) and out.dtype == dtype
    err = rel_err(out.float(), want.float())
    assert err <= tol, f"decode out: rel err {err:.2e} > {tol:.0e}"
    for name, got, exp in (("k_cache", args[6], ref_args[6]), ("v_cache", args[7], ref_args[7])):
        if context:
            assert torch.equal(got, exp), f"{name} changed in context mode"
        else:
            others = torch.ones(s, dtype=torch.bool)
            others[pos] = False
            assert torch.equal(got[:, :, others], exp[:, :, others]), f"{name}: other rows changed"
            err = rel_err(got[:, :, pos].float(), exp[:, :, pos].float())
            assert err <= tol, f"{name} row {pos}: rel err {err:.2e}"


@interp_only
@pytest.mark.parametrize("b,h,hd,d_a,s,pos,context,kpm", DECODE_CASES)
def test_decode_step_interpreter_fp32(b, h, hd, d_a, s, pos, context, kpm):
    check_decode(b, h, hd, d_a, s, pos, context, kpm, torch.float32, "cpu", tol=1e-5)


@interp_only
def test_dispatch_finds_the_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tx.supports(torch.device("cpu"), torch.float32)
    assert "triton" in ops.available_backends("cpu", torch.float32)
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    got = ops.cross_attention(q, k, v, "aligned", backend="triton")
    assert rel_err(got, ref.cross_attention(q, k, v, "aligned")) <= 1e-5
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not tx.supports(torch.device("cpu"), torch.float32)


@interp_only
def test_compile_fullgraph_traces_the_ops():
    # aot_eager: proves dynamo + AOTAutograd trace fwd, bwd and the mutating decode op without
    # graph breaks, with no C++ toolchain needed on CPU.
    def attn_loss(q, k, v, kpm):
        return tx.cross_attention(q, k, v, "aligned", kpm).square().sum()

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, t, 16, generator=gen, requires_grad=True) for t in (7, 11, 11))
    kpm = torch.rand(1, 11, generator=gen) > 0.2
    compiled = torch.compile(attn_loss, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, kpm)
    grads = torch.autograd.grad(loss, (q, k, v))
    want = torch.autograd.grad(attn_loss(q, k, v, kpm), (q, k, v))
    for got, exp in zip(grads, want):
        assert rel_err(got, exp) <= 1e-5

    def step(h_b, h_a, w_q, w_kv, b_kv, w_o, kc, vc):
        return tx.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kc, vc, 3, 2, None)

    d_b, d_a, s = 32, 8, 6
    args = [torch.randn(1, 1, d_b), torch.randn(1, 1, d_a), torch.randn(d_b, d_b),
            torch.randn(2 * d_b, d_a), torch.randn(2 * d_b), torch.randn(d_b, d_b),
            torch.randn(1, 2, s, 16), torch.randn(1, 2, s, 16)]
    ref_args = [t.clone() for t in args]
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    want = ref.bridge_decode_step(*ref_args, 3, 2, None)
    assert rel_err(out, want) <= 1e-5
    assert rel_err(args[6], ref_args[6]) <= 1e-6   # the cache write survived functionalization


@interp_only
def test_opcheck_interpreter():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, t, 16, generator=gen, requires_grad=True) for t in (5, 8, 8))
    kpm = torch.rand(1, 8, generator=gen) > 0.2
    torch.library.opcheck(torch.ops.calm_fast.triton_xattn_fwd.default, (q, k, v, True, kpm))
    torch.library.opcheck(torch.ops.calm_fast.triton_xattn_fwd.default, (q, k, v, False, None))
    d_b, s = 32, 6
    dec = (torch.randn(1, 1, d_b), torch.randn(1, 1, 8), torch.randn(d_b, d_b),
           torch.randn(2 * d_b, 8), torch.randn(2 * d_b), torch.randn(d_b, d_b),
           torch.randn(1, 2, s, 16), torch.randn(1, 2, s, 16), 2, 2, None)
    torch.library.opcheck(torch.ops.calm_fast.triton_bridge_decode_step.default, dec)


@interp_only
@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: tx.cross_attention(q, k, v, "causal"), "mask must be one of"),
    (lambda q, k, v: tx.cross_attention(q, k[:, :, :3], v[:, :, :3], "aligned"), "Tq <= Tk"),
    (lambda q, k, v: tx.cross_attention(q, k, v, "context", torch.ones(1, 4)), "key_padding_mask"),
    (lambda q, k, v: tx.cross_attention(q, k, v[..., :8], "context"), "disagree"),
    (lambda q, k, v: tx.cross_attention(q[..., :0], k[..., :0], v[..., :0], "context"),
     r"head dim must be in \[1, 256\]"),  # was a ZeroDivisionError
])
def test_attention_bad_input(call, match):
    q, k, v = (torch.randn(1, 1, 4, 16) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


def check_decode_nonfinite(device):
    """A head whose kept scores are all -inf (q overflows to inf, every key negative) makes the
    step NaN, as the reference's softmax does; a head the mask leaves without keys adds 0."""
    h, d, s, d_a = 2, 16, 9, 8
    d_b = h * d
    gen = torch.Generator().manual_seed(5)
    h_b = torch.zeros(1, 1, d_b)
    h_b[0, 0, :d] = 1e30
    w_q = torch.eye(d_b) * 1e30  # q of head 0 = 1e60 -> inf in fp32
    w_o = torch.randn(d_b, d_b, generator=gen) * 0.1
    w_kv, b_kv = torch.randn(2 * d_b, d_a, generator=gen) * 0.1, torch.zeros(2 * d_b)
    k = -torch.rand(1, h, s, d, generator=gen) - 0.1
    v = torch.randn(1, h, s, d, generator=gen)
    want = ref.bridge_decode_step(h_b, None, w_q, w_kv, b_kv, w_o, k.clone(), v.clone(), s, h)

    def step(kpm=None):  # context mode: attend over all s cached rows
        on = [t.to(device) for t in (h_b, w_q, w_kv, b_kv, w_o, k.clone(), v.clone())]
        return tx.bridge_decode_step(on[0], None, *on[1:], s, h,
                                     None if kpm is None else kpm.to(device)).cpu()
    assert want.isnan().all() and step().isnan().all()
    assert torch.equal(step(torch.zeros(1, s, dtype=torch.bool)), h_b)  # no key kept: h_b


@interp_only
def test_decode_nonfinite_interpreter():
    check_decode_nonfinite("cpu")


@interp_only
def test_decode_bad_input():
    d_b, s = 32, 6
    args = [torch.randn(1, 1, d_b), torch.randn(1, 1, 8), torch.randn(d_b, d_b),
            torch.randn(2 * d_b, 8), torch.randn(2 * d_b), torch.randn(d_b, d_b),
            torch.randn(1, 2, s, 16), torch.randn(1, 2, s, 16)]
    with pytest.raises(ValueError, match="pos=6"):
        tx.bridge_decode_step(*args, 6, 2)
    with pytest.raises(ValueError, match="n_heads=3"):
        tx.bridge_decode_step(*args, 0, 3)
    bad = list(args)
    bad[3] = torch.randn(d_b, 8)
    with pytest.raises(ValueError, match="w_kv"):
        tx.bridge_decode_step(*bad, 0, 2)


def test_interpreter_suite_in_subprocess():
    """When triton was imported before this module could switch the interpreter on, run the
    CPU tests of this file in a fresh process that has it on from the start."""
    if INTERP or _CUDA:
        pytest.skip("the interpreter tests run in this process (or CUDA tests replace them)")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           __file__, "-k", "not in_subprocess"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# GPU, compiled kernels
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_autotune(monkeypatch):
    monkeypatch.setenv("CALM_FAST_TRITON_AUTOTUNE", "0")


# Each distinct (dtype, head dim, mask, padding) is a compile (several seconds, fp32 more), so
# bf16 runs every case and fp16/fp32 a few.
GPU_ATTN_CASES = [
    (2, 4, 257, 257, 64, "aligned", None),
    (1, 2, 100, 300, 128, "context", "rand"),
    (2, 2, 128, 512, 96, "aligned", "left"),
    (1, 2, 1, 1000, 128, "aligned", "rand"),
    (1, 2, 70, 130, 256, "aligned", None),
    (2, 2, 64, 64, 16, "context", "all"),
]
GPU_ATTN_PARAMS = ([(*c, torch.bfloat16, 1e-2) for c in GPU_ATTN_CASES]
                   + [(*GPU_ATTN_CASES[0], torch.float16, 1e-2)]
                   + [(*GPU_ATTN_CASES[i], torch.float32, 1e-5) for i in (0, 2)])


@gpu_only
@pytest.mark.parametrize("b,h,tq,tk,d,mask,kpm,dtype,tol", GPU_ATTN_PARAMS)
def test_attention_gpu(no_autotune, b, h, tq, tk, d, mask, kpm, dtype, tol):
    check_attention(b, h, tq, tk, d, mask, kpm, dtype, "cuda", tol)


@gpu_only
@pytest.mark.parametrize("group", ["auto", "3"])
def test_attention_gpu_head_groups(no_autotune, monkeypatch, group):
    monkeypatch.setenv("CALM_FAST_TRITON_HEAD_GROUP", group)
    check_attention(2, 5, 700, 700, 128, "aligned", "rand", torch.bfloat16, "cuda", 1e-2)
    check_attention(3, 2, 333, 1000, 64, "context", None, torch.bfloat16, "cuda", 1e-2)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16])  # fp16 takes the same path; compiles cost lease time
def test_attention_gpu_tma(no_autotune, monkeypatch, dtype):
    monkeypatch.setenv("CALM_FAST_TRITON_TMA", "1")
    hopper = torch.cuda.get_device_capability()[0] >= 9
    kv = torch.empty(1, 1, 8, 128, device="cuda", dtype=dtype)
    assert tx._tma_ok(kv, kv) == hopper and not tx._tma_ok(kv.float(), kv.float())  # 16-bit only
    check_attention(2, 5, 700, 700, 128, "aligned", "rand", dtype, "cuda", 1e-2)
    check_attention(3, 2, 333, 1000, 64, "context", None, dtype, "cuda", 1e-2)
    check_attention(1, 2, 70, 130, 96, "aligned", "left", dtype, "cuda", 1e-2)  # padded head dim
    check_padded_keys_are_ignored(tx.cross_attention, "cuda", dtype)


@gpu_only
@pytest.mark.parametrize("mask", ["aligned", "context"])
def test_attention_gpu_bf16_backward_with_alike_value_rows(no_autotune, mask):
    check_16bit_grads_with_alike_values("triton", "cuda", torch.bfloat16, mask)


@gpu_only
def test_attention_gpu_nonfinite_rows(no_autotune):
    check_nonfinite_rows("cuda")


@gpu_only
def test_decode_step_gpu_nonfinite(no_autotune):
    check_decode_nonfinite("cuda")


@gpu_only
def test_padded_nonfinite_keys_gpu(no_autotune):
    # bf16 only: fp32 would add compiles (see GPU_ATTN_CASES) for the same masking code.
    check_padded_keys_are_ignored(tx.cross_attention, "cuda", torch.bfloat16)
    check_decode_padded_rows_are_ignored(lambda h_b, *rest: tx.bridge_decode_step(h_b, None, *rest),
                                         "cuda", torch.bfloat16)


@gpu_only
def test_attention_gpu_strided_bf16(no_autotune):
    check_attention(2, 4, 200, 333, 64, "aligned", "rand", torch.bfloat16, "cuda", 1e-2,
                    strided=True)


GPU_DECODE_CASES = DECODE_CASES + [(1, 32, 128, 2048, 2048, 1500, False, None),
                                   (4, 8, 64, 256, 700, 699, True, "rand")]
GPU_DECODE_PARAMS = ([(*c, torch.bfloat16, 1e-2) for c in GPU_DECODE_CASES]
                     + [(*GPU_DECODE_CASES[i], torch.float32, 1e-5) for i in (1, 6)])


@gpu_only
@pytest.mark.parametrize("b,h,hd,d_a,s,pos,context,kpm,dtype,tol", GPU_DECODE_PARAMS)
def test_decode_step_gpu(b, h, hd, d_a, s, pos, context, kpm, dtype, tol):
    check_decode(b, h, hd, d_a, s, pos, context, kpm, dtype, "cuda", tol)


@gpu_only
def test_opcheck_gpu(no_autotune):
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, t, 64, generator=gen).cuda().bfloat16().requires_grad_()
               for t in (65, 130, 130))
    kpm = (torch.rand(2, 130, generator=gen) > 0.2).cuda()
    torch.library.opcheck(torch.ops.calm_fast.triton_xattn_fwd.default, (q, k, v, True, kpm))
    torch.library.opcheck(torch.ops.calm_fast.triton_xattn_fwd.default, (q, k, v, False, None))
    torch.library.opcheck(torch.ops.calm_fast.triton_xattn_fwd.default, (q, k, v, True, kpm, True))
    d_b, s = 128, 40
    dec = tuple(t.cuda() for t in (torch.randn(1, 1, d_b), torch.randn(1, 1, 32),
                                   torch.randn(d_b, d_b), torch.randn(2 * d_b, 32),
                                   torch.randn(2 * d_b), torch.randn(d_b, d_b),
                                   torch.randn(1, 2, s, 64), torch.randn(1, 2, s, 64)))
    torch.library.opcheck(torch.ops.calm_fast.triton_bridge_decode_step.default,
                          dec + (5, 2, None))


@gpu_only
def test_compile_inductor_gpu(no_autotune):
    def loss_fn(q, k, v):
        return tx.cross_attention(q, k, v, "aligned").float().square().sum()

    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    compiled = torch.compile(loss_fn, fullgraph=True)
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss_fn(q, k, v), (q, k, v))
    for got, exp in zip(grads, want):
        assert rel_err(got.float(), exp.float()) <= 1e-3


def test_decode_step_refuses_caches_it_cannot_write():
    """The kernels write the new K/V row through pointers: an expand()ed cache (rows sharing
    memory) or one memory for both caches would be a silently wrong cache, so both are refused
    before any launch (no interpreter needed)."""
    gen = torch.Generator().manual_seed(3)
    b, h, hd, d_a, s, pos = 2, 2, 4, 3, 6, 2
    d_b = h * hd
    h_b, h_a = torch.randn(b, 1, d_b, generator=gen), torch.randn(b, 1, d_a, generator=gen)
    w_q, w_o = torch.randn(d_b, d_b, generator=gen), torch.randn(d_b, d_b, generator=gen)
    w_kv, b_kv = torch.randn(2 * d_b, d_a, generator=gen), torch.randn(2 * d_b, generator=gen)
    kc, vc = torch.randn(b, h, s, hd, generator=gen), torch.randn(b, h, s, hd, generator=gen)
    with pytest.raises(ValueError, match="k_cache is written in place but elements share memory"):
        tx.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kc[:1].expand_as(kc), vc, pos, h)
    with pytest.raises(ValueError, match="k_cache: overlaps v_cache"):
        tx.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kc, kc, pos, h)
    with pytest.raises(ValueError, match="k_cache: overlaps v_cache"):
        kv = torch.randn(b, h, s, 2, hd, generator=gen)  # interleaved: refused, conservatively
        tx.bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, kv[..., 0, :], kv[..., 1, :], pos, h)
    # A cache over an input the kernels read while they write it: refused as csrc/validate.cpp
    # refuses it (the interpreter computed a wrong output and cache here before the check).
    kc_keep, vc_keep = kc.clone(), vc.clone()
    ha_in_cache = kc[:, 0, pos, :d_a].unsqueeze(1)   # h_a (B, 1, D_A) a view of k_cache's row
    with pytest.raises(ValueError, match="k_cache: overlaps the input h_a"):
        tx.bridge_decode_step(h_b, ha_in_cache, w_q, w_kv, b_kv, w_o, kc, vc, pos, h)
    buf = torch.randn(kc.numel() + w_q.numel(), generator=gen)
    with pytest.raises(ValueError, match="v_cache: overlaps the input w_q"):
        tx.bridge_decode_step(h_b, h_a, buf[:w_q.numel()].view(w_q.shape), w_kv, b_kv, w_o, kc,
                              buf[w_q.numel() // 2:][:vc.numel()].view(vc.shape), pos, h)
    with pytest.raises(ValueError, match="k_cache: overlaps the input h_b"):
        tx.bridge_decode_step(kc.view(-1)[:b * d_b].view(b, 1, d_b), h_a, w_q, w_kv, b_kv, w_o,
                              kc, vc, pos, h)
    assert torch.equal(kc, kc_keep) and torch.equal(vc, vc_keep)  # refused before any write


def test_decode_step_batch_zero():
    """An empty batch returns an empty (0, 1, D_B) result, as the other backends do (the kernels'
    batch tile would be 0 wide)."""
    d_b, h, s = 8, 2, 5
    args = (torch.randn(0, 1, d_b), torch.randn(0, 1, 3), torch.randn(d_b, d_b), torch.randn(2 * d_b, 3),
            torch.randn(2 * d_b), torch.randn(d_b, d_b), torch.randn(0, h, s, d_b // h),
            torch.randn(0, h, s, d_b // h))
    for h_a, w_kv, b_kv in ((args[1], args[3], args[4]), (None, None, None)):  # aligned, context
        want = ref.bridge_decode_step(args[0], h_a, args[2], w_kv, b_kv, *args[5:], 2, h)
        got = tx.bridge_decode_step(args[0], h_a, args[2], w_kv, b_kv, *args[5:], 2, h)
        assert got.shape == want.shape == (0, 1, d_b)


@interp_only
@pytest.mark.parametrize("mask", ["aligned", "context"])
def test_fp16_backward_with_alike_value_rows_interpreter(mask):
    """Regression (audit, session 10): delta = dout·out came from the fp16-rounded output, whose
    P·V product also rounds P: with alike value rows dq, dk were 60x less accurate than the
    reference's. Training now keeps an fp32 output whose P·V adds P's rounding error back
    (SPLIT_P). fp16 because the interpreter computes fp16 right (bf16 is the GPU test's)."""
    check_16bit_grads_with_alike_values("triton", "cpu", torch.float16, mask)


@interp_only
@pytest.mark.parametrize("d,top", [(1, 2.56e38), (2, 3.37e38)])  # top q·k: inf once x log2(e)/sqrt(d)
def test_scores_near_flt_max_at_head_dims_1_and_2(d, top):
    """At head dims 1 and 2, log2(e)/sqrt(d) > 1: a finite score above ~2.36e38 scaled into base 2
    overflowed to inf and the row came out NaN where the reference's softmax is finite. Those
    head dims run in base e now (_score_scale): forward, backward and the decode step."""
    gen = torch.Generator().manual_seed(1)
    big = (top / d) ** 0.5                           # q·k of the first key: top
    q = torch.full((1, 2, 3, d), big)
    k = torch.tensor([1.0, 0.7, 0.0, -0.5]).view(1, 1, 4, 1).expand(1, 2, 4, d) * big
    k = k.contiguous()
    v = torch.randn(1, 2, 4, d, generator=gen)
    dout = torch.randn(1, 2, 3, d, generator=gen)
    for mask in ("aligned", "context"):
        grads = []
        for attn in (ref.cross_attention, tx.cross_attention):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            out = attn(qq, kk, vv, mask)
            grads.append([out] + list(torch.autograd.grad(out, (qq, kk, vv), dout)))
        for name, w, g in zip(("out", "dq", "dk", "dv"), *grads):
            assert torch.isfinite(w).all() and rel_err(g, w) <= 1e-5, (mask, name)
    d_b = 2 * d  # the decode step, context mode, two heads of width d
    h_b, w_o = torch.ones(1, 1, d_b), torch.eye(d_b)
    w_q = torch.eye(d_b) * big
    kc, vc = k, v   # (1, 2, 4, d): the cached rows are those keys and values
    want = ref.bridge_decode_step(h_b, None, w_q, None, None, w_o, kc, vc, 4, 2)
    got = tx.bridge_decode_step(h_b, None, w_q, None, None, w_o, kc, vc, 4, 2)
    assert torch.isfinite(want).all() and rel_err(got, want) <= 1e-5


@interp_only
def test_fp16_training_forward_keeps_inf_values_inf():
    """The training forward's second P·V product (SPLIT_P) multiplied P's rounding error, 0 or
    of either sign, by an inf value: the output column turned NaN where the reference and the
    inference forward give inf (review, session 10). Non-finite values skip that product."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 16, generator=gen) for _ in range(3))
    v[0, 0, 1, 3] = float("inf")
    q, k, v = q.half(), k.half(), v.half()
    want = ref.cross_attention(q.double(), k.double(), v.double(), "context")
    with torch.no_grad():
        inference = tx.cross_attention(q, k, v, "context")
    training = tx.cross_attention(q.clone().requires_grad_(), k, v, "context")
    for got in (inference, training):
        assert torch.equal(got[..., 3].isinf(), want[..., 3].isinf()) and want[..., 3].isinf().all()
        assert not got.isnan().any()


@interp_only
def test_scores_below_minus_1e30_still_normalise():
    """Rows whose finite scores are all below -1e30 (huge q, k): the running max used to start at
    -1e30, so every p underflowed to 0 and the row came out NaN; it starts at -FLT_MAX now."""
    q = torch.full((1, 1, 2, 1), 1e18)
    k = torch.tensor([-1e18, -2e18, -3e18]).view(1, 1, 3, 1)  # scores -1e36 ... -3e36
    v = torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3, 1)
    for mask in ("aligned", "context"):
        want = ref.cross_attention(q, k, v, mask)
        got = tx.cross_attention(q, k, v, mask)
        assert torch.isfinite(want).all() and rel_err(got, want) <= 1e-6, mask
    d_b, s = 2, 3  # the decode step, context mode: every cached score is about -1e36
    h_b, w_q, w_o = torch.ones(1, 1, d_b), torch.eye(d_b) * 1e18, torch.eye(d_b)
    kc = torch.full((1, 1, s, d_b), -1e18)
    kc[0, 0, 1] *= 2
    vc = torch.arange(s * d_b, dtype=torch.float32).view(1, 1, s, d_b)
    want = ref.bridge_decode_step(h_b, None, w_q, None, None, w_o, kc, vc, s, 1)
    got = tx.bridge_decode_step(h_b, None, w_q, None, None, w_o, kc, vc, s, 1)
    assert torch.isfinite(want).all() and rel_err(got, want) <= 1e-6
