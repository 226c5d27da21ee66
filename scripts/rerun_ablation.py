"""Re-runs one ablation row of the key-value arithmetic results (what `calm-fast demo --full`
wrote to results/kv_arith.json) with the current code, at the run's own settings, and rewrites
the JSON, the markdown table and the plot. The JSON lists every row re-run this way ("reruns":
variant, date, command, the row before), so the table never mixes code versions silently.

    PYTHONPATH=. python scripts/rerun_ablation.py lora --threads 2
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

from calm_fast import checkpoint
from calm_fast.demo import (ASSETS, VARIANTS, check_targets, load_bases, markdown_table, pick_device,
                            plot_curves, run_ablation)
from calm_fast.train import TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variant", choices=VARIANTS[1:])
    p.add_argument("--results", type=Path, default=Path("results"), help="folder holding kv_arith.json")
    p.add_argument("--runs", type=Path, default=Path("runs/kv_arith_rerun"), help="where the training run goes")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    path = args.results / "kv_arith.json"
    r = checkpoint.load_json(path)
    cfg = r["config"]
    if args.variant not in r.get("ablations", {}):
        sys.exit(f"{path} has no {args.variant!r} ablation row to re-run (run calm-fast demo --full first)")
    device = pick_device(None)
    bases = cfg["bases"] if Path(cfg["bases"]).is_dir() else ASSETS  # the run's, or the shipped ones
    task, m_A, m_B = load_bases(bases, device)
    dc, seed = cfg["d_c"][0], r["seeds"][0]
    tcfg = TrainConfig(**{**cfg["compose_train"], "seed": seed, "progress": False})
    before = r["ablations"][args.variant]
    row, curve = run_ablation(args.variant, task, m_A, m_B, dc, tcfg, [tuple(m) for m in cfg["mapping"]],
                              args.runs / f"{args.variant}_{dc}_seed{seed}", device, print,
                              cfg["d_c_literal_fraction"] if dc == "kv_arithmetic" else None, cfg["eval_samples"])
    r["ablations"][args.variant], r["curves"][args.variant] = row, curve
    r["targets"] = check_targets(r)
    r.setdefault("reruns", []).append({"variant": args.variant, "date": datetime.date.today().isoformat(),
                                       "command": " ".join(sys.argv), "before": before,
                                       "threads": torch.get_num_threads()})
    checkpoint.save_json(path, r)
    (args.results / "kv_arith.md").write_text(markdown_table(r))
    try:
        plot_curves(r, args.results / "kv_arith.png", bases)
    except ImportError:
        print("matplotlib is not installed: no plot")
    print(f"{args.variant}: {before} -> {row}")


if __name__ == "__main__":
    main()
