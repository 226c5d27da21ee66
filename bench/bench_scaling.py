"""Scaling figures for composition training: activation checkpointing (memory vs time), bf16
autocast, augment-state caching, and DDP/FSDP per-rank memory from a real 2-process run
checked against distributed.plan (the arithmetic of docs/scaling.md).

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/bench_scaling.py [--quick] [--out bench/results]

Memory on CPU is measured as the bytes autograd saves for backward (saved_tensors_hooks):
device-independent, and exactly the term activation checkpointing changes. On CUDA the peak
allocated memory is reported as well. Writes scaling.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calm_fast.checkpointing import apply_activation_checkpointing, backward_anchor_layers  # noqa: E402
from calm_fast.composed import CALM  # noqa: E402
from calm_fast.config import DecoderConfig  # noqa: E402
from calm_fast.decoder import Decoder  # noqa: E402
from calm_fast.distributed import plan, theta_c  # noqa: E402
from calm_fast.state_cache import forward_with_states  # noqa: E402

ANCHOR = dict(vocab_size=512, dim=256, n_layers=8, n_heads=8, max_seq_len=256)
AUGMENT = dict(vocab_size=512, dim=128, n_layers=4, n_heads=4, max_seq_len=256)
MAPPING = [(1, 1), (3, 4), (3, 7)]


def build(device):
    torch.manual_seed(0)
    calm = CALM(Decoder(DecoderConfig(**ANCHOR)), [Decoder(DecoderConfig(**AUGMENT))], mapping=MAPPING).to(device)
    for p in calm.bridges.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return calm


def measure(calm, tokens, *, bf16=False, states=None, reps=3):
    """(saved-for-backward bytes, median fwd+bwd seconds, peak CUDA bytes or None)."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    def step():
        calm.zero_grad(set_to_none=True)
        with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = calm(tokens) if states is None else forward_with_states(calm, tokens, states)
        logits.float().logsumexp(-1).mean().backward()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    times = []
    cuda = tokens.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return saved[0], sorted(times)[len(times) // 2], peak


def single_process(device, batch, seq, reps):
    tokens = torch.randint(0, ANCHOR["vocab_size"], (batch, seq), device=device)
    calm = build(device)
    res = {}
    b0, t0, p0 = measure(calm, tokens, reps=reps)
    res["fp32"] = {"saved_bytes": b0, "step_s": t0, "peak_cuda_bytes": p0}
    b1, t1, p1 = measure(calm, tokens, bf16=True, reps=reps)
    res["bf16_autocast"] = {"saved_bytes": b1, "step_s": t1, "peak_cuda_bytes": p1}
    states = calm.augment_states(tokens)
    b2, t2, p2 = measure(calm, tokens, states=states, reps=reps)
    res["cached_states"] = {"saved_bytes": b2, "step_s": t2, "peak_cuda_bytes": p2}
    layers = apply_activation_checkpointing(calm)
    b3, t3, p3 = measure(calm, tokens, reps=reps)
    res["activation_checkpointing"] = {"saved_bytes": b3, "step_s": t3, "peak_cuda_bytes": p3, "layers": layers}
    # Saved bytes per token per backward anchor block, in elements (fp32: 4 bytes): the
    # coefficient docs/scaling.md scales to 7B. The logits term (saved once) is taken out by
    # differencing against a run with AC (which keeps one input per block).
    n_bwd = len(backward_anchor_layers(calm))
    tok = batch * seq
    d, f = calm.anchor.cfg.dim, calm.anchor.cfg.ffn_dim
    per_block_elems = (b0 - b3) / (4 * tok * n_bwd) + d  # AC keeps the d-wide block input
    res["per_token_per_block_elems"] = per_block_elems
    res["per_token_per_block_in_d_f"] = {"dim": d, "ffn_dim": f, "formula_12d_4f": 12 * d + 4 * f}
    res["ac_saved_ratio"] = b3 / b0
    res["ac_time_ratio"] = t3 / t0
    res["bf16_saved_ratio"] = b1 / b0
    res["cached_time_ratio"] = t2 / t0
    return res


# ---- 2-process FSDP/DDP measurement -----------------------------------------------------------
def worker(strategy: str, batch: int, seq: int, reps: int) -> None:
    from calm_fast.distributed import init_distributed, parallelize, destroy_distributed
    from calm_fast.train import TrainConfig, make_optimizer
    from torch.distributed.tensor import DTensor
    env = init_distributed("cpu")
    calm = build(env.device)
    model = parallelize(calm, strategy, env)
    params = theta_c(calm)
    opt = make_optimizer(params, TrainConfig())
    per = batch // env.world_size
    torch.manual_seed(1 + env.rank)
    tokens = torch.randint(0, ANCHOR["vocab_size"], (per, seq))
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(tokens).float().logsumexp(-1).mean().backward()
        opt.step()
        times.append(time.perf_counter() - t0)

    def local_bytes(ts):
        return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * 4 for t in ts)
    base = [p for p in calm.parameters() if not p.requires_grad]
    adam = [v for st in opt.state.values() for k, v in st.items() if k != "step"]
    out = {"rank": env.rank, "world": env.world_size, "strategy": strategy,
           "base_weight_bytes": local_bytes(base), "theta_c_bytes": local_bytes(params.values()),
           "adam_bytes": local_bytes(adam), "step_s": sorted(times[1:])[len(times[1:]) // 2]}
    if env.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    destroy_distributed(env)


def two_process(strategy, batch, seq, reps):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, "--worker", strategy, "--batch", str(batch), "--seq", str(seq),
           "--reps", str(reps)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    if r.returncode or not line:
        raise RuntimeError(f"{strategy} worker failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    got = json.loads(line[0][len("RESULT "):])
    want = plan(DecoderConfig(**ANCHOR), DecoderConfig(**AUGMENT), MAPPING, world=2, strategy=strategy,
                tokens_per_rank=batch // 2 * seq, base_bytes=4)["bytes_per_rank"]
    got["plan"] = {"base_weights": want["base_weights"], "theta_c": want["theta_c"], "adam": want["adam"]}
    return got


def check_args(ap: argparse.ArgumentParser, args, device: torch.device) -> None:
    """Every argument the run would trip over later (an IndexError after the first measured
    step, an empty per-rank batch or a too-long sequence failing inside the 2-process run after
    the single-process figures), as an argparse error (exit 2) before any model is built."""
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    min_batch = 2 if device.type == "cpu" else 1  # the CPU run also splits the batch over 2 ranks
    if args.batch < min_batch:
        ap.error(f"--batch must be >= {min_batch}" + (" (the 2-process run gives each rank batch // 2 rows)"
                                                       if min_batch == 2 else "") + f", got {args.batch}")
    limit = min(ANCHOR["max_seq_len"], AUGMENT["max_seq_len"])
    if not 1 <= args.seq <= limit:
        ap.error(f"--seq must be in 1..{limit} (the models' max_seq_len), got {args.seq}")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--worker", default=None, choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.batch, args.seq, args.reps)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_args(ap, args, device)
    batch, seq, reps = (4, 64, 2) if args.quick else (args.batch, args.seq, args.reps)
    res = {"device": str(device), "torch": torch.__version__, "host": platform.node(),
           "threads": torch.get_num_threads(), "batch": batch, "seq": seq, "anchor": ANCHOR, "augment": AUGMENT,
           "mapping": MAPPING, "single": single_process(device, batch, seq, reps)}
    if device.type == "cpu":
        res["two_process"] = {s: two_process(s, batch, seq, reps) for s in ("ddp", "fsdp")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
