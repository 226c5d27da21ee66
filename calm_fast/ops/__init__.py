"""The bridge's fused projection + cross-attention, behind one dispatch point.

Backends: "reference" (eager PyTorch, ops/reference.py: the ground truth), "sdpa" (torch's
fused scaled_dot_product_attention with the same semantics), "cpp" (C++ CPU kernels in
calm_fast._C), "cuda" (CUDA kernels in calm_fast._C_cuda), "triton" (Triton kernels).
"auto" picks, per operation, the fastest backend that runs on the inputs' device.

A backend is a module exposing
  supports(device: torch.device, dtype: torch.dtype) -> bool
  cross_attention(q, k, v, mask, key_padding_mask) -> Tensor   (differentiable)
  bridge_decode_step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads,
                     key_padding_mask) -> Tensor               (inference only)
with exactly the semantics of the functions of the same name in reference.py, and optionally
  bridge_decode_step_checked(same arguments) -> Tensor
the same step for inputs that already passed the dispatcher's _check_decode_inputs (it runs
only the backend's own checks: a decode step is called once per bridge and token, and the
shared checks are a good part of its host time at small widths).
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from . import reference
from .reference import MASKS, fold_projection, merge_heads, project_kv, split_heads

BACKENDS = ("reference", "sdpa", "cpp", "cuda", "triton")
_MODULES = {"reference": "calm_fast.ops.reference_backend", "sdpa": "calm_fast.ops.sdpa_backend",
            "cpp": "calm_fast.ops.native",
            "cuda": "calm_fast.ops.native", "triton": "calm_fast.ops.triton_xattn"}
# Preference order of "auto", fastest first, per device type (set by bench/ results).
_AUTO = {
    "cuda": {"cross_attention": ("triton", "cuda", "reference"),
             "bridge_decode_step": ("cuda", "triton", "reference")},
    "cpu": {"cross_attention": ("cpp", "reference"),
            "bridge_decode_step": ("cpp", "reference")},
}
_loaded: dict[str, ModuleType | None] = {}


def _load_backends() -> None:
    """Import every backend once, at import time (custom ops register then, and nothing is
    imported inside a torch.compile trace); a backend that cannot load here (extension not
    built, no triton) is recorded as None."""
    for name, modname in _MODULES.items():
        if modname not in _loaded:
            try:
                _loaded[modname] = importlib.import_module(modname)
            except (ImportError, OSError):
                _loaded[modname] = None


def _module(name: str) -> ModuleType | None:
    return _loaded.get(_MODULES[name])


def _runs_on(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    mod = _module(name)
    if mod is None:
        return False
    if name == "cpp" and device.type != "cpu":
        return False
    if name == "cuda" and device.type != "cuda":
        return False
    return bool(mod.supports(device, dtype))


def available_backends(device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that run here: on `device` if given, else on any device of this machine."""
    if device is not None:
        dev = torch.device(device)
        return [b for b in BACKENDS if _runs_on(b, dev, dtype)]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(_runs_on(b, d, dtype) for d in devices)]


def resolve_backend(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The module that runs `op` for `backend` ("auto" or a name) on this device and dtype."""
    if backend == "auto":
        for name in _AUTO.get(device.type, {}).get(op, ("reference",)):
            if _runs_on(name, device, dtype):
                return _module(name)
        return _module("reference")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if not _runs_on(backend, device, dtype):
        raise ValueError(f"backend {backend!r} is not available for device={device} dtype={dtype} "
                         f"(available here: {available_backends(device, dtype)})")
    return _module(backend)


def _check_attention_inputs(q, k, v, mask, key_padding_mask) -> None:
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, T, d), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, heads or head dim")
    if q.shape[3] == 0:
        raise ValueError(f"head dim must be > 0, got q shape {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if mask == "aligned" and q.shape[2] > k.shape[2]:
        raise ValueError(f"aligned mask needs Tq <= Tk, got Tq={q.shape[2]} Tk={k.shape[2]}")
    _check_key_padding_mask(key_padding_mask, (k.shape[0], k.shape[2]), q.device, "(B, Tk)")


def _check_key_padding_mask(kpm, shape: tuple, device: torch.device, what: str) -> None:
    if kpm is None:
        return
    if not isinstance(kpm, torch.Tensor) or kpm.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor, got "
                        f"{getattr(kpm, 'dtype', type(kpm).__name__)}")
    if tuple(kpm.shape) != tuple(shape):
        raise ValueError(f"key_padding_mask must have shape {what}={tuple(shape)}, got {tuple(kpm.shape)}")
    if kpm.device != device:
        raise ValueError(f"key_padding_mask is on {kpm.device}, expected {device}")


def _check_n_heads(n_heads, d_b: int, what: str) -> int:
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads <= 0:
        raise ValueError(f"{what}: n_heads must be a positive int, got {n_heads!r}")
    if d_b <= 0:
        raise ValueError(f"{what}: D_B={d_b} must be positive")
    if d_b % n_heads:
        raise ValueError(f"{what}: D_B={d_b} is not a multiple of n_heads={n_heads}")
    return d_b // n_heads


def _check_tensor(what: str, name: str, t, shape: tuple | None = None, dims: int | None = None,
                  like: torch.Tensor | None = None) -> None:
    """t is a floating-point tensor of `shape` (or of `dims` dims); with `like`, on its device
    and of its dtype. Shapes only: nothing here reads tensor data (no device sync)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{what}: {name} must be a floating-point tensor, got {t.dtype}")
    if shape is not None and t.shape != tuple(shape):
        raise ValueError(f"{what}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{what}: {name} must be {dims}-D, got shape {tuple(t.shape)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{what}: {name} is on {t.device}, expected {like.device}")
        if t.dtype != like.dtype:
            raise TypeError(f"{what}: {name} has dtype {t.dtype}, expected {like.dtype} (h_b's)")


def _check_bridge_forward(h_b, h_a, w_proj, b_proj, w_q, w_k, w_v, w_o, n_heads, residual) -> None:
    what = "bridge_forward"
    _check_tensor(what, "h_b", h_b, dims=3)
    _check_tensor(what, "h_a", h_a, dims=3)
    b, _, d_b = h_b.shape
    d_a = h_a.shape[2]
    if h_a.shape[0] != b:
        raise ValueError(f"{what}: h_a batch {h_a.shape[0]} differs from h_b batch {b} "
                         f"(h_b {tuple(h_b.shape)}, h_a {tuple(h_a.shape)})")
    _check_n_heads(n_heads, d_b, what)
    # Weights are not tied to the activations' dtype here: under autocast they differ.
    _check_tensor(what, "w_proj", w_proj, (d_b, d_a))
    _check_tensor(what, "b_proj", b_proj, (d_b,))
    for name, w in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v), ("w_o", w_o)):
        _check_tensor(what, name, w, (d_b, d_b))
    if residual is not None:
        _check_tensor(what, "residual", residual, tuple(h_b.shape))


def _check_decode_inputs(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, kpm) -> None:
    """The same checks for every backend (each adds its own in bridge_decode_step_checked):
    shapes, batch, heads, dtypes and devices (all h_b's: the caches are written in place),
    pos an int inside the cache, the key padding mask (B, S) bool."""
    what = "bridge_decode_step"
    _check_tensor(what, "h_b", h_b)
    if h_b.dim() != 3 or h_b.shape[1] != 1:
        raise ValueError(f"h_b must be (B, 1, D_B) for a decode step, got {tuple(h_b.shape)}")
    if isinstance(pos, bool) or not isinstance(pos, (int, torch.SymInt)):
        raise TypeError(f"{what}: pos must be an int, got {type(pos).__name__}")
    bsz, _, d_b = h_b.shape
    hd = _check_n_heads(n_heads, d_b, what)
    _check_tensor(what, "w_q", w_q, (d_b, d_b), like=h_b)
    _check_tensor(what, "w_o", w_o, (d_b, d_b), like=h_b)
    _check_tensor(what, "k_cache", k_cache, dims=4, like=h_b)
    s = k_cache.shape[2]
    _check_tensor(what, "k_cache", k_cache, (bsz, n_heads, s, hd))
    _check_tensor(what, "v_cache", v_cache, (bsz, n_heads, s, hd), like=h_b)
    if h_a is not None:
        _check_tensor(what, "h_a", h_a, dims=3, like=h_b)
        if tuple(h_a.shape[:2]) != (bsz, 1):
            raise ValueError(f"{what}: h_a must be (B, 1, D_A) with B={bsz}, got {tuple(h_a.shape)}")
        d_a = h_a.shape[2]
        _check_tensor(what, "w_kv", w_kv, (2 * d_b, d_a), like=h_b)
        _check_tensor(what, "b_kv", b_kv, (2 * d_b,), like=h_b)
    if h_a is not None and not 0 <= pos < s:
        raise ValueError(f"{what}: pos={pos} is outside the bridge cache of {s} rows")
    if h_a is None and not 0 <= pos <= s:
        raise ValueError(f"{what}: pos={pos} is outside [0, {s}] (context mode attends rows [0, pos))")
    _check_key_padding_mask(kpm, (bsz, s), h_b.device, "(B, S)")


def _unrounded_out_wanted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a fused attention forward should hand its backward the fp32 output, not the
    16-bit one it returns: delta = dout·out from a rounded out is off by ~2^-9 |dout||out|, which
    dominates dq and dk when the value rows are alike (P(h_a) rows often are); the reference's
    autograd never rounds it. Only when a gradient will be taken; inference keeps one output."""
    return (q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad))


def _attn_out_dtype(dtype: torch.dtype, unrounded: bool) -> torch.dtype:
    """A fused forward's output dtype: fp32 when the unrounded output was asked for 16-bit inputs."""
    return torch.float32 if unrounded and dtype in (torch.bfloat16, torch.float16) else dtype


def _self_overlapping(t: torch.Tensor) -> bool:
    """True when two elements of `t` may share memory: stride 0 over a dim of size > 1, or
    (dims sorted by stride) a stride within the reach of the smaller ones. Strides only, so
    it also runs on fake tensors; conservative like csrc/validate.cpp."""
    if t.numel() == 0 or t.is_contiguous():
        return False
    reach = 0
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def _check_caches_writable(h_a, k_cache, v_cache) -> None:
    """For the fused kernels, which write the caches in place (aligned mode, h_a given) through
    pointers: a unit stride in the last dim, and no two elements sharing memory."""
    what = "bridge_decode_step"
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.shape[-1] > 1 and c.stride(-1) != 1:
            raise ValueError(f"{what}: {name} is written in place and needs a unit stride in its "
                             f"last dim, got strides {tuple(c.stride())}")
        if h_a is not None and _self_overlapping(c):  # e.g. a cache expand()ed over the batch
            raise ValueError(f"{what}: {name} is written in place but elements share memory "
                             f"(shape {tuple(c.shape)}, strides {tuple(c.stride())}); pass a "
                             f"cache with its own memory per row (e.g. .contiguous())")


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str = "aligned",
                    key_padding_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Masked multi-head attention, q (B, H, Tq, d), k/v (B, H, Tk, d); see reference.py."""
    _check_attention_inputs(q, k, v, mask, key_padding_mask)
    mod = resolve_backend(backend, "cross_attention", q.device, q.dtype)
    return mod.cross_attention(q, k, v, mask, key_padding_mask)


def bridge_forward(h_b: torch.Tensor, h_a: torch.Tensor, w_proj: torch.Tensor, b_proj: torch.Tensor,
                   w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor,
                   n_heads: int, mask: str = "aligned", key_padding_mask: torch.Tensor | None = None,
                   backend: str = "auto", residual: torch.Tensor | None = None) -> torch.Tensor:
    """residual + W_o Attn(h_b W_q, P(h_a) W_k, P(h_a) W_v), the attention on `backend`;
    residual defaults to h_b (see reference.bridge_forward)."""
    _check_bridge_forward(h_b, h_a, w_proj, b_proj, w_q, w_k, w_v, w_o, n_heads, residual)
    k, v = project_kv(h_a, w_proj, b_proj, w_k, w_v)
    q = torch.nn.functional.linear(h_b, w_q)
    attn = cross_attention(split_heads(q, n_heads), split_heads(k, n_heads), split_heads(v, n_heads),
                           mask, key_padding_mask, backend)
    base = h_b if residual is None else residual
    return base + torch.nn.functional.linear(merge_heads(attn), w_o)


def bridge_decode_step(h_b: torch.Tensor, h_a: torch.Tensor | None, w_q: torch.Tensor,
                       w_kv: torch.Tensor, b_kv: torch.Tensor, w_o: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, n_heads: int,
                       key_padding_mask: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """Append the new augment row's K/V to the cache (aligned mode) and attend; see reference.py."""
    _check_decode_inputs(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads,
                         key_padding_mask)
    mod = resolve_backend(backend, "bridge_decode_step", h_b.device, h_b.dtype)
    step = getattr(mod, "bridge_decode_step_checked", mod.bridge_decode_step)
    return step(h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, key_padding_mask)


_load_backends()

__all__ = ["BACKENDS", "available_backends", "bridge_decode_step", "bridge_forward",
           "cross_attention", "fold_projection", "reference", "resolve_backend"]
