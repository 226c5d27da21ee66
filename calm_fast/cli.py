"""The calm-fast command: demo, train-bases, train, eval, generate, export.

Errors on bad input are printed as one line (no traceback) and exit with status 2."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path


class CLIError(Exception):
    pass


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be comma-separated ints, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds is empty")
    return seeds


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {v}")
    return v


def _common(p: argparse.ArgumentParser, seed_help: str = "random seed") -> None:
    p.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .demo import ASSETS, RESULTS
    parser = argparse.ArgumentParser(
        prog="calm-fast",
        description="CALM (Composition to Augment Language Models): the key-value arithmetic experiment "
                    "of the paper, and tools around a composed model.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="compose the shipped base models on key-value arithmetic and print the table",
                       description="Train Θ_C (the bridges) on D_C = KV-Arithmetic over held-in keys with the "
                                   "shipped m_A and m_B, evaluate on held-out keys and print the paper's Table 1 "
                                   "layout beside the paper's numbers. Writes kv_arith.{json,md,png} to --out "
                                   "(runs/kv_arith; the committed reference run used --out results).")
    p.add_argument("--train-bases", action="store_true", help="retrain m_A and m_B from scratch first")
    p.add_argument("--scale", choices=("cpu", "paper", "tiny"), default="cpu",
                   help="task/model scale for --train-bases (default cpu; 'paper' = 25K keys, 3-6 operands, "
                        "+ - x, for a GPU machine)")
    p.add_argument("--bases", default=str(ASSETS), help=f"directory of the base models (default {ASSETS})")
    p.add_argument("--seeds", type=_seeds, default=None,
                   help="comma-separated composition seeds (default: --seed only; the reference run used 0,1,2)")
    p.add_argument("--ablations", action="store_true",
                   help="also train the paper's Table 5 ablations: random m_A, m_A as an encoder, LoRA on m_B, "
                        "full fine-tuning of m_B")
    p.add_argument("--dc", choices=("kv_arithmetic", "kv_substitution", "both"), default="kv_arithmetic",
                   help="composition data D_C over held-in keys (default kv_arithmetic, the paper's §3.2; "
                        "kv_substitution is its §4.1)")
    p.add_argument("--steps", type=_positive, default=None, help="composition training steps (default per scale)")
    p.add_argument("--literal-fraction", type=_fraction, default=None,
                   help="share of D_C operands written as numbers instead of keys (default: "
                        "calm_fast.demo.DC_LITERAL_FRACTION; 0 = the paper's pure KV-Arithmetic D_C)")
    p.add_argument("--eval-samples", type=_positive, default=500, help="examples per table cell (default 500)")
    p.add_argument("--out", default="runs/kv_arith",
                   help=f"where the JSON/markdown/plot go (default runs/kv_arith, so a demo never overwrites the "
                        f"committed reference run in {RESULTS})")
    p.add_argument("--runs", default="runs/kv_arith", help="checkpoints, metrics and bridges (default runs/kv_arith)")
    p.add_argument("--full", action="store_true", help="the reference run: seeds 0,1,2, ablations, D_C both")
    _common(p, "composition seed")

    p = sub.add_parser("train-bases", help="train m_A and m_B from scratch",
                       description="m_A learns KV-Substitution over all keys (it never sees an arithmetic answer); "
                                   "m_B learns Numeric-Arithmetic (it never sees a key token). Writes "
                                   "task.json, m_A.*, m_B.* and the training metrics into --out. Resumes from "
                                   "checkpoints in --out unless --restart.")
    p.add_argument("--scale", choices=("cpu", "paper", "tiny"), default="cpu", help="default cpu")
    p.add_argument("--out", default=str(ASSETS), help=f"default {ASSETS}")
    p.add_argument("--role", choices=("m_A", "m_B", "both"), default="both", help="which base to train")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints")
    _common(p, "task and training seed")

    p = sub.add_parser("train", help="run one training job described by a JSON file",
                       description='JSON: {"job": "base", "role": "m_A"|"m_B", "scale": "cpu", "out": DIR, '
                                   '"train": {TrainConfig fields}} or {"job": "compose", "bases": DIR, '
                                   '"variant": "calm"|"random_m_A"|"encoder"|"lora"|"full_ft", '
                                   '"dc": "kv_arithmetic"|"kv_substitution", "mapping": [[a, b], ...], '
                                   '"literal_fraction": share of kv_arithmetic operands written as numbers, '
                                   '"out": DIR, "train": {TrainConfig fields}}.')
    p.add_argument("--config", required=True, help="path of the job's JSON file")
    _common(p, "overrides train.seed when given")

    p = sub.add_parser("eval", help="evaluate m_A, m_B and (with --bridges) CALM on the three datasets",
                       description="Exact match with greedy cached generation; KV rows on held-out keys.")
    p.add_argument("--bases", default=str(ASSETS), help=f"default {ASSETS}")
    p.add_argument("--bridges", default=None, help="a directory written by save_bridges (optional)")
    p.add_argument("--samples", type=_positive, default=500, help="examples per cell (default 500)")
    _common(p, "evaluation sample seed")

    p = sub.add_parser("generate", help="complete a prompt with m_A, m_B or CALM",
                       description='Example: calm-fast generate "12 + 30 =" --model m_B. Numbers are written '
                                   "normally; the models read and write them least-significant digit first "
                                   "internally.")
    p.add_argument("prompt", help='expression ending in "=", e.g. "ab + cd =" (keys) or "12 + 30 ="')
    p.add_argument("--model", choices=("m_A", "m_B", "calm"), default=None,
                   help="default: calm when --bridges is given, else m_B")
    p.add_argument("--bases", default=str(ASSETS), help=f"default {ASSETS}")
    p.add_argument("--bridges", default=None, help="Θ_C directory for --model calm")
    p.add_argument("--max-new-tokens", type=_positive, default=None,
                   help="default: as many as the longest answer needs (within max_seq_len)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=_positive, default=None)
    p.add_argument("--top-p", type=float, default=None)
    _common(p, "sampling seed")

    p = sub.add_parser("export", help="export a composed model to ONNX",
                       description="Loads the bases and the bridges and calls calm_fast.export_onnx.")
    p.add_argument("--bridges", required=True, help="Θ_C directory written by save_bridges")
    p.add_argument("--bases", default=str(ASSETS), help=f"default {ASSETS}")
    p.add_argument("--out", required=True, help="output directory")
    _common(p)
    return parser


def _setup(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def _load_calm(bases, bridges, device):
    from .composed import CALM, read_bridges_config
    from .demo import load_bases
    cfg = read_bridges_config(bridges)  # the config saved with the bridges, not a stale copy
    if len(cfg.mappings) != 1:
        raise CLIError(f"{bridges}: the saved composition has {len(cfg.mappings)} augment model mapping(s); "
                       f"the CLI composes exactly one (m_A into m_B)")
    task, m_A, m_B = load_bases(bases, device)
    calm = CALM(m_B, [m_A], mapping=cfg.mappings[0], mode=cfg.mode).to(device)
    calm.load_bridges(bridges)
    calm.eval()
    return task, m_A, m_B, calm


def cmd_demo(args):
    from .demo import run_demo
    seeds = args.seeds or ([0, 1, 2] if args.full else [args.seed])
    dcs = ("kv_arithmetic", "kv_substitution") if (args.dc == "both" or args.full) else (args.dc,)
    run_demo(bases=args.bases, train_bases_first=args.train_bases, scale=args.scale, seeds=seeds,
             ablations=args.ablations or args.full, dcs=dcs, steps=args.steps, eval_samples=args.eval_samples,
             literal_fraction=args.literal_fraction,
             out=args.out, runs=args.runs, device=args.device, base_seed=args.seed,
             progress=not args.no_progress, command="calm-fast " + shlex.join(sys.argv[1:]))


def cmd_train_bases(args):
    from .demo import train_bases
    roles = ("m_A", "m_B") if args.role == "both" else (args.role,)
    train_bases(args.scale, args.out, seed=args.seed, device=args.device, roles=roles,
                resume=not args.restart, progress=not args.no_progress)
    from . import checkpoint
    checkpoint.save_json(Path(args.out) / f"command.{args.role}.json",
                         {"command": "calm-fast " + shlex.join(sys.argv[1:]), "threads": args.threads})


def cmd_train(args):
    from . import checkpoint
    from .demo import (BASE_TRAIN, COMPOSE_TRAIN, SCALES, KVArith, TaskConfig, load_bases, model_config,
                       pick_device, scale_of, train_base, train_composition)
    from .train import TrainConfig
    job = checkpoint.load_json(args.config)
    if not isinstance(job, dict):
        raise CLIError(f"{args.config}: a job file must hold a JSON object, got a JSON {type(job).__name__}")
    for key in ("train", "task"):
        if key in job and not isinstance(job[key], dict):
            raise CLIError(f"{args.config}: {key!r} must be a JSON object of fields, got {job[key]!r}")
    kind = job.get("job")
    out = job.get("out")
    if not out:
        raise CLIError(f"{args.config}: 'out' (output directory) is required")
    device = pick_device(args.device)
    if kind == "base":
        scale = job.get("scale", "cpu")
        if scale not in SCALES:
            raise CLIError(f"{args.config}: scale must be one of {sorted(SCALES)}, got {scale!r}")
        role = job.get("role")
        if role not in ("m_A", "m_B"):
            raise CLIError(f"{args.config}: role must be 'm_A' or 'm_B', got {role!r}")
        task = KVArith(TaskConfig.from_dict({**SCALES[scale].to_dict(), **job.get("task", {})}))
        tcfg = TrainConfig.from_dict({**BASE_TRAIN[scale][role], **job.get("train", {}),
                                      **({"seed": args.seed} if "--seed" in sys.argv else {}),
                                      "progress": not args.no_progress})
        checkpoint.save_json(Path(out) / "task.json", task.cfg.to_dict())
        train_base(role, task, model_config(task, role, scale), tcfg, out, device)
    elif kind == "compose" and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or job.get("distributed")):
        # Under torchrun (or with a "distributed" block): DDP / FSDP2 over the same job.
        from .distributed import run_compose_job
        run_compose_job(job, seed=args.seed if "--seed" in sys.argv else None, device=args.device or "auto",
                        progress=not args.no_progress)
    elif kind == "compose":
        task, m_A, m_B = load_bases(job.get("bases", None) or __import__("calm_fast.demo").demo.ASSETS, device)
        scale = scale_of(task)
        tcfg = TrainConfig.from_dict({**COMPOSE_TRAIN[scale], **job.get("train", {}),
                                      **({"seed": args.seed} if "--seed" in sys.argv else {}),
                                      "progress": not args.no_progress})
        from .demo import MAPPINGS
        mapping = [tuple(p) for p in job["mapping"]] if "mapping" in job else MAPPINGS[scale]
        v = train_composition(task, m_A, m_B, job.get("variant", "calm"), job.get("dc", "kv_arithmetic"),
                              tcfg, mapping, out, device, literal_fraction=job.get("literal_fraction"))
        if hasattr(v.model, "save_bridges"):
            v.model.save_bridges(Path(out) / "bridges")
            print(f"bridges saved to {Path(out) / 'bridges'}")
    else:
        raise CLIError(f"{args.config}: 'job' must be 'base' or 'compose', got {kind!r}")


def cmd_eval(args):
    from .demo import evaluate_row, load_bases, pick_device, ROW_NAMES
    device = pick_device(args.device)
    if args.bridges:
        task, m_A, m_B, calm = _load_calm(args.bases, args.bridges, device)
    else:
        (task, m_A, m_B), calm = load_bases(args.bases, device), None
    models = {"m_A": m_A, "m_B": m_B, **({"CALM": calm} if calm is not None else {})}
    rows = {name: evaluate_row(m, task, args.samples, calm.mode if m is calm else "aligned", seed=args.seed)
            for name, m in models.items()}
    print("| dataset | " + " | ".join(models) + " |")
    print("|---" * (len(models) + 1) + "|")
    for d, label in ROW_NAMES.items():
        print(f"| {label} | " + " | ".join(f"{rows[n][d]:.1f}" for n in models) + " |")
    print(json.dumps(rows))


def cmd_generate(args):
    import torch
    from .demo import load_bases, pick_device
    from .generate import generate
    device = pick_device(args.device)
    which = args.model or ("calm" if args.bridges else "m_B")
    if which == "calm":
        if not args.bridges:
            raise CLIError("--model calm needs --bridges DIR (a directory written by save_bridges)")
        task, m_A, m_B, model = _load_calm(args.bases, args.bridges, device)
        if model.mode != "aligned":
            raise CLIError("generate supports aligned-mode compositions only")
    else:
        task, m_A, m_B = load_bases(args.bases, device)
        model = m_A if which == "m_A" else m_B
    text = args.prompt.strip()
    if not text.endswith("="):
        text += " ="
    try:
        ids = [task.tok.bos_id] + task.tok.encode(text)
    except ValueError as e:
        raise CLIError(str(e)) from None
    gen = torch.Generator(device=device).manual_seed(args.seed)
    room = m_B.cfg.max_seq_len - len(ids)
    if room <= 0:
        raise CLIError(f"prompt of {len(ids)} tokens leaves no room within max_seq_len={m_B.cfg.max_seq_len}")
    limit = args.max_new_tokens or max(task.max_answer_len(d) for d in ("kv_substitution", "kv_arithmetic"))
    out = generate(model, [ids], max_new_tokens=min(limit, room), temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, eos_id=task.tok.eos_id, generator=gen)
    new = out[0, len(ids):].tolist()
    if task.tok.eos_id in new:
        new = new[:new.index(task.tok.eos_id)]
    print(f"{text} {task.tok.decode(new)}")


def cmd_export(args):
    try:
        from .onnx_export import export_onnx
    except ImportError as e:
        raise CLIError(f"ONNX export is not available: calm_fast.onnx_export could not be imported ({e})") from None
    from .demo import pick_device
    _, _, _, calm = _load_calm(args.bases, args.bridges, pick_device(args.device))
    export_onnx(calm, args.out)
    print(f"exported to {args.out}")


COMMANDS = {"demo": cmd_demo, "train-bases": cmd_train_bases, "train": cmd_train, "eval": cmd_eval,
            "generate": cmd_generate, "export": cmd_export}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _setup(args)
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, FileNotFoundError, KeyError, json.JSONDecodeError) as e:
        print(f"calm-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
