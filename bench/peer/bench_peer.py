"""calm_fast vs lucidrains' CALM-pytorch (the peer), side by side, in one invocation.

    bench/peer/setup_peer.sh                     # once: bench/peer/.venv with the pinned peer
    cd /work/main && .venv/bin/python bench/peer/bench_peer.py [--repeats 5] [--quick]

Each (implementation, task) runs in its own worker process (bench/peer/worker.py) so peak
RSS is its own. Both workers of a task are started and warmed up, then timed in alternation
(ours, peer, peer, ours, ours, peer, ...: each pair alternates which side goes first), so load
from other users of the machine hits both alike. Every pair gives a ratio peer/ours; we report
the median and spread of times and of the per-pair ratios. Writes bench/results/peer.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEER_PY = ROOT / "bench/peer/.venv/bin/python"
OURS_PY = ROOT / ".venv/bin/python"
WORKER = ROOT / "bench/peer/worker.py"

REFERENCE = {
    "vocab": 256, "max_seq_len": 512,
    "anchor": {"layers": 12, "dim": 512, "heads": 8},
    "augment": {"layers": 6, "dim": 256, "heads": 4},
    # 1-based (augment block, anchor block), the peer's convention; ours = each minus one.
    "connections": [[2, 3], [3, 6], [5, 9], [6, 12]],
    "batch": 4, "seq": 256, "prompt": 64, "new_tokens": 256,
    "warmup": 1, "train_steps_per_run": 2,
    # generation warm-up: one short generate (the peer needs minutes for a full one)
    "gen_warmup_tokens": 8,
}
QUICK = {**REFERENCE, "anchor": {"layers": 4, "dim": 128, "heads": 4},
         "augment": {"layers": 4, "dim": 64, "heads": 2}, "connections": [[2, 2], [4, 4]],
         "seq": 64, "prompt": 16, "new_tokens": 32}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem, 1), "os": platform.platform(),
            "loadavg_at_start": os.getloadavg()}


class Worker:
    def __init__(self, impl: str, task: str, cfg: dict, backend: str | None = None):
        py = OURS_PY if impl == "ours" else PEER_PY
        env = dict(os.environ)
        if impl == "ours":
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        else:
            env.pop("PYTHONPATH", None)
        cmd = [str(py), str(WORKER), "--impl", impl, "--task", task, "--config", json.dumps(cfg)]
        if backend:
            cmd += ["--backend", backend]
        self.name = impl
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (exit {self.p.wait()})")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> dict:
        out = self.ask("quit")
        self.p.wait()
        return out


def summarize(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1],
            "iqr": [xs[len(xs) // 4], xs[(3 * len(xs)) // 4]] if len(xs) >= 4 else [xs[0], xs[-1]],
            "n": len(xs), "values": xs}


def run_task(task: str, cfg: dict, repeats: int) -> dict:
    print(f"[{task}] starting workers", file=sys.stderr, flush=True)
    ours = Worker("ours", task, cfg)
    peer = Worker("peer", task, cfg)
    if ours.info.get("token_checksum") != peer.info.get("token_checksum"):
        raise RuntimeError(f"the two sides read different tokens: {ours.info} vs {peer.info}")
    pairs, order_log, rss_trace = [], [], {"ours": [], "peer": []}
    for r in range(repeats):
        order = (ours, peer) if r % 2 == 0 else (peer, ours)
        res = {}
        for w in order:
            out = w.ask("run")
            res[w.name] = statistics.median(out["times"])
            rss_trace[w.name].append(out["rss_mb"])
        order_log.append([w.name for w in order])
        pairs.append(res)
        print(f"[{task}] pair {r}: ours {res['ours']:.4f}s  peer {res['peer']:.4f}s  "
              f"ratio {res['peer'] / res['ours']:.2f}", file=sys.stderr, flush=True)
    end = {"ours": ours.close(), "peer": peer.close()}
    ratios = [p["peer"] / p["ours"] for p in pairs]
    return {
        "ours_s": summarize([p["ours"] for p in pairs]), "peer_s": summarize([p["peer"] for p in pairs]),
        "ratio_peer_over_ours": summarize(ratios), "pairs": pairs, "order": order_log,
        "peak_rss_mb": {"ours": end["ours"]["peak_rss_mb"], "peer": end["peer"]["peak_rss_mb"]},
        "rss_after_import_mb": {"ours": ours.info["rss_after_import_mb"], "peer": peer.info["rss_after_import_mb"]},
        "rss_after_each_run_mb": rss_trace,
        "info": {"ours": ours.info, "peer": peer.info},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="alternating pairs per task")
    ap.add_argument("--gen-repeats", type=int, default=None, help="pairs for generation (default: --repeats)")
    ap.add_argument("--quick", action="store_true", help="tiny models: a plumbing check, not a result")
    ap.add_argument("--tasks", default="train,generate")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in every worker (0 = torch's default, one per core)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/peer.json"))
    args = ap.parse_args()
    if not PEER_PY.exists():
        sys.exit("bench/peer/.venv is missing: run bench/peer/setup_peer.sh first")
    cfg = dict(QUICK if args.quick else REFERENCE, threads=args.threads)
    t0 = time.time()
    results = {"config": cfg, "machine": machine(), "quick": args.quick,
               "command": "cd /work/main && .venv/bin/python bench/peer/bench_peer.py " + " ".join(sys.argv[1:])}
    tasks = args.tasks.split(",")
    if "generate" in tasks:
        results["generate"] = run_task("generate", cfg, args.gen_repeats or args.repeats)
        finish(results, cfg, args, t0)
    if "train" in tasks:
        results["train_step"] = run_task("train", cfg, args.repeats)
    finish(results, cfg, args, t0)


def finish(results, cfg, args, t0):
    """Derive the headline figures and write the JSON (called after each task too)."""
    any_task = results.get("train_step") or results.get("generate")
    results["versions"] = {"ours": any_task["info"]["ours"]["versions"], "peer": any_task["info"]["peer"]["versions"]}
    if "train_step" in results:
        results["train_step_speedup"] = results["train_step"]["ratio_peer_over_ours"]["median"]
        results["train_tokens_per_s"] = {k: cfg["batch"] * cfg["seq"] / results["train_step"][f"{k}_s"]["median"]
                                         for k in ("ours", "peer")}
    if "generate" in results:
        results["generate_speedup"] = results["generate"]["ratio_peer_over_ours"]["median"]
        results["generate_tokens_per_s"] = {k: cfg["new_tokens"] / results["generate"][f"{k}_s"]["median"]
                                            for k in ("ours", "peer")}
    results["peak_rss_mb"] = {k: max(results[t]["peak_rss_mb"][k] for t in ("train_step", "generate") if t in results)
                              for k in ("peer", "ours")}
    results["peak_rss_mb_by_task"] = {t: results[t]["peak_rss_mb"] for t in ("train_step", "generate") if t in results}
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["wall_s"] = time.time() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results.get(k) for k in ("train_step_speedup", "generate_speedup", "peak_rss_mb")}, indent=2))


if __name__ == "__main__":
    main()
