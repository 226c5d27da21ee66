"""libcalm_fast and calm_fast.h as another stack uses them: a plain C11 program
(csrc/examples/capi_check.c), compiled with -Werror -pedantic against the installed header
and library, runs the CPU kernels on inputs written here; its outputs are checked against
ops/reference.py. Also: the library exports exactly the header's functions, and its CUDA entry
points report through the same cf_last_error() as the CPU ones."""
from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm_fast import capi
from calm_fast.ops import reference as ref
from test_native_ops import _attention_case, _decode_case, rel

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-9}
NAME = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float64: "f64"}


def _header_functions() -> set[str]:
    text = (ROOT / "csrc" / "calm_fast.h").read_text()
    return set(re.findall(r"CF_API[^;(]*?\b(cf_\w+)\s*\(", text))


def _compile_c(src: Path, exe: Path, flags: list[str]) -> Path:
    """A C11 program as strict as a user's build could be (-Werror -pedantic)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "no C compiler on PATH (the native build needs one too)"
    cmd = [cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", str(src), *flags, "-o", str(exe)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    return exe


@pytest.fixture(scope="module")
def capi_check(tmp_path_factory) -> Path:
    return _compile_c(ROOT / "csrc/examples/capi_check.c", tmp_path_factory.mktemp("capi") / "capi_check",
                      capi.cflags() + capi.libs())


def _run(exe: Path, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"capi_check {' '.join(map(str, args))}: {done.stderr}{done.stdout}"
    return done


def _write(d: Path, name: str, t: torch.Tensor) -> None:
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    t.numpy().tofile(d / f"{name}.bin")


def _read(d: Path, name: str, dtype: torch.dtype, shape) -> torch.Tensor:
    raw = (d / f"{name}.bin").read_bytes()
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    t = torch.frombuffer(bytearray(raw), dtype=storage).reshape(shape)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def test_library_exports_exactly_the_header_functions():
    funcs = _header_functions()
    assert len(funcs) >= 9, funcs  # the parse found the API, not a fraction of it
    lib = ctypes.CDLL(str(capi.library_path()))
    for name in funcs:
        assert hasattr(lib, name), name
    nm = shutil.which("nm")
    if nm is None:
        return
    out = subprocess.run([nm, "-D", "--defined-only", str(capi.library_path())], capture_output=True, text=True,
                         check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[1:2] == ["T"]}
    assert exported == funcs, f"exported but not in calm_fast.h: {exported - funcs}; missing: {funcs - exported}"


def test_capi_flags_name_existing_paths():
    assert (capi.include_dir() / "calm_fast.h").read_text() == (ROOT / "csrc/calm_fast.h").read_text()
    assert capi.library_path().is_file()
    done = subprocess.run([sys.executable, "-m", "calm_fast.capi", "--cflags", "--libs"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == capi.cflags() + capi.libs()


# (B, H, Tq, Tk, d): size 1, primes, Tq != Tk, Tq = 1, a head dim off the vector width.
ATTN_CASES = [((1, 1, 1, 1, 1), "aligned", "none", torch.float32),
              ((2, 3, 13, 37, 16), "aligned", "left_pad", torch.float32),
              ((1, 2, 67, 67, 33), "context", "random", torch.float32),
              ((2, 1, 1, 29, 64), "context", "empty_row", torch.float32),
              ((1, 2, 31, 47, 64), "aligned", "random", torch.bfloat16),
              ((2, 1, 11, 11, 7), "aligned", "left_pad", torch.float64)]


@pytest.mark.parametrize("shape,mask,kind,dtype", ATTN_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_c_program_attention_matches_reference(capi_check, tmp_path, shape, mask, kind, dtype):
    q, k, v, kpm = _attention_case(shape, mask, kind, dtype, seed=sum(shape))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    for name, t in (("q", q), ("k", k), ("v", v), ("dout", dout)):
        _write(tmp_path, name, t)
    if kpm is not None:
        _write(tmp_path, "kpm", kpm)
    _run(capi_check, "attn", tmp_path, NAME[dtype], *shape, mask, int(kpm is not None))

    b, h, tq, tk, d = shape
    qr, kr, vr = (t.double().requires_grad_() for t in (q, k, v))
    want = ref.cross_attention(qr, kr, vr, mask, kpm)
    want.backward(dout.double())
    out = _read(tmp_path, "out", dtype, q.shape)
    assert rel(out, want.detach()) <= TOL[dtype]
    for name, grad, shp in (("dq", qr.grad, q.shape), ("dk", kr.grad, k.shape), ("dv", vr.grad, v.shape)):
        assert rel(_read(tmp_path, name, dtype, shp), grad) <= 2 * TOL[dtype], name
    # lse: log-sum-exp of the scaled scores each row may see; -inf for a row that sees none.
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    allowed = ref.attention_mask(tq, tk, mask, kpm, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    want_lse = torch.logsumexp(scores, dim=-1)
    lse = _read(tmp_path, "lse", lse_dtype, (b, h, tq)).double()
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse[finite], want_lse[finite], rtol=1e-4, atol=1e-4 if dtype != torch.bfloat16 else 2e-2)


DECODE_CASES = [(1, 1, 1, 1, 1, 0, False, "none", torch.float32),
                (3, 3, 5, 13, 7, 6, False, "random", torch.float32),
                (2, 4, 16, 40, 50, 17, True, "empty_row", torch.float32),
                (1, 8, 32, 64, 300, 257, False, "random", torch.bfloat16)]


@pytest.mark.parametrize("b,h,d,d_a,s,pos,context,kind,dtype", DECODE_CASES)
def test_c_program_decode_step_matches_reference(capi_check, tmp_path, b, h, d, d_a, s, pos, context, kind, dtype):
    args = _decode_case(b, h, d, d_a, s, dtype, context, kind, seed=s)
    names = ("h_b", "h_a", "w_q", "w_kv", "b_kv", "w_o", "k_cache", "v_cache", "kpm")
    for name, t in zip(names, args):
        if t is not None and not (context and name in ("h_a", "w_kv", "b_kv")):
            _write(tmp_path, name, t)
    _run(capi_check, "decode", tmp_path, NAME[dtype], b, h * d, 0 if context else d_a, h, s, pos,
         int(args[8] is not None))

    up = [None if t is None else t.double() for t in args]
    if context:
        up[1] = None
    k_ref, v_ref = up[6].clone(), up[7].clone()
    want = ref.bridge_decode_step(up[0], up[1], up[2], up[3], up[4], up[5], k_ref, v_ref, pos, h, args[8])
    assert rel(_read(tmp_path, "out", dtype, (b, 1, h * d)), want) <= TOL[dtype]
    assert rel(_read(tmp_path, "k_cache", dtype, (b, h, s, d)), k_ref) <= TOL[dtype]
    assert rel(_read(tmp_path, "v_cache", dtype, (b, h, s, d)), v_ref) <= TOL[dtype]


def test_c_program_bad_calls_fail_with_named_values(capi_check):
    out = _run(capi_check, "errors").stdout
    # Every bad call printed its status and message; the CUDA entry points (real kernels or
    # this build's CF_ERR_UNSUPPORTED versions) wrote to the same error store.
    assert "k: tensor descriptor is NULL" in out
    assert "got 7" in out and "got -3" in out
    assert re.search(r"cf_attn_fwd_cuda\(k = NULL\) -> (1|5): ", out), out
    assert re.search(r"cf_decode_step_cuda\(workspace = NULL\) -> (1: workspace|5: )", out), out


def test_standalone_build_without_python_or_cuda(tmp_path):
    """`cmake -DCALM_FAST_PYTHON=OFF` builds and installs the C library alone (no Python, no
    pybind11); without CUDA its CUDA entry points fail with CF_ERR_UNSUPPORTED and say why.
    One instruction set, to keep the build short."""
    cmake = Path(sys.executable).parent / "cmake"
    cmake = str(cmake) if cmake.is_file() else shutil.which("cmake")
    assert cmake is not None, "cmake not found (requirements.txt pins it)"
    build, prefix = tmp_path / "build", tmp_path / "prefix"
    for cmd in ([cmake, "-S", str(ROOT), "-B", str(build), "-DCALM_FAST_PYTHON=OFF", "-DCALM_FAST_CUDA=OFF",
                 "-DCALM_FAST_ISA_DISPATCH=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                [cmake, "--build", str(build), "-j2"],
                [cmake, "--install", str(build), "--prefix", str(prefix)]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    libdir = next(p.parent for p in prefix.rglob("libcalm_fast.so"))
    assert (prefix / "include" / "calm_fast.h").is_file()
    exe = _compile_c(ROOT / "csrc/examples/capi_check.c", tmp_path / "capi_check",
                     [f"-I{prefix / 'include'}", f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-lcalm_fast"])
    out = _run(exe, "errors").stdout
    assert "cf_decode_workspace_bytes_cuda(1, 4096, 32, 2048) = -1" in out
    assert re.search(r"cf_decode_step_cuda\(workspace = NULL\) -> 5: .*built without CUDA", out), out


def test_readme_c_example_runs_and_matches_the_reference(tmp_path):
    """The README's C program: it compiles as written, runs, and prints the reference's output."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```c\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, "expected exactly one C block in the README"
    src = tmp_path / "example.c"
    src.write_text(blocks[0])
    exe = _compile_c(src, tmp_path / "example", capi.cflags() + capi.libs())
    lines = _run(exe).stdout.splitlines()
    got = torch.tensor([float(x) for x in lines[0].split()], dtype=torch.float64).reshape(1, 1, 3, 4)
    i = torch.arange(20, dtype=torch.float64)
    k = ((i % 7).floor() / 7).float().reshape(1, 1, 5, 4)  # the program's fill, in fp32 as it computes
    v = (i / 20).float().reshape(1, 1, 5, 4)
    q = ((torch.arange(12) % 5) / 5).float().reshape(1, 1, 3, 4)
    want = ref.cross_attention(q.double(), k.double(), v.double(), "aligned")
    assert torch.allclose(got, want, atol=2e-6), (got, want)
    assert lines[1] == "status 2: mask: expected 0 (aligned) or 1 (context), got 7"
