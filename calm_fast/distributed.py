"""Composition training on PyTorch's distributed engine: torchrun, DDP or FSDP2.

    torchrun --nproc_per_node 8 -m calm_fast.distributed --config job.json

Strategies (the frozen bases never get gradients in either):
  ddp   the bases are replicated on every rank; Θ_C's gradients are all-reduced by
        DistributedDataParallel (frozen parameters are not in its reducer).
  fsdp  FSDP2 `fully_shard` on every anchor and augment block and on the root: the bases are
        sharded across ranks and all-gathered one block at a time; Θ_C lives in the root group,
        sharded too, its gradients reduce-scattered.

Data: every step's global batch is a pure function of (seed, step, micro-step), as in
train.fit; rank r takes its contiguous slice of rows, so N ranks see exactly the rows one
process would. The loss is normalised by the *global* number of answer tokens (one scalar
all-reduce per micro-step), so the gradient N ranks average equals the one-process gradient,
not a mean of per-rank means.

Checkpoints: all ranks gather Θ_C and AdamW's state into full tensors, rank 0 writes them in
exactly train.save_checkpoint's format (safetensors + JSON), so a checkpoint written by N
processes resumes with M processes, with `train.fit` in one process, and vice versa. Every
rank reads it back (the output directory must be on a file system all ranks see). Metrics
(metrics.jsonl, the same records as train.fit) are written by rank 0.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .state_cache import forward_with_states
from .train import (CKPT_DIR, LOG_WINDOW, METRICS, TrainConfig, autocast_ctx, load_checkpoint, log_window,
                    lr_at, make_optimizer, save_checkpoint)

STRATEGIES = ("ddp", "fsdp")


# ---- process group ------------------------------------------------------------------------
@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # this call created the process group (and should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1


def init_distributed(device: str | None = "auto", backend: str | None = None,
                     timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT); without those variables, a one-process DistEnv and no group. Device: CUDA
    rank LOCAL_RANK when available (nccl), else CPU (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world == 1 and not dist.is_initialized():
        return DistEnv(0, 1, 0, dev, False)
    owns = False
    if not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
        owns = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, dev, owns)


def destroy_distributed(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        gc.collect()  # free finished collectives' work objects while the interpreter is whole
        dist.destroy_process_group()


def shard_rows(n: int, rank: int, world: int) -> slice:
    """Contiguous slice of `n` global rows for `rank`: sizes differ by at most one."""
    if n < world:
        raise ValueError(f"a global batch of {n} rows cannot be split over {world} ranks (need >= 1 row each)")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class StepSampler:
    """A distributed sampler over a fixed dataset of n examples that is addressable by step:
    the global batch of (step, micro) is rows [k*B, (k+1)*B) of an epoch's seeded permutation
    (k = step*grad_accum + micro), and each rank takes its `shard_rows` slice. Unlike
    torch.utils.data.DistributedSampler it needs no epoch bookkeeping to resume exactly, and
    the global batch does not depend on the world size."""

    def __init__(self, n: int, batch_size: int, grad_accum: int = 1, seed: int = 0):
        if n < batch_size:
            raise ValueError(f"dataset of {n} examples is smaller than the batch size {batch_size}")
        self.n, self.batch_size, self.grad_accum, self.seed = n, batch_size, grad_accum, seed
        self.per_epoch = n // batch_size  # the tail that does not fill a batch is dropped per epoch
        self._perm: tuple[int, torch.Tensor] | None = None

    def global_indices(self, step: int, micro: int = 0) -> list[int]:
        k = step * self.grad_accum + micro
        epoch, j = divmod(k, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1][j * self.batch_size:(j + 1) * self.batch_size].tolist()

    def indices(self, step: int, micro: int, rank: int, world: int) -> list[int]:
        return self.global_indices(step, micro)[shard_rows(self.batch_size, rank, world)]


# ---- the module DDP / FSDP wrap -----------------------------------------------------------
class Composition(nn.Module):
    """CALM.forward, or with `states=` the same forward fed from an augment-state cache.
    DDP and FSDP2 hook a module's forward, so the cached path must run inside one."""

    def __init__(self, calm):
        super().__init__()
        self.calm = calm

    def forward(self, tokens, attention_mask=None, *, context=None, context_mask=None, states=None,
                states_mask=None):
        if states is None:
            return self.calm(tokens, attention_mask, context=context, context_mask=context_mask)
        return forward_with_states(self.calm, tokens, states, attention_mask, states_mask)


def theta_c(calm) -> dict[str, nn.Parameter]:
    """Θ_C by the names train.fit / demo.Variant use ("bridges.<a>.<k>.<param>"). Take it
    after `parallelize`: fully_shard replaces the parameters with sharded ones."""
    return {f"bridges.{n}": p for n, p in calm.bridges.named_parameters()}


def parallelize(calm, strategy: str, env: DistEnv, *, activation_checkpointing: bool = False,
                bf16_params: bool = False, reshard_after_forward: bool = True) -> nn.Module:
    """Wrap `calm` for training on env's ranks; returns the module to call.

    Θ_C is broadcast from rank 0 first, so every rank starts from rank 0's bridges whatever
    seeds the ranks used. The bases are assumed identical on every rank (loaded from the same
    files); they are not broadcast (DDP init_sync=False): for a 7B anchor that would move
    14 GB for nothing. bf16_params (fsdp only): all-gather and compute in bf16 with fp32
    gradient reduction and fp32 master Θ_C (MixedPrecisionPolicy)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if bf16_params and strategy != "fsdp":
        raise ValueError("bf16_params is an FSDP mixed-precision policy; with ddp use bf16 autocast (train.bf16)")
    calm.to(env.device)
    for base in (calm.anchor, *calm.augments):
        base.requires_grad_(False)
    if activation_checkpointing:
        from .checkpointing import apply_activation_checkpointing
        apply_activation_checkpointing(calm)
    if env.distributed:
        with torch.no_grad():
            for p in calm.bridges.parameters():
                dist.broadcast(p.data, src=0)
    model = Composition(calm)
    if not env.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                   broadcast_buffers=False, init_sync=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params \
        else MixedPrecisionPolicy()
    # One FSDP group per base block: only one or two blocks are ever unsharded at a time.
    for base in (*calm.augments, calm.anchor):
        for i in range(len(base.layers)):
            fully_shard(base.layers[i], mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    # The root group holds Θ_C, embeddings, final norms and LM heads. Kept unsharded from
    # forward to backward: Θ_C is small and re-gathering it would cost a second all-gather.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


@contextlib.contextmanager
def full_params(model: nn.Module):
    """Run code that bypasses the wrapper's forward (cached generation, evaluation) with the
    root group unsharded. With FSDP every rank must run the same code (block all-gathers are
    collective); with DDP or one process this is a no-op."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        model.unshard()
        try:
            yield
        finally:
            model.reshard()
    else:
        yield


# ---- checkpoints (train.save_checkpoint's format, any world size) ------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _placed_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(device=ref.device, dtype=ref.dtype), ref.device_mesh, ref.placements)
    return full.to(device=ref.device, dtype=ref.dtype)


def _proxies(params: dict[str, nn.Parameter], cfg: TrainConfig, tensors=None):
    """Full-size CPU stand-ins for (sharded) params and an AdamW over them built the same way
    as the real one, so train.save_checkpoint / load_checkpoint see the one-process layout."""
    proxies = {n: nn.Parameter((tensors[n] if tensors is not None else torch.zeros(p.shape, dtype=p.dtype)).clone())
               for n, p in params.items()}
    return proxies, make_optimizer(proxies, cfg)


def save_distributed_checkpoint(directory, step: int, params: dict[str, nn.Parameter],
                                opt: torch.optim.Optimizer, cfg: TrainConfig, env: DistEnv,
                                extra: dict | None = None) -> None:
    """Collective: every rank gathers, rank 0 writes (atomically), then all wait for it.
    Keys in sorted order: each gather is a collective, and every rank must run them alike."""
    full_p = {n: _full(p.detach()).cpu() for n, p in params.items()}
    full_s = {n: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in sorted(opt.state[p].items())}
              for n, p in params.items() if p in opt.state}
    if env.is_main:
        proxies, popt = _proxies(params, cfg, full_p)
        for n, pp in proxies.items():
            if n in full_s:
                popt.state[pp] = full_s[n]
        for g, real in zip(popt.param_groups, opt.param_groups):
            g.update({k: v for k, v in real.items() if k != "params"})
        save_checkpoint(Path(directory), step, proxies, popt, {"world_size": env.world_size, **(extra or {})})
    if env.distributed:
        dist.barrier()


def load_distributed_checkpoint(directory, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                                cfg: TrainConfig) -> dict:
    """Every rank reads the full checkpoint and keeps its own shard; returns the JSON meta.
    Placing a shard is a collective (a scatter from rank 0): state keys go in sorted order, the
    same on every rank (the file's order is not: it swapped exp_avg and exp_avg_sq between ranks)."""
    proxies, popt = _proxies(params, cfg)
    meta = load_checkpoint(Path(directory), proxies, popt)
    with torch.no_grad():
        for n, p in params.items():
            pp = proxies[n]
            p.copy_(_placed_like(pp.detach(), p))
            st = popt.state.get(pp)
            if st:
                opt.state[p] = {k: (_placed_like(v, p) if torch.is_tensor(v) and v.dim() > 0 else
                                    (v.clone() if torch.is_tensor(v) else v)) for k, v in sorted(st.items())}
    for g, saved in zip(opt.param_groups, popt.param_groups):
        g.update({k: v for k, v in saved.items() if k != "params"})
    return meta


# ---- the loop -------------------------------------------------------------------------------
def _global_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        x = x.clone()
        dist.all_reduce(x)
    return x


def fit_distributed(model: nn.Module, params: dict[str, nn.Parameter],
                    batch_fn: Callable[[int, int], dict], cfg: TrainConfig, env: DistEnv, out_dir=None, *,
                    evaluate: Callable[[int], dict] | None = None, desc: str = "train", resume: bool = True,
                    stop_at: int | None = None) -> list[dict]:
    """train.fit for N ranks: the same schedule, clipping, metric records and checkpoint files.

    batch_fn(step, micro) -> this rank's rows: {"tokens", "loss_mask"} plus any keyword
    arguments of Composition.forward ("attention_mask", "context", "context_mask", "states",
    "states_mask"). evaluate(step) runs on every rank (it must be collective under FSDP, see
    `full_params`); rank 0's result is logged. stop_at: stop after this step (a time-limited
    allocation), writing a checkpoint there; the schedule still spans cfg.steps."""
    out_dir = Path(out_dir) if out_dir is not None else None
    own = {id(p) for p in model.parameters()}
    stale = [n for n, p in params.items() if id(p) not in own]
    if stale:
        raise ValueError(f"{desc}: parameter(s) {stale[:3]} are not the wrapped model's (take them after "
                         f"parallelize: fully_shard replaces parameters)")
    opt = make_optimizer(params, cfg)
    start, records = 0, []
    run_loss, run_n = 0.0, 0   # the losses since the last log record
    metrics_path = out_dir / METRICS if out_dir is not None else None
    if out_dir is not None and resume and (out_dir / CKPT_DIR / "state.safetensors").is_file():
        meta = load_distributed_checkpoint(out_dir / CKPT_DIR, params, opt, cfg)
        start = meta["step"]
        run_loss, run_n = log_window(meta)
        if metrics_path.is_file():
            records = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r["step"] <= start]
    if env.distributed:
        dist.barrier()  # nobody truncates metrics.jsonl before every rank has read the checkpoint
    if metrics_path is not None and env.is_main:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def log(rec):
        records.append(rec)
        if metrics_path is not None and env.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    ddp = getattr(model, "require_backward_grad_sync", None) is not None
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    model.train()
    bar = None
    if cfg.progress and env.is_main and start < end:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True, leave=False)
    tokens_seen, t0 = 0, time.perf_counter()
    plist = list(params.values())
    for step in range(start, end):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_acc = torch.zeros((), dtype=torch.float64)
        for micro in range(cfg.grad_accum):
            batch = dict(batch_fn(step, micro))
            tokens, loss_mask = batch.pop("tokens"), batch.pop("loss_mask")
            m = loss_mask[:, :-1]
            n_global = _global_sum(m.sum().to(torch.float64).reshape(1), env).item()
            if n_global == 0:
                raise ValueError(f"{desc}: the global batch of step {step} has no answer tokens")
            if ddp:  # reduce gradients once per optimizer step, not per micro-step (as no_sync does)
                model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with autocast_ctx(cfg.bf16, env.device):
                logits = model(tokens, **batch)
            # Sum over this rank's answer tokens / global count: DDP and FSDP average the
            # gradients over ranks, so scaling by world_size makes the result the one-process
            # mean-over-answer-tokens gradient exactly (answer_loss's definition).
            local = F.cross_entropy(logits[:, :-1][m].float(), tokens[:, 1:][m], reduction="sum")
            ((local / n_global) * (env.world_size / cfg.grad_accum)).backward()
            loss_acc += local.detach().double().cpu() / n_global
            tokens_seen += tokens.numel()
        gnorm = torch.nn.utils.clip_grad_norm_(plist, cfg.clip) if cfg.clip > 0 else torch.tensor(0.0)
        opt.step()
        loss_val = float(_global_sum(loss_acc.reshape(1), env)) / cfg.grad_accum
        if not math.isfinite(loss_val):  # the same global value on every rank: all stop together
            raise FloatingPointError(f"{desc}: loss became {loss_val} at step {step}")
        run_loss, run_n = run_loss + loss_val, run_n + 1
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            tps = tokens_seen * env.world_size / max(1e-9, time.perf_counter() - t0)
            log({"step": done, "loss": run_loss / run_n, "lr": lr, "grad_norm": float(_full(gnorm)),
                 "tokens_per_s": round(tps, 1), "time_s": round(time.perf_counter() - t0, 2)})
            if bar is not None:
                bar.set_postfix(loss=f"{run_loss / run_n:.4f}", tok_s=f"{tps:.0f}")
            run_loss, run_n = 0.0, 0
        if bar is not None:
            bar.update(1)
        if evaluate is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps):
            model.eval()
            res = evaluate(done)
            model.train()
            if env.is_main and res is not None:
                log({"step": done, "eval": res})
        if out_dir is not None and ((cfg.ckpt_every and done % cfg.ckpt_every == 0) or done in (cfg.steps, end)):
            save_distributed_checkpoint(out_dir / CKPT_DIR, done, params, opt, cfg, env,
                                        {LOG_WINDOW: [run_loss, run_n]})
    if bar is not None:
        bar.close()
    model.eval()
    return records


# ---- memory and FLOP arithmetic (docs/scaling.md) -----------------------------------------------
def count_params(cfg) -> int:
    """Exact parameter count of a Decoder, built on the meta device (no memory)."""
    from .decoder import Decoder
    with torch.device("meta"):
        return sum(p.numel() for p in Decoder(cfg).parameters())


def theta_c_params(augment_dim: int, anchor_dim: int, n_bridges: int) -> int:
    """Per bridge: P (D_A x D_B + D_B) and W_q, W_k, W_v, W_o (4 D_B^2)."""
    return n_bridges * (augment_dim * anchor_dim + anchor_dim + 4 * anchor_dim * anchor_dim)


def plan(anchor_cfg, augment_cfg, mapping, *, world: int, strategy: str, tokens_per_rank: int,
         base_bytes: int = 2, act_bytes: int = 2, act_per_token_block: float | None = None,
         activation_checkpointing: bool = False, cached: bool = False) -> dict:
    """Per-rank memory (bytes) and FLOPs per token of one composition training step.

    act_per_token_block: bytes saved for backward per token per anchor block in units of
    act_bytes (measured by bench/bench_scaling.py; default the Llama-block count there)."""
    n_b, n_a = count_params(anchor_cfg), count_params(augment_cfg)
    n_c = theta_c_params(augment_cfg.dim, anchor_cfg.dim, len(mapping))
    first = min(b for _, b in mapping)
    bwd_layers = anchor_cfg.n_layers - 1 - first
    d, f = anchor_cfg.dim, anchor_cfg.ffn_dim
    per_tok_block = act_per_token_block if act_per_token_block is not None else (12 * d + 4 * f)
    shard = world if strategy == "fsdp" else 1
    weights = (n_b + (0 if cached else n_a)) * base_bytes / shard
    theta = n_c * 4 / shard                 # fp32 master Θ_C
    grads = n_c * 4 / shard
    adam = 2 * n_c * 4 / shard              # exp_avg, exp_avg_sq
    if activation_checkpointing:            # block inputs only, plus one block recomputed at a time
        acts = tokens_per_rank * act_bytes * (bwd_layers * d + per_tok_block)
    else:
        acts = tokens_per_rank * act_bytes * bwd_layers * per_tok_block
    acts += tokens_per_rank * 4 * anchor_cfg.vocab_size  # fp32 logits for the loss
    block_b = (n_b - anchor_cfg.vocab_size * d * 2) / anchor_cfg.n_layers
    gathered = 2 * block_b * base_bytes if strategy == "fsdp" else 0  # current + prefetched block
    flops_fwd_b = 2 * n_b
    flops = {"anchor_forward": flops_fwd_b,
             # frozen weights: backward computes input gradients only (one GEMM per linear)
             "anchor_backward": 2 * n_b * (bwd_layers + 1) / anchor_cfg.n_layers,
             "recompute": 2 * n_b * bwd_layers / anchor_cfg.n_layers if activation_checkpointing else 0,
             "augment_forward": 0 if cached else 2 * n_a,
             "theta_c": 6 * n_c}
    return {"params": {"anchor": n_b, "augment": n_a, "theta_c": n_c},
            "bytes_per_rank": {"base_weights": weights, "theta_c": theta, "grads": grads, "adam": adam,
                               "activations": acts, "fsdp_gathered_blocks": gathered,
                               "total": weights + theta + grads + adam + acts + gathered},
            "flops_per_token": {**flops, "total": sum(flops.values())}}


# ---- kv_arith composition jobs (calm-fast train under torchrun) -----------------------------------
def run_compose_job(job: dict, *, seed: int | None = None, device: str = "auto", progress: bool = True,
                    env: DistEnv | None = None) -> list[dict]:
    """The `{"job": "compose", ...}` JSON job of `calm-fast train`, on all torchrun ranks.
    Extra field "distributed": {"strategy": "ddp"|"fsdp", "activation_checkpointing": bool,
    "bf16_params": bool, "stop_at": int, "dataset_size": int, "state_cache": DIR,
    "cache_dtype": "bfloat16"|"float16"|"float32", "drop_augment": bool}. "dataset_size" trains
    on a fixed set of examples (required by "state_cache") instead of a fresh stream."""
    from .composed import CALM
    from .demo import COMPOSE_TRAIN, MAPPINGS, dc_literal_fraction, load_bases, scale_of
    from .state_cache import StateCache, build_state_cache, drop_augment_weights
    from .tasks.kv_arith import collate, evaluate as kv_evaluate, prompt_context

    opts = dict(job.get("distributed") or {})
    known = {"strategy", "activation_checkpointing", "bf16_params", "stop_at", "dataset_size", "state_cache",
             "cache_dtype", "drop_augment"}
    if sorted(set(opts) - known):
        raise ValueError(f"unknown distributed field(s): {sorted(set(opts) - known)}")
    strategy = opts.get("strategy", "ddp")
    variant = job.get("variant", "calm")
    if variant not in ("calm", "encoder"):
        raise ValueError(f"distributed training supports variants 'calm' and 'encoder' (Θ_C only), got {variant!r}")
    dc = job.get("dc", "kv_arithmetic")
    if dc not in ("kv_arithmetic", "kv_substitution"):
        raise ValueError(f"D_C must be 'kv_arithmetic' or 'kv_substitution', got {dc!r}")
    if not job.get("out"):
        raise ValueError("'out' (output directory) is required")
    literal = dc_literal_fraction(dc, job.get("literal_fraction"))
    own_env = env is None
    env = env or init_distributed(device)
    try:
        task, m_A, m_B = load_bases(job["bases"], "cpu")
        scale = scale_of(task)
        cfg = TrainConfig.from_dict({**COMPOSE_TRAIN[scale], **job.get("train", {}),
                                     **({"seed": seed} if seed is not None else {}), "progress": progress})
        if cfg.batch_size < env.world_size:
            raise ValueError(f"train.batch_size={cfg.batch_size} is smaller than the {env.world_size} ranks")
        mapping = [tuple(p) for p in job["mapping"]] if "mapping" in job else MAPPINGS[scale]
        mode = "context" if variant == "encoder" else "aligned"
        torch.manual_seed(cfg.seed)  # the same bridge init as demo.Variant; rank 0's is broadcast anyway
        calm = CALM(m_B, [m_A], mapping=mapping, mode=mode)
        out = Path(job["out"])

        size = opts.get("dataset_size")
        fixed = sampler = None
        if size is not None:
            fixed = task.sample(dc, "held_in", int(size), f"dc-{cfg.seed}-fixed", literal)
            sampler = StepSampler(len(fixed), cfg.batch_size, cfg.grad_accum, cfg.seed)
        cache = None
        if opts.get("state_cache"):
            if fixed is None:
                raise ValueError("state_cache needs distributed.dataset_size (a fixed dataset to cache)")
            cpath = Path(opts["state_cache"])
            seqs = [e.prompt if mode == "context" else e.prompt + e.answer for e in fixed]
            if not (cpath / "index.json").is_file():
                calm.to(env.device)
                build_state_cache(calm, seqs, cpath, dtype=opts.get("cache_dtype", "bfloat16"),
                                  rank=env.rank, world_size=env.world_size)
            cache = StateCache(cpath, calm)
            if opts.get("drop_augment"):
                drop_augment_weights(calm)
        model = parallelize(calm, strategy, env, activation_checkpointing=bool(opts.get("activation_checkpointing")),
                            bf16_params=bool(opts.get("bf16_params")))
        params = theta_c(calm)  # after fully_shard, which replaces parameters with DTensor ones
        dev = env.device

        def batch_fn(step, micro):
            if fixed is None:
                idx = None
                ex = task.sample(dc, "held_in", cfg.batch_size, f"dc-{cfg.seed}-{step}-{micro}", literal)
                rows = shard_rows(len(ex), env.rank, env.world_size)
            else:
                idx = sampler.global_indices(step, micro)
                ex = [fixed[i] for i in idx]
                rows = shard_rows(len(ex), env.rank, env.world_size)
            tokens, mask, _ = collate(ex, task.tok.pad_id)  # the global batch's padding: same T as 1 process
            tokens, mask = tokens[rows], mask[rows]
            batch = {"tokens": tokens.to(dev), "loss_mask": mask.to(dev)}
            if cache is not None:
                mine = idx[rows]
                if mode == "context":
                    ctx, _ = prompt_context(ex)
                    states, smask = cache.batch(mine, tokens=ctx[rows], pad_to=ctx.shape[1], device=dev)
                    batch.update(states=states, states_mask=smask)
                else:
                    states, _ = cache.batch(mine, tokens=tokens, pad_to=tokens.shape[1], device=dev)
                    batch.update(states=states)
            elif mode == "context":
                ctx, cmask = prompt_context(ex)
                batch.update(context=ctx[rows].to(dev), context_mask=cmask[rows].to(dev))
            return batch

        fsdp = strategy == "fsdp" and env.distributed
        can_eval = not opts.get("drop_augment")

        def ev(step):
            if not can_eval or not (env.is_main or fsdp):
                return None  # DDP: rank 0 evaluates alone; FSDP: all ranks run the same generation
            with full_params(model):
                return {"kv_arithmetic_held_out": kv_evaluate(calm, task, "kv_arithmetic", "held_out",
                                                              cfg.eval_samples, seed=f"dev-{step}", mode=mode)}

        records = fit_distributed(model, params, batch_fn, cfg, env, out, evaluate=ev,
                                  desc=f"{variant} [{dc}] {strategy} x{env.world_size}",
                                  stop_at=opts.get("stop_at"))
        if env.distributed:
            dist.barrier()
        if opts.get("stop_at") is None or opts["stop_at"] >= cfg.steps:
            full = {n: _full(p.detach()).cpu() for n, p in params.items()}
            if env.is_main:
                _save_full_bridges(calm, full, out / "bridges")
        if env.distributed:
            dist.barrier()  # no rank tears the group down while another still uses it
        return records
    finally:
        if own_env:
            destroy_distributed(env)


def _save_full_bridges(calm, full: dict[str, torch.Tensor], directory: Path) -> None:
    """The files CALM.save_bridges writes (config embedded in bridges.safetensors, one atomic
    commit), from gathered tensors (under FSDP the module's own parameters are shards)."""
    from .composed import write_bridges
    write_bridges(directory, {n[len("bridges."):]: t for n, t in full.items()}, calm.config)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m calm_fast.distributed",
                                description="Run a calm-fast compose job on every torchrun rank "
                                            "(torchrun --nproc_per_node N -m calm_fast.distributed --config J).")
    p.add_argument("--config", required=True, help="the job's JSON file (calm-fast train's format)")
    p.add_argument("--strategy", choices=STRATEGIES, default=None, help="overrides distributed.strategy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from . import checkpoint
    try:
        job = checkpoint.load_json(args.config)
        if job.get("job") != "compose":
            raise ValueError(f"{args.config}: distributed training runs 'compose' jobs, got {job.get('job')!r}")
        if args.strategy:
            job.setdefault("distributed", {})["strategy"] = args.strategy
        run_compose_job(job, seed=args.seed, device=args.device, progress=not args.no_progress)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:
        print(f"calm_fast.distributed: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without interpreter finalisation. Twice in CI (sessions 4 and 6; never in 100+
    # direct runs) a torchrun worker aborted at the end of an FSDP job with "terminate called
    # without an active exception" (SIGABRT, no traceback): process-group objects freed during
    # Python's shutdown are a known PyTorch hazard (pytorch/pytorch#179291). Here the group is
    # already destroyed and every file closed; os._exit skips that phase.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
