"""Shared benchmark helpers: robust timing (medians, variants interleaved), the machine's
measured ceilings (copy bandwidth, matmul throughput), environment facts, JSON + PNG output.

Timing: every variant of a comparison is timed round-robin in one process (`compare`), so a
noisy, shared machine slows all of them alike; each sample runs enough calls to last at
least `min_sample_s`; results are medians with the 20th/80th percentiles.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------- environment

def device_tag(device: torch.device | str) -> str:
    """'cpu' or a file-name-safe GPU name such as 'nvidia_h100_80gb_hbm3'."""
    device = torch.device(device)
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(device).lower()).strip("_")
    return device.type


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict:
    device = torch.device(device)
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu": cpu_model(), "cpu_threads": torch.get_num_threads(),
           "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sms=props.multi_processor_count,
                   gpu_mem_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    return env


# ------------------------------------------------------------------------------ timing

def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _sample(fn: Callable[[], object], device, calls: int) -> float:
    """Seconds per call over `calls` back-to-back calls (CUDA: events around them)."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _calls_for(fn, device, min_sample_s: float) -> int:
    fn()
    sync(device)
    once = max(_sample(fn, device, 1), 1e-7)
    return max(1, min(10_000, int(min_sample_s / once)))


def summarize(seconds: list[float]) -> dict:
    s = sorted(seconds)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]  # noqa: E731
    return {"ms": statistics.median(s) * 1e3, "p20_ms": q(0.2) * 1e3, "p80_ms": q(0.8) * 1e3,
            "samples": len(s)}


def time_fn(fn: Callable[[], object], device="cpu", repeats: int = 15, warmup: int = 2,
            min_sample_s: float = 2e-3) -> dict:
    """Median time of fn (ms) with spread; fn must do the whole work (no lazy results)."""
    return compare({"_": fn}, device, repeats, warmup, min_sample_s)["_"]


def compare(variants: dict[str, Callable[[], object]], device="cpu", repeats: int = 15,
            warmup: int = 2, min_sample_s: float = 2e-3) -> dict[str, dict]:
    """Time several variants of one computation round-robin; {name: summarize(...)}."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1 (a median needs a sample), got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    calls = {}
    for name, fn in variants.items():
        for _ in range(warmup):
            fn()
        calls[name] = _calls_for(fn, device, min_sample_s)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync(device)
            samples[name].append(_sample(fn, device, calls[name]))
    return {name: summarize(v) for name, v in samples.items()}


# --------------------------------------------------------------------------- ceilings

def ceilings(device: torch.device | str, quick: bool = False) -> dict:
    """Measured peaks: copy bandwidth (GB/s, bytes read + written) and matmul TFLOP/s."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    out = {}
    n_bytes = (1 << 30) if gpu else (1 << 28)
    if quick:
        n_bytes //= 4
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, repeats=7, min_sample_s=0.02)
    out["copy_gbps"] = 2 * n_bytes / (t["ms"] / 1e3) / 1e9
    dtypes = (torch.bfloat16, torch.float32) if gpu else (torch.float32, torch.bfloat16)
    n = (8192 if gpu else 2048) // (2 if quick else 1)
    for dt in dtypes:
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        t = time_fn(lambda: a @ b, device, repeats=5, min_sample_s=0.05)
        out[f"matmul_{str(dt).split('.')[-1]}_tflops"] = 2 * n ** 3 / (t["ms"] / 1e3) / 1e12
    return out


# ----------------------------------------------------------------------------- output

def write_json(path: Path | str, payload: dict) -> Path:
    """Atomically write JSON (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)
    return path


def plot_panels(path: Path | str, panels: list[dict]) -> Path | None:
    """One PNG of side-by-side line panels. Each panel: {"title", "xlabel", "ylabel",
    "series": {label: (xs, ys)}, "logx"?, "logy"?}. Returns None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (xs, ys) in panel["series"].items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(panel["title"], fontsize=10)
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        if panel.get("logx"):
            ax.set_xscale("log", base=2)
        if panel.get("logy"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table of rows (dicts) over the given columns; floats to 3 significant."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
