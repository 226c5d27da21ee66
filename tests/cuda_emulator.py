"""The CUDA kernels of csrc/cuda built for the CPU emulator (csrc/cuda/emulator) and called
through their C API on CPU tensors: what tests/test_cuda_emulated.py and the kernel fuzz
(tests/test_fuzz_kernels.py, backend "cuda_emu") use."""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from calm_fast.ops.native import _unit_inner  # the kernels need the innermost stride 1

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["csrc/cuda/capi_cuda.cu", "csrc/cuda/decode_step.cu", "csrc/cuda/attn_fwd.cu",
           "csrc/cuda/attn_fwd_mma.cu", "csrc/cuda/emulator/selftest.cu"]
DTYPE = {torch.float32: 0, torch.bfloat16: 2, torch.float16: 3, torch.bool: 4}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the CUDA kernels take


class CfTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int32), ("ndim", ctypes.c_int32),
                ("shape", ctypes.c_int64 * 4), ("stride", ctypes.c_int64 * 4)]


def _desc(t: torch.Tensor | None):
    if t is None:
        return None
    n = t.dim()
    return ctypes.byref(CfTensor(t.data_ptr(), DTYPE[t.dtype], n, (ctypes.c_int64 * 4)(*t.shape, *[0] * (4 - n)),
                                 (ctypes.c_int64 * 4)(*t.stride(), *[0] * (4 - n))))


SANITIZERS = {"1": "address,undefined", "address": "address,undefined", "thread": "thread"}


def build(*flags: str, root: Path = ROOT) -> ctypes.CDLL:
    """The emulated kernels as a shared library (g++ -DCF_CUDA_EMULATOR), once per process and flags.
    CF_EMU_SANITIZE=1 (or =address) builds them with AddressSanitizer + UBSan (scripts/asan_kernels.sh
    preloads the runtimes): every out-of-bounds access a kernel makes is reported at its source line.
    CF_EMU_SANITIZE=thread builds them with ThreadSanitizer, which makes the emulator a race
    checker (emulator/emu_core.hpp; tests/test_cuda_racecheck.py preloads libtsan).
    `root`: the source tree to build (a mutated copy, in the race checker's own tests)."""
    which = os.environ.get("CF_EMU_SANITIZE")
    if which is not None and which not in SANITIZERS:
        raise ValueError(f"CF_EMU_SANITIZE must be one of {sorted(SANITIZERS)}, got {which!r}")
    sanitize = ("-g", "-fno-omit-frame-pointer", f"-fsanitize={SANITIZERS[which]}") if which else ()
    return _build(Path(root), *flags, *sanitize)


@functools.lru_cache(maxsize=None)
def _build(root: Path, *flags: str) -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler on PATH (the native build needs one too)")
    lib = Path(tempfile.mkdtemp(prefix="cf_cuda_emu_")) / "libcf_cuda_emu.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-DCF_CUDA_EMULATOR", *flags, "-Wall", "-Wno-unknown-pragmas",
           "-Werror", f"-I{root / 'csrc/cuda/emulator'}", f"-I{root / 'csrc'}", "-x", "c++",
           *[str(root / s) for s in SOURCES], "-x", "none", str(root / "csrc/validate.cpp"), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}\n{done.stderr[-6000:]}")
    so = ctypes.CDLL(str(lib))
    so.cf_last_error.restype = ctypes.c_char_p
    so.cf_decode_workspace_bytes_cuda.restype = ctypes.c_int64
    so.cf_emu_selftest_last_error.restype = ctypes.c_char_p
    return so


@contextmanager
def emulated_gpu(**env):
    """CF_EMU_SMS / CF_EMU_BLOCKS_PER_SM / CF_EMU_SEED / CALM_FAST_CUDA_ATTN for the calls inside
    (read at each launch)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def attend(lib, q, k, v, mask="aligned", kpm=None):
    """cf_attn_fwd_cuda: (out, lse)."""
    q, k, v, kpm = _unit_inner(q), _unit_inner(k), _unit_inner(v), _unit_inner(kpm)
    out = torch.empty(q.shape, dtype=q.dtype)
    lse = torch.empty(q.shape[:3])
    status = lib.cf_attn_fwd_cuda(_desc(q), _desc(k), _desc(v), _desc(kpm), 0 if mask == "aligned" else 1,
                                  _desc(out), _desc(lse), None)
    if status != 0:
        raise ValueError(lib.cf_last_error().decode())
    return out, lse


def decode_step(lib, h_b, h_a, w_q, w_kv, b_kv, w_o, k_cache, v_cache, pos, n_heads, kpm=None):
    """cf_decode_step_cuda: the output; k_cache / v_cache are written in place (aligned mode)."""
    h_b, h_a, w_q, w_kv, b_kv, w_o, kpm = (_unit_inner(t) for t in (h_b, h_a, w_q, w_kv, b_kv, w_o, kpm))
    if h_a is None:
        w_kv = b_kv = None
    b, _, d_b = h_b.shape
    nbytes = lib.cf_decode_workspace_bytes_cuda(b, d_b, n_heads, k_cache.shape[2])
    if nbytes < 0:
        raise ValueError(lib.cf_last_error().decode())
    workspace = torch.empty(nbytes // 4 + 4)
    out = torch.empty(h_b.shape, dtype=h_b.dtype)
    status = lib.cf_decode_step_cuda(_desc(h_b), _desc(h_a), _desc(w_q), _desc(w_kv), _desc(b_kv), _desc(w_o),
                                     _desc(k_cache), _desc(v_cache), _desc(kpm), ctypes.c_int64(pos),
                                     ctypes.c_int64(n_heads), _desc(out), ctypes.c_void_p(workspace.data_ptr()),
                                     ctypes.c_int64(nbytes), None)
    if status != 0:
        raise ValueError(lib.cf_last_error().decode())
    return out
