"""Composition training throughput at the reference configuration: eager vs torch.compile vs
the native-kernel backend ("cpp") vs augment-state caching, each a full step (forward +
backward + AdamW on Θ_C).

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/bench_train.py [--repeats 5] [--threads N]

Reference configuration (bench/README.md): anchor 12 x 512 (8 heads), augment 6 x 256
(4 heads), vocab 256, bridges [(1, 2), (2, 5), (4, 8), (5, 11)] (0-based), batch 4 x 256,
fp32. Variants are timed round-robin (rotating which goes first) so load on a shared
machine hits them alike. The cpp variants are skipped, with a note, when
calm_fast.ops.available_backends() does not list "cpp". "cached_states" is the eager step
with the augment's tapped states read from a calm_fast.state_cache.StateCache (float32
storage, built once before timing; the memory-mapped read is inside the timed step) instead
of running the augment model. Writes bench/results/train_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import calm_fast as cf  # noqa: E402
from calm_fast.state_cache import StateCache, build_state_cache, forward_with_states  # noqa: E402

REF = {"vocab": 256, "max_seq_len": 512, "anchor": (12, 512, 8), "augment": (6, 256, 4),
       "mapping": [(1, 2), (2, 5), (4, 8), (5, 11)], "batch": 4, "seq": 256}


def build(backend: str, ref: dict) -> cf.CALM:
    torch.manual_seed(0)

    def dec(layers, dim, heads):
        return cf.Decoder(cf.DecoderConfig(arch="llama", vocab_size=ref["vocab"], dim=dim, n_layers=layers,
                                           n_heads=heads, n_kv_heads=heads, ffn_dim=4 * dim,
                                           max_seq_len=ref["max_seq_len"]))
    return cf.CALM(dec(*ref["anchor"]), [dec(*ref["augment"])], mapping=ref["mapping"], backend=backend).train()


class Variant:
    def __init__(self, name: str, backend: str, compiled: bool, ref: dict, seq: torch.Tensor,
                 cached_states: bool = False):
        self.name = name
        self.calm = build(backend, ref)
        self.opt = torch.optim.AdamW(self.calm.trainable_parameters(), lr=1e-4)
        self.inp, self.labels = seq[:, :-1], seq[:, 1:]
        calm = self.calm
        if cached_states:
            self._tmp = tempfile.TemporaryDirectory(prefix="calm_fast_bench_states_")
            path = build_state_cache(calm, self.inp.tolist(), Path(self._tmp.name) / "states", dtype="float32")
            cache, rows = StateCache(path, calm), list(range(self.inp.shape[0]))

            def loss_fn(inp, labels):
                states, _ = cache.batch(rows)
                logits = forward_with_states(calm, inp, states)
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        else:
            def loss_fn(inp, labels):
                logits = calm(inp)
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        self.loss_fn = torch.compile(loss_fn) if compiled else loss_fn
        t = time.perf_counter()
        self.first_loss = float(self.step())  # compiles, when compiled
        self.first_step_s = time.perf_counter() - t

    def step(self):
        loss = self.loss_fn(self.inp, self.labels)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


SPECS = {"eager": ("reference", False, False), "compile": ("reference", True, False),
         "cpp_eager": ("cpp", False, False), "cpp_compile": ("cpp", True, False),
         "cached_states": ("reference", False, True)}


def check_args(ap: argparse.ArgumentParser, args, have_cpp: bool) -> None:
    """Every argument the run would trip over later (a KeyError after earlier variants were
    built and compiled, an empty median after every round), as an argparse error (exit 2)
    before any model is built."""
    for flag in ("repeats", "steps"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.threads < 0:
        ap.error(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    names = args.variants.split(",")
    for name in names:
        if name not in SPECS:
            ap.error(f"--variants: unknown variant {name!r} in {args.variants!r} (choose from {', '.join(SPECS)})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        ap.error(f"--variants names {dup[0]!r} more than once in {args.variants!r}")
    if not have_cpp and all(SPECS[n][0] == "cpp" for n in names):
        ap.error(f"--variants {args.variants}: every variant needs the 'cpp' backend, which "
                 f"calm_fast.ops.available_backends() does not list (extension not built)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each times every variant once")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--variants", default="eager,compile,cpp_eager,cpp_compile,cached_states")
    ap.add_argument("--small", action="store_true", help="tiny models: a plumbing check, not a result")
    ap.add_argument("--out", default=str(ROOT / "bench/results/train_cpu.json"))
    args = ap.parse_args(argv)
    have_cpp = "cpp" in cf.ops.available_backends("cpu")
    check_args(ap, args, have_cpp)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = dict(REF)
    if args.small:
        ref.update(anchor=(4, 128, 4), augment=(4, 64, 2), mapping=[(1, 1), (3, 3)], seq=64)
    seq = torch.randint(0, ref["vocab"], (ref["batch"], ref["seq"] + 1), generator=torch.Generator().manual_seed(1234))
    notes, variants = [], []
    for name in args.variants.split(","):
        backend, compiled, cached = SPECS[name]
        if backend == "cpp" and not have_cpp:
            notes.append(f"{name}: skipped, calm_fast.ops.available_backends() has no 'cpp' (extension not built)")
            continue
        print(f"building {name}", file=sys.stderr, flush=True)
        variants.append(Variant(name, backend, compiled, ref, seq, cached))
    losses = {v.name: v.first_loss for v in variants}
    times = {v.name: [] for v in variants}
    for r in range(args.repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            ts = []
            for _ in range(args.steps):
                t = time.perf_counter()
                v.step()
                ts.append(time.perf_counter() - t)
            times[v.name].append(statistics.median(ts))
        print(f"round {r}: " + "  ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items()), file=sys.stderr, flush=True)
    tokens = ref["batch"] * ref["seq"]
    res = {"command": "cd /work/main && PYTHONPATH=. .venv/bin/python bench/bench_train.py " + " ".join(sys.argv[1:]),
           "config": {**{k: v for k, v in ref.items()}, "threads": torch.get_num_threads(), "dtype": "float32",
                      "optimizer": "torch.optim.AdamW(lr=1e-4)"},
           "machine": {"cores": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
           "versions": {"torch": torch.__version__, "calm_fast": cf.__version__, "python": sys.version.split()[0]},
           "available_backends": cf.ops.available_backends(), "notes": notes, "first_step_loss": losses,
           "first_step_s (includes compilation)": {v.name: v.first_step_s for v in variants},
           "step_s": {n: {"median": statistics.median(t), "min": min(t), "max": max(t), "values": t}
                      for n, t in times.items()},
           "tokens_per_s": {n: tokens / statistics.median(t) for n, t in times.items()}}
    base = res["step_s"].get("eager", {}).get("median")
    if base:
        res["speedup_vs_eager"] = {n: base / s["median"] for n, s in res["step_s"].items()}
    from torch.profiler import ProfilerActivity, profile
    v = variants[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        v.step()
    res[f"profile_{v.name}_step"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(res[f"profile_{v.name}_step"], file=sys.stderr)
    print(json.dumps({k: res.get(k) for k in ("tokens_per_s", "speedup_vs_eager", "notes")}, indent=2))


if __name__ == "__main__":
    main()
