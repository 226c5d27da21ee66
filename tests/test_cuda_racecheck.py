"""The CUDA kernels under the emulator's race checker: csrc/cuda built with g++ -fsanitize=thread
against csrc/cuda/emulator, where every CUDA thread is a ThreadSanitizer fiber and only what
orders GPU threads (the launch, __syncwarp, __syncthreads, grid.sync(), fences) orders their
accesses (emulator/emu_core.hpp). TSan then reports any shared- or global-memory access pair
from two CUDA threads, one a write, that no barrier orders: a missing __syncthreads after a
cp.async wait, a lane reading what lane 0 writes without __syncwarp, a block reading another
block's partial sums before the writer's fence. The cases are test_cuda_emulated.py's
(tests/cuda_racecheck.py runs them in a subprocess with libtsan preloaded); the last tests
remove one barrier from a copy of the sources and require the checker to name that kernel."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _libtsan() -> Path | None:
    cxx = shutil.which("g++")
    if cxx is None:
        return None
    found = subprocess.run([cxx, "-print-file-name=libtsan.so"], capture_output=True, text=True).stdout.strip()
    return Path(found) if os.path.isabs(found) and Path(found).exists() else None


LIBTSAN = _libtsan()
pytestmark = pytest.mark.skipif(LIBTSAN is None, reason="g++ has no ThreadSanitizer runtime (libtsan.so)")


def _racecheck(*args: str, root: Path = ROOT, stop_at_first: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, CF_EMU_SANITIZE="thread", OMP_NUM_THREADS="1", LD_PRELOAD=str(LIBTSAN),
               TSAN_OPTIONS=f"halt_on_error={int(stop_at_first)} exitcode=66",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    cmd = [sys.executable, str(ROOT / "tests" / "cuda_racecheck.py"), "--root", str(root), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.parametrize("args", [(), ("--knobs", "--only", "decode")], ids=["kernels", "decode_knobs"])
def test_kernels_have_no_data_races(args):
    """Every attention kernel (mma.sync, WMMA, generic) and the cooperative decode step (with
    its grid barriers, and with the dataflow knob's counters instead) on the emulated cases."""
    done = _racecheck(*args)
    assert "ThreadSanitizer" not in done.stderr, done.stderr[-8000:]
    assert done.returncode == 0 and "racecheck ran" in done.stdout, done.stdout + done.stderr[-4000:]


# (file, text removed, what it ordered, racecheck arguments)
MUTANTS = [
    ("cuda/attn_fwd_mma.cu", "      cp_async_wait<1>();  // K_j has landed (V_j may not have)\n      __syncthreads();\n",
     "other warps' cp.async copies of K before ldmatrix reads them", ("--only", "attention")),
    ("cuda/attn_fwd.cu",
     "      __syncwarp();  // every lane has read st_m[row] before lane 0 rewrites it (shuffles order no memory)\n",
     "the lanes' reads of the running max before lane 0's write", ("--only", "attention")),
    ("cuda/decode_step.cu", "  __syncwarp();\n  __threadfence();\n}",
     "the dataflow wait's fence before reading other blocks' rows", ("--knobs", "--only", "decode")),
]


@pytest.mark.parametrize("path,removed,ordered,args", MUTANTS, ids=["mma_syncthreads", "wmma_syncwarp", "decode_fence"])
def test_race_checker_finds_a_removed_barrier(tmp_path, path, removed, ordered, args):
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    source = tmp_path / "csrc" / path
    text = source.read_text()
    assert text.count(removed) == 1, f"{path} no longer holds the barrier this test removes"
    keep = "  __syncwarp();\n}" if path.endswith("decode_step.cu") else ""  # the fence alone goes
    source.write_text(text.replace(removed, keep))
    done = _racecheck(*args, root=tmp_path, stop_at_first=True)
    assert done.returncode == 66, f"no race reported without {ordered}:\n{done.stdout}{done.stderr[-4000:]}"
    assert "WARNING: ThreadSanitizer: data race" in done.stderr
    assert f"{source}:" in done.stderr, done.stderr[-4000:]  # the report points into the mutated kernel
