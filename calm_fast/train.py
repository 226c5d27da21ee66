"""Training: the base models (m_A, m_B) and the composition (Θ_C only), one loop for all.

AdamW, linear warmup + cosine decay, gradient clipping, loss on answer tokens only, gradient
accumulation, optional torch.compile of the loss step, optional bf16 autocast, periodic
evaluation, checkpoints every N steps with exact resume, metrics as JSONL, a tqdm bar.

Exact resume: each step's data is a pure function of (seed, step, micro-step), and a
checkpoint holds the trained tensors, AdamW's state and the step, so a run resumed from a
checkpoint produces bitwise the same losses as one that never stopped.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .config import _JSONMixin

CKPT_DIR = "checkpoint"
CKPT_FORMAT = 2
CKPT_META = "calm_fast.train"  # key of the JSON state in the checkpoint file's metadata
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig(_JSONMixin):
    steps: int = 1000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0
    eval_every: int = 0          # 0 = only at the end
    eval_samples: int = 200
    ckpt_every: int = 0          # 0 = no intermediate checkpoints
    log_every: int = 10
    seed: int = 0
    compile: bool = False
    bf16: bool = False
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2 or \
                not all(_is_real(b) and 0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"train.betas must be a pair of numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in self.betas)
        for name, lo, hi, what in (("lr", 0.0, math.inf, "a finite number > 0"),
                                   ("min_lr_ratio", 0.0, 1.0, "a number in [0, 1]"),
                                   ("weight_decay", 0.0, math.inf, "a finite number >= 0"),
                                   ("clip", 0.0, math.inf, "a finite number >= 0 (0 = no clipping)")):
            v = getattr(self, name)
            ok = _is_real(v) and math.isfinite(v) and lo <= v <= hi and not (name == "lr" and v == 0)
            if not ok:
                raise ValueError(f"train.{name} must be {what}, got {v!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"train.{name} must be a positive int, got {v!r}")
        for name in ("warmup", "eval_every", "ckpt_every", "eval_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"train.{name} must be a non-negative int, got {v!r}")


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine down to cfg.lr * min_lr_ratio at cfg.steps."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))


def answer_loss(logits: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over answer tokens only: loss_mask[b, t] = position t predicts an answer
    token tokens[b, t+1]."""
    m = loss_mask[:, :-1]
    return F.cross_entropy(logits[:, :-1][m].float(), tokens[:, 1:][m])


def make_optimizer(params: dict[str, nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on vectors (norms, biases)."""
    decay = [p for n, p in params.items() if p.dim() >= 2]
    no_decay = [p for n, p in params.items() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


# ---- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(directory: Path, step: int, params: dict[str, nn.Parameter],
                    opt: torch.optim.Optimizer, extra: dict | None = None) -> None:
    """Trained tensors + AdamW state + step and param groups in ONE safetensors file (its
    metadata holds the JSON), written atomically: a crash mid-save leaves the previous
    checkpoint whole. state.json beside it is a human-readable copy; loading never reads it."""
    directory = Path(directory)
    sd = opt.state_dict()
    # The optimizer's state is indexed by its own parameter order (make_optimizer groups
    # matrices before vectors), not by the order of `params`: map through identities.
    order = [p for g in opt.param_groups for p in g["params"]]
    name_of = {id(p): n for n, p in params.items()}
    tensors = {f"param.{n}": p.detach() for n, p in params.items()}
    scalars = {}
    for idx, st in sd["state"].items():
        n = name_of[id(order[idx])]
        for k, v in st.items():
            if torch.is_tensor(v) and v.dim() > 0:
                tensors[f"opt.{n}.{k}"] = v
            else:
                scalars[f"{n}.{k}"] = float(v)
    groups = [{**{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"},
               "params": [name_of[id(order[i])] for i in g["params"]]} for g in sd["param_groups"]]
    meta = {"format": CKPT_FORMAT, "step": step, "param_groups": groups, "scalars": scalars,
            "names": list(params), **(extra or {})}
    checkpoint.save_tensors(directory / "state.safetensors", tensors, metadata={CKPT_META: json.dumps(meta)})
    checkpoint.save_json(directory / "state.json", meta)


LOG_WINDOW = "log_window"  # checkpoint meta: [loss sum, steps] since the last log record


def log_window(meta: dict) -> tuple[float, int]:
    """The running loss window a checkpoint saved, so that a resumed run logs the same averages
    as one that never stopped (older checkpoints: an empty window)."""
    loss, n = meta.get(LOG_WINDOW, (0.0, 0))
    return float(loss), int(n)


def load_checkpoint(directory: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> dict:
    """Restore `params` and `opt` from save_checkpoint's file; every tensor is checked (present,
    shape, floating dtype) and an error names the file and the tensor."""
    path = Path(directory) / "state.safetensors"
    tensors, file_meta = checkpoint.load_tensors_and_metadata(path)
    try:
        meta = json.loads(file_meta[CKPT_META])
        names, groups_saved, scalars = meta["names"], meta["param_groups"], meta["scalars"]
        int(meta["step"])
    except (KeyError, TypeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: not a calm_fast training checkpoint (metadata: {e!r})") from None
    if names != list(params):
        missing = [n for n in params if n not in names]
        unexpected = [n for n in names if n not in params]
        parts = [f"{label} {ns[:4]}" for label, ns in (("missing", missing), ("unexpected", unexpected)) if ns]
        what = ", ".join(parts) or "the same names in another order"
        raise ValueError(f"{path}: checkpoint's parameters do not match this run's ({what}): it was "
                         f"saved by another configuration; resume with that one or use a new output directory")
    expected = {f"param.{n}": p for n, p in params.items()}
    for key, t in tensors.items():
        if key.startswith("opt."):
            n = key[4:].rsplit(".", 1)[0]
            if n not in params:
                raise ValueError(f"{path}: optimizer tensor {key!r} belongs to no parameter")
            expected[key] = params[n]
    checkpoint.check_shapes(path, tensors, expected)
    order = [p for g in opt.param_groups for p in g["params"]]
    index = {id(p): i for i, p in enumerate(order)}
    state = {}
    for n, p in params.items():  # sorted: the same state order in every process (FSDP's
        # load places each tensor with a collective, in this order)
        st = {k.rsplit(".", 1)[1]: v for k, v in sorted(tensors.items()) if k.startswith(f"opt.{n}.")}
        for key, val in scalars.items():
            if key.rsplit(".", 1)[0] == n:
                st[key.rsplit(".", 1)[1]] = torch.tensor(val)
        if st:
            state[index[id(p)]] = st
    groups = []
    for g, live in zip(groups_saved, opt.param_groups):
        if [id(params[n]) for n in g["params"]] != [id(p) for p in live["params"]]:
            raise ValueError(f"{path}: optimizer parameter groups do not match this run's")
        groups.append({**{k: (tuple(v) if k == "betas" else v) for k, v in g.items()},
                       "params": [index[id(params[n])] for n in g["params"]]})
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    return meta


# ---- the loop ---------------------------------------------------------------------------------
def _read_metrics(path: Path, upto: int) -> list[dict]:
    """The records of steps <= upto. A last line cut short by a crash in the middle of an
    append is dropped (the resumed run logs that step again); any other bad line is an error."""
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
        if record["step"] <= upto:
            records.append(record)
    return records


def fit(params: dict[str, nn.Parameter], step_loss: Callable[[int, int], tuple[torch.Tensor, int]],
        cfg: TrainConfig, out_dir=None, evaluate: Callable[[int], dict] | None = None,
        desc: str = "train", resume: bool = True, modules: list[nn.Module] = ()) -> list[dict]:
    """Train `params` for cfg.steps optimizer steps.

    step_loss(step, micro) -> (mean loss over answer tokens, number of tokens processed).
    Writes out_dir/metrics.jsonl and out_dir/checkpoint/ (every cfg.ckpt_every steps and at
    the end); resumes from it when present and `resume`. Returns the metric records."""
    out_dir = Path(out_dir) if out_dir is not None else None
    opt = make_optimizer(params, cfg)
    start, records = 0, []
    run_loss, run_n = 0.0, 0   # the losses since the last log record (a record averages them)
    metrics_path = out_dir / METRICS if out_dir is not None else None
    if out_dir is not None and resume and (out_dir / CKPT_DIR / "state.safetensors").is_file():
        meta = load_checkpoint(out_dir / CKPT_DIR, params, opt)
        start = meta["step"]
        run_loss, run_n = log_window(meta)
        if metrics_path.is_file():
            records = _read_metrics(metrics_path, upto=start)
    if metrics_path is not None:
        checkpoint.atomic_write_bytes(metrics_path, "".join(json.dumps(r) + "\n" for r in records).encode())

    def log(rec):
        records.append(rec)
        if metrics_path is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    for m in modules:
        m.train()
    bar = None
    if cfg.progress and start < cfg.steps:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True, leave=False)
    tokens_seen, t0 = 0, time.perf_counter()
    plist = list(params.values())
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            loss, ntok = step_loss(step, micro)
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach())
            tokens_seen += ntok
        gnorm = torch.nn.utils.clip_grad_norm_(plist, cfg.clip) if cfg.clip > 0 else torch.tensor(0.0)
        opt.step()
        loss_val = loss_sum / cfg.grad_accum
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"{desc}: loss became {loss_val} at step {step}")
        run_loss, run_n = run_loss + loss_val, run_n + 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            tps = tokens_seen / max(1e-9, time.perf_counter() - t0)
            log({"step": done, "loss": run_loss / run_n, "lr": lr, "grad_norm": float(gnorm),
                 "tokens_per_s": round(tps, 1), "time_s": round(time.perf_counter() - t0, 2)})
            if bar is not None:
                bar.set_postfix(loss=f"{run_loss / run_n:.4f}", tok_s=f"{tps:.0f}")
            run_loss, run_n = 0.0, 0
        if bar is not None:
            bar.update(1)
        if evaluate is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            for m in modules:
                m.eval()
            res = evaluate(done)
            for m in modules:
                m.train()
            log({"step": done, "eval": res})
            if bar is not None:
                bar.write(f"[{desc}] step {done}: " + ", ".join(f"{k} {v:.1f}%" for k, v in res.items()))
        if out_dir is not None and ((cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.steps):
            save_checkpoint(out_dir / CKPT_DIR, done, params, opt, {LOG_WINDOW: [run_loss, run_n]})
    if bar is not None:
        bar.close()
    for m in modules:
        m.eval()
    return records


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))


def autocast_ctx(enabled: bool, device: torch.device):
    if not enabled:
        import contextlib
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
