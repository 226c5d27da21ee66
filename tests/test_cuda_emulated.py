"""The CUDA kernels of csrc/cuda, run on the CPU by the emulator (csrc/cuda/emulator), against
ops/reference.py: the same sources nvcc compiles, built here with g++ -DCF_CUDA_EMULATOR into
a library with the C API (cf_attn_fwd_cuda, cf_decode_step_cuda), fed CPU tensors
(tests/cuda_emulator.py).

What this checks where no GPU is: indexing, masks, key padding, empty rows, the tensor-core
kernels' tiling (mma.sync, ldmatrix and cp.async emulated by their PTX layouts; WMMA with an
emulated fragment), the decode step's three phases, its split-K chunking and merge, for
several emulated grid sizes (CF_EMU_SMS) and thread orders (CF_EMU_SEED). Races are checked by
running these same cases under ThreadSanitizer (tests/test_cuda_racecheck.py). What it cannot
check: speed, and what only real hardware shows; that stays with tests/test_cuda_ops.py on a
GPU (bench/gpu_check.sh)."""
from __future__ import annotations

import ctypes

import pytest
import torch

from calm_fast.ops import reference as ref
from cuda_emulator import CfTensor, _desc, attend, build, decode_step, emulated_gpu
from padding_checks import check_decode_padded_rows_are_ignored, check_padded_keys_are_ignored
from test_native_ops import _decode_case, check_zero_augment_width_appends_the_bias, make_kpm, rel

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@pytest.fixture(scope="module")
def emu():
    return build()


KNOBS = ("-DCF_DECODE_X_SMEM=1", "-DCF_DECODE_STREAM_WEIGHTS=1", "-DCF_DECODE_DATAFLOW=1")


@pytest.fixture(scope="module")
def emu_knobs():
    """The decode step's experimental knobs on (bench/gpu_decode_sweep.sh times them on a GPU):
    input vectors staged in shared memory, weights streamed past L1, no grid barriers (counters)."""
    return build(*KNOBS)


# (B, H, Tq, Tk, d), mask, key padding, dtype. bf16/fp16 with d = 64/128 take the mma.sync
# kernel (attn_fwd_mma.cu) or, with CALM_FAST_CUDA_ATTN=wmma, the WMMA one (64-row query tiles,
# 64-key tiles: 67/129/131/300 leave remainders); the rest take the generic kernel.
ATTN_CASES = [((2, 2, 67, 131, 64), "aligned", "random", torch.bfloat16),
              ((1, 2, 70, 70, 128), "context", "empty_row", torch.float16),
              ((2, 3, 1, 37, 128), "aligned", "none", torch.bfloat16),
              ((1, 1, 129, 300, 64), "aligned", "left_pad", torch.float16),
              ((1, 1, 1, 1, 64), "aligned", "none", torch.bfloat16),
              ((1, 2, 13, 13, 7), "aligned", "random", torch.float32),
              ((3, 1, 5, 70, 33), "context", "random", torch.float32),
              ((3, 1, 5, 70, 33), "aligned", "empty_row", torch.bfloat16),
              ((1, 1, 9, 20, 256), "context", "none", torch.float16),
              ((1, 1, 17, 40, 128), "aligned", "left_pad", torch.float32)]


def _attn_inputs(shape, kind, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h, tq, tk, d = shape
    q, k, v = (torch.randn(b, h, t, d, generator=gen).to(dtype) for t in (tq, tk, tk))
    return q, k, v, make_kpm(b, tk, kind, gen)


def _tensor_core(shape, dtype) -> bool:
    return dtype != torch.float32 and shape[-1] in (64, 128)


ATTN_PARAMS = [case + ("mma",) for case in ATTN_CASES] + \
              [case + ("wmma",) for case in ATTN_CASES if _tensor_core(case[0], case[3])]


@pytest.mark.parametrize("shape,mask,kind,dtype,kernel", ATTN_PARAMS,
                         ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else str(x))
def test_attention_forward_matches_reference(emu, shape, mask, kind, dtype, kernel):
    q, k, v, kpm = _attn_inputs(shape, kind, dtype)
    with emulated_gpu(CALM_FAST_CUDA_ATTN=kernel):
        out, lse = attend(emu, q, k, v, mask, kpm)
    want = ref.cross_attention(q.double(), k.double(), v.double(), mask, kpm)
    assert rel(out, want) <= TOL[dtype]
    scores = (q.double() @ k.double().transpose(-1, -2)) / shape[-1] ** 0.5
    allowed = ref.attention_mask(shape[2], shape[3], mask, kpm, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    want_lse = torch.logsumexp(scores, dim=-1)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    fin = torch.isfinite(want_lse)
    assert torch.allclose(lse[fin].double(), want_lse[fin], atol=2e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("dtype,head_dim,kernel", [(torch.bfloat16, 64, "mma"), (torch.float16, 128, "mma"),
                                                   (torch.bfloat16, 64, "wmma"), (torch.float32, 16, "mma")])
def test_padded_nonfinite_keys_are_ignored(emu, dtype, head_dim, kernel):
    with emulated_gpu(CALM_FAST_CUDA_ATTN=kernel):
        check_padded_keys_are_ignored(lambda q, k, v, mask, kpm: attend(emu, q, k, v, mask, kpm)[0], "cpu", dtype,
                                      grads=False, head_dim=head_dim)


def test_mma_and_wmma_kernels_agree_and_unaligned_rows_fall_back(emu):
    """The two tensor-core kernels differ only in summation order; rows that are not 16-byte
    aligned (here a pitch of 68 elements) cannot use cp.async/ldmatrix and take the WMMA path."""
    q, k, v, kpm = _attn_inputs((2, 2, 67, 131, 64), "random", torch.bfloat16, seed=5)
    outs = {}
    for kernel in ("mma", "wmma"):
        with emulated_gpu(CALM_FAST_CUDA_ATTN=kernel):
            outs[kernel] = attend(emu, q, k, v, "aligned", kpm)
    assert (outs["mma"][0].float() - outs["wmma"][0].float()).abs().max() <= 2e-2
    assert torch.allclose(outs["mma"][1], outs["wmma"][1], atol=1e-4)
    wide = torch.zeros(2, 2, 131, 68, dtype=torch.bfloat16)
    wide[..., :64] = k
    k_unaligned = wide[..., :64]
    assert k_unaligned.stride(2) == 68
    want = ref.cross_attention(q.double(), k.double(), v.double(), "aligned", kpm)
    assert rel(attend(emu, q, k_unaligned, v, "aligned", kpm)[0], want) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("shape,dtype", [((2, 2, 67, 131, 64), torch.bfloat16), ((1, 2, 13, 13, 7), torch.float32)])
def test_attention_does_not_depend_on_thread_order(emu, shape, dtype):
    """Each thread order (a shuffled schedule per round of the emulator) gives the same bits:
    no thread reads shared memory another writes without a barrier between them."""
    q, k, v, kpm = _attn_inputs(shape, "random", dtype, seed=3)
    base, _ = attend(emu, q, k, v, "aligned", kpm)
    for seed in (1, 2):
        with emulated_gpu(CF_EMU_SEED=seed):
            assert torch.equal(attend(emu, q, k, v, "aligned", kpm)[0], base), seed


def test_attention_kernel_choice_is_checked(emu):
    q, k, v, kpm = _attn_inputs((1, 1, 5, 9, 64), "none", torch.bfloat16)
    with emulated_gpu(CALM_FAST_CUDA_ATTN="mma"):
        attend(emu, q, k, v)
    with emulated_gpu(CALM_FAST_CUDA_ATTN="WMMA"), pytest.raises(ValueError, match="CALM_FAST_CUDA_ATTN.*'WMMA'"):
        attend(emu, q, k, v)


def test_attention_refuses_head_dims_over_256(emu):
    q = torch.zeros(1, 1, 2, 264)
    status = emu.cf_attn_fwd_cuda(_desc(q), _desc(q), _desc(q), None, 0, _desc(torch.empty_like(q)),
                                  _desc(torch.empty(1, 1, 2)), None)
    assert status != 0 and b"264" in emu.cf_last_error()


# b, h, d, d_a, s, pos, context, key padding, dtype. B = 5 > 4 batch rows per weight pass;
# d = 64/128 with 16-byte-aligned rows take the vector cache path, d = 1/5/16 the scalar one.
DECODE_CASES = [(1, 1, 1, 1, 1, 0, False, "none", torch.float32),
                (3, 3, 5, 13, 7, 6, False, "random", torch.float32),
                (5, 2, 64, 96, 130, 100, False, "none", torch.float32),
                (1, 8, 32, 64, 300, 257, False, "none", torch.float32),
                (2, 4, 16, 40, 50, 17, True, "empty_row", torch.float32),
                (2, 2, 128, 64, 90, 89, False, "random", torch.bfloat16),
                (1, 4, 64, 48, 200, 150, True, "none", torch.float16),
                (1, 2, 16, 40, 64, 0, False, "none", torch.float32)]  # pos 0: the new row is read first


def _decode_args(b, h, d, d_a, s, context, kind, dtype):
    args = list(_decode_case(b, h, d, d_a, s, dtype, context, kind, seed=s))
    if context:
        args[1] = args[3] = args[4] = None
    return args


def _decode_want(args, pos, h):
    up = [None if t is None else t.double() for t in args]
    k_ref, v_ref = up[6].clone(), up[7].clone()
    return ref.bridge_decode_step(up[0], up[1], up[2], up[3], up[4], up[5], k_ref, v_ref, pos, h, args[8]), k_ref, v_ref


@pytest.mark.parametrize("build", ["emu", "emu_knobs"])
@pytest.mark.parametrize("b,h,d,d_a,s,pos,context,kind,dtype", DECODE_CASES)
def test_decode_step_matches_reference(request, build, b, h, d, d_a, s, pos, context, kind, dtype):
    emu = request.getfixturevalue(build)
    args = _decode_args(b, h, d, d_a, s, context, kind, dtype)
    want, k_ref, v_ref = _decode_want(args, pos, h)
    out = decode_step(emu, *args[:8], pos, h, args[8])
    assert rel(out, want) <= TOL[dtype]
    assert rel(args[6], k_ref) <= TOL[dtype] and rel(args[7], v_ref) <= TOL[dtype]


@pytest.mark.parametrize("build", ["emu", "emu_knobs"])
@pytest.mark.parametrize("sms,blocks_per_sm", [(1, 1), (3, 2), (7, 1)])
def test_decode_step_on_other_grid_sizes(request, build, sms, blocks_per_sm):
    """The grid sets how many warps share the rows and how the cache is cut into split-K
    chunks (one chunk per head on 1 SM, several on 7)."""
    for case in (DECODE_CASES[3], DECODE_CASES[5]):
        b, h, d, d_a, s, pos, context, kind, dtype = case
        args = _decode_args(b, h, d, d_a, s, context, kind, dtype)
        want, _, _ = _decode_want(args, pos, h)
        with emulated_gpu(CF_EMU_SMS=sms, CF_EMU_BLOCKS_PER_SM=blocks_per_sm):
            out = decode_step(request.getfixturevalue(build), *args[:8], pos, h, args[8])
        assert rel(out, want) <= TOL[dtype], case


@pytest.mark.parametrize("build", ["emu", "emu_knobs"])
@pytest.mark.parametrize("context", [False, True], ids=["aligned", "context"])
def test_decode_step_more_warps_than_output_rows(request, build, context):
    """Regression (audit, session 10): with the knobs (no grid barriers + staged inputs), warps
    past the last W_o row skipped the wait for the merged attention but still copied their share
    of it into the block's stage: output columns came from a stale workspace. D_B = 36 rows on
    5 emulated SMs (more warps than rows), B = 4. The grid used to be cached per library on its
    first launch, so tests that change CF_EMU_SMS ran on the first size only."""
    b, h, d, d_a, s, pos = 4, 1, 36, 8, 20, 10
    args = _decode_args(b, h, d, d_a, s, context, "none", torch.float32)
    want, _, _ = _decode_want(args, pos, h)
    with emulated_gpu(CF_EMU_SMS=5):
        out = decode_step(request.getfixturevalue(build), *args[:8], pos, h, args[8])
    assert rel(out, want) <= TOL[torch.float32]


@pytest.mark.parametrize("kernel,dtype", [("mma", torch.float32), ("mma", torch.bfloat16),
                                          ("wmma", torch.bfloat16)])
def test_row_with_an_inf_score_has_nan_lse_not_empty(emu, kernel, dtype):
    """Regression (audit, session 10): an inf score (an inf in k) makes the running sum NaN; the
    generic and mma kernels wrote lse = -inf, which tells the backward the row sees no key, so
    its NaN vanished from dq. It is NaN now, like the output (the reference's is NaN too)."""
    q = torch.ones(1, 1, 2, 64)
    k = torch.randn(1, 1, 5, 64, generator=torch.Generator().manual_seed(0))
    k[0, 0, 0, 0] = float("inf")
    v = torch.randn(1, 1, 5, 64, generator=torch.Generator().manual_seed(1))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with emulated_gpu(CALM_FAST_CUDA_ATTN=kernel):  # fp32 takes the generic kernel either way
        out, lse = attend(emu, q, k, v, "aligned")
    assert out.isnan().all() and lse.isnan().all()


@pytest.mark.parametrize("build", ["emu", "emu_knobs"])
def test_decode_step_does_not_depend_on_thread_order(request, build):
    """Shuffled thread orders give the same bits; for the barrier-free (dataflow) build this is
    what checks its counters: a missing wait shows as a wrong result in some order."""
    emu = request.getfixturevalue(build)
    for case in (DECODE_CASES[3], DECODE_CASES[2], DECODE_CASES[4], DECODE_CASES[7]):
        b, h, d, d_a, s, pos, context, kind, dtype = case
        args = _decode_args(b, h, d, d_a, s, context, kind, dtype)
        want, _, _ = _decode_want(args, pos, h)
        with emulated_gpu(CF_EMU_SMS=3):
            base = decode_step(emu, *[t.clone() if t is not None else None for t in args[:8]], pos, h, args[8])
        assert rel(base, want) <= TOL[dtype], case
        for seed in (1, 2, 3):
            with emulated_gpu(CF_EMU_SEED=seed, CF_EMU_SMS=3):
                run = [t.clone() if t is not None else None for t in args[:8]]
                assert torch.equal(decode_step(emu, *run, pos, h, args[8]), base), (case, seed)


def test_decode_context_mode_at_pos_0_returns_h_b(emu):
    args = _decode_args(2, 2, 16, 8, 5, True, "none", torch.float32)
    assert torch.equal(decode_step(emu, *args[:8], 0, 2, None), args[0])


def test_decode_padded_nonfinite_rows_are_ignored(emu):
    check_decode_padded_rows_are_ignored(
        lambda h_b, w_q, w_kv, b_kv, w_o, k, v, pos, n_heads, kpm: decode_step(
            emu, h_b, None, w_q, None, None, w_o, k, v, pos, n_heads, kpm), "cpu", torch.float32)


def _neginf_key_case(dtype, d, tq=2, tk=80):
    """Key 0 (and key 70) scores -inf for every query row and holds NaN / inf in some value
    columns; the keys between are padding, so a whole key tile (or decode chunk) has only
    -inf scores."""
    gen = torch.Generator().manual_seed(d)
    q = torch.ones(1, 2, tq, d)
    k, v = torch.randn(1, 2, tk, d, generator=gen) * 0.1, torch.randn(1, 2, tk, d, generator=gen)
    for j in (0, 70):
        k[:, :, j] = 0.0
        k[:, :, j, 0] = -float("inf")
    v[:, 0, 0, 1] = float("nan")
    v[:, 1, 0, 2] = float("inf")
    v[:, :, 70, 3] = float("nan")
    kpm = torch.ones(1, tk, dtype=torch.bool)
    kpm[:, 1:64] = False
    return q.to(dtype), k.to(dtype), v.to(dtype), kpm


@pytest.mark.parametrize("dtype,d", [(torch.float32, 4), (torch.float32, 40), (torch.bfloat16, 64)])
def test_neginf_score_key_with_nonfinite_value_gives_nan_in_its_column(emu, dtype, d):
    """A visible key scored -inf has softmax weight 0, and 0 * NaN = 0 * inf = NaN in the
    reference: its value's non-finite columns turn NaN (the generic kernel and the decode
    step's online softmax used to skip such a key while every score so far was -inf)."""
    for tq, mask in ((2, "context"), (5, "aligned")):
        q, k, v, kpm = _neginf_key_case(dtype, d, tq)
        want = ref.cross_attention(q.double(), k.double(), v.double(), mask, kpm)
        out, _ = attend(emu, q, k, v, mask, kpm)
        assert torch.equal(out.isnan(), want.isnan()), (tq, mask)
        fin = want.isfinite()
        assert torch.allclose(out[fin].double(), want[fin], atol=TOL[dtype] * 10), (tq, mask)
    if dtype == torch.bfloat16:
        return
    # The decode step, context mode: cache rows 0 and 70 of each head score -inf; 1..63 padded.
    q, kc, vc, kpm = _neginf_key_case(dtype, d, 1, 96)
    h_b = torch.ones(1, 1, 2 * d)
    w_q, w_o = torch.eye(2 * d), torch.eye(2 * d)
    want = ref.bridge_decode_step(h_b, None, w_q, None, None, w_o, kc.clone(), vc.clone(), 90, 2, kpm)
    assert want.isnan().all()  # W_o spreads the NaN columns over the whole row
    for sms in (1, 3, 7):  # one chunk per head, or several (a chunk of only -inf scores)
        with emulated_gpu(CF_EMU_SMS=sms):
            got = decode_step(emu, h_b, None, w_q, None, None, w_o, kc.clone(), vc.clone(), 90, 2, kpm)
        assert got.isnan().all(), sms


def test_decode_step_with_zero_augment_width_appends_the_bias(emu):
    """The mode comes from the descriptor (h_a given), not from its NULL data pointer."""
    check_zero_augment_width_appends_the_bias(lambda *args: decode_step(emu, *args))


def test_decode_workspace_bytes_refuses_sizes_that_overflow(emu):
    f = emu.cf_decode_workspace_bytes_cuda
    f.argtypes = [ctypes.c_int64] * 4
    assert f(1, 4096, 32, 2048) > 0
    # Inside the size caps, but B * H * chunks * (D + 4) * 4 bytes is beyond int64 (it used
    # to wrap to a small positive count a caller would allocate).
    for args in [(2 ** 20, 2 ** 20, 2 ** 20, 2 ** 30), (2 ** 19, 2 ** 20, 2 ** 20, 2 ** 30),
                 (2 ** 20, 2 ** 20, 2 ** 20, 2 ** 29 + 16)]:
        assert f(*args) == -1, args
        msg = emu.cf_last_error().decode()
        assert f"batch={args[0]}, d_b={args[1]}, n_heads={args[2]}, n_rows={args[3]}" in msg and "int64" in msg
    assert f(1, 6, 4, 8) == -1 and "multiple of n_heads" in emu.cf_last_error().decode()


def test_attention_grid_limit_error_names_the_sizes(emu):
    """Sizes past the launch grid are refused before any memory is touched: inputs are stride-0
    views of a small buffer, outputs dense descriptors at an unused address (never written)."""
    buf = torch.zeros(64)

    def d(shape, ptr=None, dense=False):
        n = len(shape)
        strides = [0] * (n - 1) + [1]
        if dense:
            for i in range(n - 2, -1, -1):
                strides[i] = strides[i + 1] * shape[i + 1]
        return ctypes.byref(CfTensor(buf.data_ptr() if ptr is None else ptr, 0, n,
                                     (ctypes.c_int64 * 4)(*shape, *[0] * (4 - n)),
                                     (ctypes.c_int64 * 4)(*strides, *[0] * (4 - n))))

    far = 1 << 44  # outputs' descriptors: validated, never dereferenced (the launch is refused)
    for (b, h, tq), what in [((65536, 1, 1), "B exceeds the CUDA attention grid's limit of 65535"),
                             ((1, 70000, 1), "H exceeds the CUDA attention grid's limit of 65535"),
                             ((1, 1, 2 ** 33 + 8), "Tq exceeds the CUDA attention grid's limit of 8589934588")]:
        status = emu.cf_attn_fwd_cuda(d([b, h, tq, 4]), d([b, h, 1, 4]), d([b, h, 1, 4]), None, 1,
                                      d([b, h, tq, 4], far, True), d([b, h, tq], far + (1 << 40), True), None)
        msg = emu.cf_last_error().decode()
        assert status == 2 and f"B={b}, H={h}, Tq={tq}" in msg and what in msg, msg


def test_cuda_entry_points_refuse_overlapping_writes(emu):
    """The checks of csrc/validate.cpp (shared with the CPU entry points) on the CUDA ones."""
    args = _decode_args(2, 2, 4, 3, 6, False, "none", torch.float32)
    kc = args[6]
    with pytest.raises(ValueError, match="k_cache: stride 0 over dim 0 of size 2"):
        decode_step(emu, *args[:6], kc[:1].expand_as(kc), args[7], 2, 2)
    with pytest.raises(ValueError, match="k_cache: overlaps v_cache"):
        decode_step(emu, *args[:6], kc, kc, 2, 2)
    q, k, v, _ = _attn_inputs((1, 2, 8, 8, 4), "none", torch.float32)
    out, lse = torch.empty_like(q), torch.empty(1, 2, 8)
    assert emu.cf_attn_fwd_cuda(_desc(q), _desc(k), _desc(v), None, 1, _desc(k), _desc(lse), None) == 2
    assert b"out: overlaps the input k" in emu.cf_last_error()
    assert emu.cf_attn_fwd_cuda(_desc(q), _desc(k), _desc(v), None, 1, _desc(out), _desc(lse), None) == 0


def test_emulator_reports_divergent_collectives_and_runs_its_primitives(emu):
    """The emulator's own checks (csrc/cuda/emulator/selftest.cu): shuffles and grid.sync
    move the right values; a __syncthreads or shuffle that some threads skip fails the launch
    with the collective's name (a hang on a GPU) instead of hanging here, and a misaligned
    ldmatrix (a fault on a GPU) fails the launch with a message instead of aborting."""
    assert emu.cf_emu_selftest_primitives() == 0, emu.cf_emu_selftest_last_error()
    for which, name in ((0, b"__syncthreads"), (1, b"__shfl_xor_sync"), (2, b"not 16-byte aligned")):
        assert emu.cf_emu_selftest_divergent(which) != 0
        assert name in emu.cf_emu_selftest_last_error(), emu.cf_emu_selftest_last_error()
