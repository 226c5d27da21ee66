"""The compiled kernels as torch custom ops: backend "cpp" (calm_fast._C, C++/OpenMP) and
backend "cuda" (calm_fast._C_cuda). Contract: see calm_fast/ops/__init__.py.

The extensions take raw pointers, shapes and strides (csrc/ has no torch headers), so this
module is where tensors are checked (dtype, device, layout, shapes) before a pointer leaves
Python; the C++ side checks again and raises ValueError/TypeError on anything it rejects.

Ops (namespace calm_fast, registered once at import, each with a fake implementation so
torch.compile(fullgraph=True) traces them and torch.library.opcheck passes):
  native_attn_fwd(q, k, v, kpm, mask, unrounded_out=False) -> (out, lse)   autograd via native_attn_bwd
      unrounded_out: out in fp32 for 16-bit inputs (CPU: the kernel's accumulator, unrounded),
      which cross_attention() asks for on the CPU when a gradient will be taken (it casts down).
  native_attn_bwd(q, k, v, kpm, mask, out, dout, lse) -> (dq, dk, dv)
      CPU: the C++ flash backward. CUDA: there is no CUDA backward kernel yet; it runs the
      same recomputation from lse in PyTorch (materialises the Tq x Tk scores per head, and
      the output from them, so it never reads a rounded one).
  native_decode_step(...) -> out; mutates k_cache and v_cache (aligned mode appends a row).

Dtypes: CPU float32, float64 (exists for gradcheck), bfloat16 (fp32 accumulation);
CUDA float32, bfloat16, float16 (fp32 accumulation). The decode step needs every tensor in
h_b's dtype (caches included: they are written in place).

Why two modules: calm_fast._C_cuda links the CUDA runtime (statically), so a CPU-only
machine imports calm_fast._C without any CUDA library; _C_cuda is imported when present.
"""
from __future__ import annotations

import math

import torch

# The package's own checks: ops/__init__.py defines them before it loads this module.
from . import _attn_out_dtype, _check_caches_writable, _check_decode_inputs, _unrounded_out_wanted
from .reference import attention_mask, zero_padded_keys

try:
    from calm_fast import _C
except ImportError:  # not built
    _C = None
try:
    from calm_fast import _C_cuda
except ImportError:  # built without nvcc, or a CUDA-less build
    _C_cuda = None

if _C is None and _C_cuda is None:
    raise ImportError("calm_fast native kernels are not built: run "
                      "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`")

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3, torch.bool: 4}
_MASKS = {"aligned": 0, "context": 1}


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """True where the extension for `device` was built and handles `dtype`."""
    device = torch.device(device)
    if device.type == "cpu":
        return _C is not None and dtype in _CPU_DTYPES
    if device.type == "cuda":
        return _C_cuda is not None and torch.cuda.is_available() and dtype in _CUDA_DTYPES
    return False


# ---------------------------------------------------------------------------- checks

def _desc(t: torch.Tensor | None):
    """(data_ptr, dtype code, shape, strides): what the extensions take for a tensor."""
    if t is None:
        return None
    return (t.data_ptr(), _CODES[t.dtype], t.shape, t.stride())


def _unit_inner(t: torch.Tensor | None) -> torch.Tensor | None:
    """The kernels take any outer strides but need the innermost one to be 1. A copy made
    here must stay referenced until the kernel has read it (pointers do not own memory)."""
    if t is None or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _check_backend(device: torch.device, dtype: torch.dtype, what: str) -> None:
    if device.type == "cpu":
        if _C is None:
            raise ValueError(f"{what}: calm_fast._C (CPU kernels) is not built")
        if dtype not in _CPU_DTYPES:
            raise TypeError(f"{what}: dtype {dtype} is not handled on CPU (use one of {_CPU_DTYPES})")
    elif device.type == "cuda":
        if _C_cuda is None:
            raise ValueError(f"{what}: calm_fast._C_cuda (CUDA kernels) is not built")
        if dtype not in _CUDA_DTYPES:
            raise TypeError(f"{what}: dtype {dtype} is not handled on CUDA (use one of {_CUDA_DTYPES})")
    else:
        raise ValueError(f"{what}: device {device} has no native kernels (cpu or cuda only)")


def _check_required(what: str, **tensors) -> None:
    """TypeError naming the argument when a required tensor is None or not a tensor."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a tensor, got {type(t).__name__}")


def _check_same(what: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
        if t.device != ref.device:
            raise ValueError(f"{what}: {name} is on {t.device}, expected {ref.device}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{what}: {name} has dtype {t.dtype}, expected {ref.dtype}")


def _check_mask(what: str, kpm: torch.Tensor | None, shape: tuple, device: torch.device) -> None:
    if kpm is None:
        return
    if not isinstance(kpm, torch.Tensor) or kpm.dtype != torch.bool:
        raise TypeError(f"{what}: key_padding_mask must be a bool tensor, got "
                        f"{getattr(kpm, 'dtype', type(kpm).__name__)}")
    if tuple(kpm.shape) != shape:
        raise ValueError(f"{what}: key_padding_mask must have shape {shape}, got {tuple(kpm.shape)}")
    if kpm.device != device:
        raise ValueError(f"{what}: key_padding_mask is on {kpm.device}, expected {device}")


def _check_attention(q, k, v, mask, kpm) -> None:
    what = "cross_attention"
    _check_required(what, q=q, k=k, v=v)
    if mask not in _MASKS:
        raise ValueError(f"{what}: mask must be one of {tuple(_MASKS)}, got {mask!r}")
    _check_backend(q.device, q.dtype, what)
    _check_same(what, q, k=k, v=v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{what}: {name} must be 4-D (B, H, T, d), got shape {tuple(t.shape)}")
    b, h, tq, d = q.shape
    tk = k.shape[2]
    if tuple(k.shape) != (b, h, tk, d) or tuple(v.shape) != (b, h, tk, d):
        raise ValueError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B, H, Tk, d) "
                         f"matching q {tuple(q.shape)}")
    if d == 0:
        raise ValueError(f"{what}: head dim must be > 0, got q shape {tuple(q.shape)}")
    if mask == "aligned" and tq > tk:
        raise ValueError(f"{what}: aligned mask needs Tq <= Tk, got Tq={tq} Tk={tk}")
    _check_mask(what, kpm, (b, tk), q.device)


def _check_native_decode(h_b, h_a, k_cache, v_cache) -> None:
    """What the kernels add to the dispatcher's decode checks: a device and dtype they handle,
    caches they can write in place."""
    _check_backend(h_b.device, h_b.dtype, "bridge_decode_step")
    _check_caches_writable(h_a, k_cache, v_cache)


# ------------------------------------------------------------------ attention forward

@torch.library.custom_op("calm_fast::native_attn_fwd", mutates_args=(), device_types="cpu")
def native_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: torch.Tensor | None, mask: str,
                    unrounded_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, key_padding_mask = _unit_inner(q), _unit_inner(k), _unit_inner(v), _unit_inner(key_padding_mask)
    out = q.new_empty(q.shape, dtype=_attn_out_dtype(q.dtype, unrounded_out))
    lse = q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))
    _C.set_num_threads(torch.get_num_threads())
    _C.attn_fwd(_desc(q), _desc(k), _desc(v), _desc(key_padding_mask), _MASKS[mask], _desc(out), _desc(lse))
    return out, lse


@native_attn_fwd.register_kernel("cuda")
def _attn_fwd_cuda(q, k, v, key_padding_mask, mask, unrounded_out=False):
    # The CUDA kernels write q's dtype: with unrounded_out, that output in fp32 (the CUDA
    # backward recomputes the output from P and never reads this one).
    q, k, v, key_padding_mask = _unit_inner(q), _unit_inner(k), _unit_inner(v), _unit_inner(key_padding_mask)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    with torch.cuda.device(q.device):
        stream = torch.cuda.current_stream(q.device).cuda_stream
        _C_cuda.attn_fwd(_desc(q), _desc(k), _desc(v), _desc(key_padding_mask), _MASKS[mask],
                         _desc(out), _desc(lse), stream)
    return out.to(_attn_out_dtype(q.dtype, unrounded_out)), lse


@native_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, mask, unrounded_out=False):
    return (q.new_empty(q.shape, dtype=_attn_out_dtype(q.dtype, unrounded_out)),
            q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype)))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------- attention backward

@torch.library.custom_op("calm_fast::native_attn_bwd", mutates_args=(), device_types="cpu")
def native_attn_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: torch.Tensor | None, mask: str, out: torch.Tensor,
                    dout: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, out, dout, key_padding_mask = (_unit_inner(t) for t in (q, k, v, out, dout, key_padding_mask))
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    _C.set_num_threads(torch.get_num_threads())
    _C.attn_bwd(_desc(q), _desc(k), _desc(v), _desc(key_padding_mask), _MASKS[mask], _desc(out),
                _desc(dout), _desc(lse), _desc(dq), _desc(dk), _desc(dv))
    return dq, dk, dv


@native_attn_bwd.register_kernel("cuda")
def _attn_bwd_cuda(q, k, v, key_padding_mask, mask, out, dout, lse):
    # No CUDA backward kernel: the flash backward's math in PyTorch, recomputing P from lse.
    k, v = zero_padded_keys(k, v, key_padding_mask)  # a padded inf/NaN must not reach dq
    qf, kf, vf, gf = (t.float() for t in (q, k, v, dout))
    scale = 1.0 / math.sqrt(q.shape[-1])
    allowed = attention_mask(q.shape[2], k.shape[2], mask, key_padding_mask, q.device)
    lse_f = lse.float()[..., None]
    # Only lse == -inf (what the forward writes for a row that sees no key) means empty: p = 0.
    # A NaN lse (NaN score, or every visible score -inf) must propagate NaN as the reference.
    seen = lse_f != float("-inf")
    p = torch.exp((qf @ kf.transpose(-1, -2)) * scale - torch.where(seen, lse_f, 0.0))
    keep = seen if allowed is None else allowed & seen
    p = torch.where(keep, p, 0.0)
    dv = p.transpose(-1, -2) @ gf
    dp = gf @ vf.transpose(-1, -2)
    # delta = dout·out with the output unrounded (see _unrounded_out_wanted), as sum_j p dp over
    # the keys the row sees: p @ v would multiply a hidden key's weight 0 by its inf/NaN value.
    delta = torch.where(keep, p * dp, 0.0).sum(-1, keepdim=True)
    ds = torch.where(keep, p * (dp - delta), 0.0)  # a hidden key's ds is 0
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    if key_padding_mask is not None:  # padded keys get 0 (their ds is 0, but 0 * a NaN q is NaN)
        dk, dv = zero_padded_keys(dk, dv, key_padding_mask)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@native_attn_bwd.register_fake
def _(q, k, v, key_padding_mask, mask, out, dout, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, mask, _ = inputs
    out, lse = output
    ctx.mask = mask
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)


def _attn_backward(ctx, dout, dlse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    # lse is an auxiliary output for the backward; its gradient is not propagated.
    dout = dout.to(q.dtype).contiguous()  # exact: the gradient of a cast down from fp32 out
    dq, dk, dv = native_attn_bwd(q, k, v, key_padding_mask, ctx.mask, out, dout, lse)
    return dq, dk, dv, None, None, None


native_attn_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)


# ----------------------------------------------------------------------- decode step

# Defined through torch.library.Library rather than custom_op: for an op that mutates its
# inputs, custom_op's Python ADInplaceOrView layer costs ~100 us per call (schema default
# filling), more than the whole step at small widths. The dispatcher's C++ fallbacks bump the
# caches' version counters from the schema's alias annotations instead.
_lib = torch.library.Library("calm_fast", "FRAGMENT")
_lib.define("native_decode_step(Tensor h_b, Tensor? h_a, Tensor w_q, Tensor? w_kv, Tensor? b_kv, "
            "Tensor w_o, Tensor(a!) k_cache, Tensor(b!) v_cache, SymInt pos, int n_heads, "
            "Tensor? key_padding_mask) -> Tensor")


def _decode_step_cpu(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, key_padding_mask):
    args, out, keep = _decode_args(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, key_padding_mask)
    _C.set_num_threads(torch.get_num_threads())
    _C.decode_step(*args, pos, n_heads, _desc(out))
    del keep
    return out


def _decode_step_cuda(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, key_padding_mask):
    args, out, keep = _decode_args(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, key_padding_mask)
    nbytes = _C_cuda.decode_workspace_bytes(h_b.shape[0], h_b.shape[2], n_heads, k_cache.shape[2])
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=h_b.device)
    with torch.cuda.device(h_b.device):
        stream = torch.cuda.current_stream(h_b.device).cuda_stream
        _C_cuda.decode_step(*args, pos, n_heads, _desc(out), workspace.data_ptr(), nbytes, stream)
    del keep  # the caching allocator orders any reuse after the kernel on this stream
    return out


_lib.impl("native_decode_step", _decode_step_cpu, "CPU")
_lib.impl("native_decode_step", _decode_step_cuda, "CUDA")


@torch.library.register_fake("calm_fast::native_decode_step")
def _(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, key_padding_mask):
    return h_b.new_empty(h_b.shape)


native_decode_step = torch.ops.calm_fast.native_decode_step.default


def _decode_args(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, key_padding_mask):
    """Descriptors for _C/_C_cuda.decode_step, plus the tensors behind them: the caller keeps
    `keep` alive until the kernel has run (a dense copy made here must outlive its pointer)."""
    keep = [None if t is None else _unit_inner(t)
            for t in (h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, key_padding_mask)]
    if h_a is None:  # context mode: the projection weights are not read
        keep[3] = keep[4] = None
    out = h_b.new_empty(h_b.shape)
    return [_desc(t) for t in keep], out, keep


# ------------------------------------------------------------------- backend surface

def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str = "aligned",
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """reference.cross_attention on the native kernels (differentiable)."""
    _check_attention(q, k, v, mask, key_padding_mask)
    if not q.is_cuda and _unrounded_out_wanted(q, k, v):  # the CUDA backward never reads out
        return native_attn_fwd(q, k, v, key_padding_mask, mask, True)[0].to(q.dtype)
    return native_attn_fwd(q, k, v, key_padding_mask, mask)[0]


def bridge_decode_step(h_b: torch.Tensor, h_a: torch.Tensor | None, w_q: torch.Tensor,
                       w_kv: torch.Tensor, b_kv: torch.Tensor, w_o: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, n_heads: int,
                       key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """reference.bridge_decode_step in one fused native call (inference only)."""
    _check_decode_inputs(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, key_padding_mask)
    return bridge_decode_step_checked(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads,
                                      key_padding_mask)


def bridge_decode_step_checked(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads,
                               key_padding_mask=None) -> torch.Tensor:
    """bridge_decode_step for inputs that passed the dispatcher's _check_decode_inputs."""
    _check_native_decode(h_b, h_a, k_cache, v_cache)
    return native_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads,
                              key_padding_mask)
