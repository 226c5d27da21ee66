"""Distributed composition training on CPU: 2 gloo processes under torchrun vs one process.

Every multi-process test launches the real entry point (`torchrun -m calm_fast.distributed`)
on 127.0.0.1 with a free port and a time limit, and compares against the library's one-process
path (demo.train_composition -> train.fit)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm_fast import checkpoint
from calm_fast.checkpointing import apply_activation_checkpointing, backward_anchor_layers, checkpointed_layers
from calm_fast.composed import CALM, CONFIG_META
from calm_fast.decoder import Decoder
from calm_fast.demo import load_bases, model_config, train_composition
from calm_fast.distributed import (DistEnv, StepSampler, count_params, plan, run_compose_job, shard_rows,
                                   theta_c, theta_c_params)
from calm_fast.tasks.kv_arith import SCALES, KVArith, collate
from calm_fast.train import TrainConfig, answer_loss

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
MAPPING = [(0, 0), (1, 1), (1, 2)]
TRAIN = dict(steps=10, batch_size=8, lr=3e-3, warmup=2, log_every=1, eval_samples=4, progress=False, seed=0)
DDP_TOL = 1e-5    # fp32, same rows, global token normalisation: only summation order differs
# FSDP2 in fp32: the all-gather copies bits, the reduce-scatter sums and divides by the world
# size like DDP's all-reduce, and AdamW is elementwise, so a shard updates exactly as the full
# tensor would: only the summation order differs, the same bound as DDP (measured 1.5e-7 for
# both). With bf16_params (MixedPrecisionPolicy) the bound is the bf16 one, 1e-2.
FSDP_TOL = 1e-5


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Random tiny m_A / m_B in demo.load_bases' format (training them is not the point)."""
    d = tmp_path_factory.mktemp("bases")
    task = KVArith(SCALES["tiny"])
    checkpoint.save_json(d / "task.json", task.cfg.to_dict())
    for i, role in enumerate(("m_A", "m_B")):
        cfg = model_config(task, role, "tiny")
        if role == "m_B":
            cfg = type(cfg).from_dict({**cfg.to_dict(), "n_layers": 3})
        torch.manual_seed(100 + i)
        m = Decoder(cfg)
        checkpoint.save_json(d / f"{role}.config.json", cfg.to_dict())
        checkpoint.save_tensors(d / f"{role}.safetensors", m.state_dict())
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(job: dict, tmp: Path, nproc: int = 2, timeout: int = 120) -> None:
    path = tmp / f"job{len(list(tmp.glob('job*.json')))}.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for attempt in range(2):  # a port taken between probing and binding: retry once
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "calm_fast.distributed", "--config", str(path), "--no-progress"]
        r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0:
            return
        if "address already in use" not in (r.stdout + r.stderr).lower():
            break
    raise AssertionError(f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _one_process(bases, out, **train):
    task, m_A, m_B = load_bases(bases)
    cfg = TrainConfig(**{**TRAIN, **train})
    train_composition(task, m_A, m_B, "calm", "kv_arithmetic", cfg, MAPPING, out, log=lambda *a: None)
    return _losses(out)


def _assert_close(got: dict, ref: dict, tol: float, steps):
    for s in steps:
        rel = abs(got[s] - ref[s]) / abs(ref[s])
        assert rel <= tol, f"step {s}: loss {got[s]!r} vs one-process {ref[s]!r} (rel {rel:.2e} > {tol})"


@pytest.fixture(scope="module")
def reference(bases, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return out, _one_process(bases, out)


def test_ddp_two_processes_match_one_process_over_10_steps(bases, reference, tmp_path):
    ref_dir, ref = reference
    job = {"job": "compose", "bases": str(bases), "mapping": MAPPING, "out": str(tmp_path / "run"), "train": TRAIN,
           "distributed": {"strategy": "ddp"}}
    _torchrun(job, tmp_path)
    got = _losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 11))
    _assert_close(got, ref, DDP_TOL, range(1, 11))
    assert got[10] < got[1]  # it trained (a frozen Θ_C would also "match")
    # The final bridges agree with the one-process ones, and the checkpoint is train.fit's format.
    mine, meta = checkpoint.load_tensors_and_metadata(tmp_path / "run" / "bridges" / "bridges.safetensors")
    assert CONFIG_META in meta  # CALM.save_bridges' format: the config committed with the tensors
    task, m_A, m_B = load_bases(bases)
    calm = CALM(m_B, [m_A], mapping=MAPPING)
    calm.load_bridges(tmp_path / "run" / "bridges")
    ref_state = checkpoint.load_tensors(ref_dir / "checkpoint" / "state.safetensors")
    for n, t in mine.items():
        r = ref_state[f"param.bridges.{n}"]
        # ‖Δ‖/‖ref‖ (the DESIGN's parity measure). Looser than the losses: AdamW's update is
        # sign-like for gradient components near rounding level, where summation order shows.
        rel = float((t - r).norm() / r.norm())
        assert rel < 1e-4, (n, rel)
    meta = checkpoint.load_json(tmp_path / "run" / "checkpoint" / "state.json")
    assert meta["step"] == 10 and meta["world_size"] == 2


def test_fsdp_two_processes_with_activation_checkpointing_match_one_process(bases, reference, tmp_path):
    _, ref = reference
    job = {"job": "compose", "bases": str(bases), "mapping": MAPPING, "out": str(tmp_path / "run"), "train": TRAIN,
           "distributed": {"strategy": "fsdp", "activation_checkpointing": True}}
    _torchrun(job, tmp_path)
    got = _losses(tmp_path / "run")
    _assert_close(got, ref, FSDP_TOL, range(1, 11))
    # Gathered FSDP bridges load into a plain CALM.
    task, m_A, m_B = load_bases(bases)
    CALM(m_B, [m_A], mapping=MAPPING).load_bridges(tmp_path / "run" / "bridges")


def test_fsdp_checkpoint_from_two_processes_resumes_in_one(bases, reference, tmp_path):
    """FSDP-sharded Θ_C and AdamW state written by 2 ranks at step 5, resumed by the
    one-process train.fit: steps 6-10 equal the run that never stopped."""
    _, ref = reference
    run = tmp_path / "run"
    job = {"job": "compose", "bases": str(bases), "mapping": MAPPING, "out": str(run), "train": TRAIN,
           "distributed": {"strategy": "fsdp", "stop_at": 5}}
    _torchrun(job, tmp_path)
    assert checkpoint.load_json(run / "checkpoint" / "state.json")["step"] == 5
    assert max(_losses(run)) == 5
    got = _one_process(bases, run)  # train.fit resumes from run/checkpoint
    assert sorted(got) == list(range(1, 11))
    _assert_close(got, ref, FSDP_TOL, range(6, 11))


def test_fsdp_checkpoint_from_two_processes_resumes_in_two(bases, reference, tmp_path):
    """Regression (audit, session 10): loading placed each AdamW tensor with a collective in the
    checkpoint file's key order, which differs between processes, so ranks swapped exp_avg and
    exp_avg_sq and the resumed run went to NaN. Stopped at step 5 and resumed by 2 ranks, with a
    log record every 2 steps (one spans the stop), it logs what the run that never stopped logs."""
    train = {**TRAIN, "log_every": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, stops in ((straight, (None,)), (resumed, (5, None))):
        for stop in stops:
            dist_opts = {"strategy": "fsdp"} if stop is None else {"strategy": "fsdp", "stop_at": stop}
            _torchrun({"job": "compose", "bases": str(bases), "mapping": MAPPING, "out": str(out),
                       "train": train, "distributed": dist_opts}, tmp_path)
    got, want = _losses(resumed), _losses(straight)
    assert sorted(got) == sorted(want) == [2, 4, 6, 8, 10]  # record 6 averages steps 5 and 6
    _assert_close(got, want, 1e-6, [6, 8, 10])  # same ranks, same sums: equal up to ulps
    ref = reference[1]  # one process, a record per step: record 10 here averages steps 9 and 10
    _assert_close(got, {10: (ref[9] + ref[10]) / 2}, FSDP_TOL, [10])


def test_ddp_cache_states_built_by_two_ranks_match_uncached_one_process(bases, tmp_path):
    dist_opts = {"dataset_size": 24}
    ref_dir = tmp_path / "ref"
    run_compose_job({"job": "compose", "bases": str(bases), "mapping": MAPPING, "out": str(ref_dir), "train": TRAIN,
                     "distributed": dist_opts}, progress=False, env=DistEnv())
    ref = _losses(ref_dir)
    cache = tmp_path / "cache"
    job = {"job": "compose", "bases": str(bases), "mapping": MAPPING, "out": str(tmp_path / "run"), "train": TRAIN,
           "distributed": {**dist_opts, "strategy": "ddp", "state_cache": str(cache), "cache_dtype": "float32"}}
    _torchrun(job, tmp_path)
    assert (cache / "index.json").is_file()
    _assert_close(_losses(tmp_path / "run"), ref, DDP_TOL, range(1, 11))


# ---- in-process pieces --------------------------------------------------------------------------
def test_distributed_shard_rows_cover_the_batch_once():
    for n, w in [(8, 2), (7, 3), (5, 5), (64, 8)]:
        rows = [list(range(n))[shard_rows(n, r, w)] for r in range(w)]
        assert sum(rows, []) == list(range(n)) and max(map(len, rows)) - min(map(len, rows)) <= 1
    with pytest.raises(ValueError, match="cannot be split"):
        shard_rows(1, 0, 2)


def test_distributed_step_sampler_is_world_size_independent_and_resumable():
    s = StepSampler(20, 4, grad_accum=2, seed=3)
    full = s.global_indices(7, 1)
    assert s.indices(7, 1, 0, 2) + s.indices(7, 1, 1, 2) == full
    assert StepSampler(20, 4, grad_accum=2, seed=3).global_indices(7, 1) == full  # a fresh process agrees
    epoch = sum((s.global_indices(k // 2, k % 2) for k in range(5)), [])
    assert sorted(epoch) == list(range(20))  # one epoch sees every example once


def _tiny_calm(seed=0, n_anchor=4):
    torch.manual_seed(seed)
    from calm_fast.config import DecoderConfig
    a = Decoder(DecoderConfig(vocab_size=40, dim=32, n_layers=2, n_heads=2, max_seq_len=32))
    b = Decoder(DecoderConfig(vocab_size=40, dim=48, n_layers=n_anchor, n_heads=4, max_seq_len=32))
    calm = CALM(b, [a], mapping=[(0, 1), (1, 2)])
    for p in calm.bridges.parameters():  # move W_o off zero so gradients reach every block
        torch.nn.init.normal_(p, std=0.1)
    return calm


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_distributed_activation_checkpointing_same_grads_less_saved_memory():
    calm = _tiny_calm()
    tokens = torch.randint(0, 40, (3, 20))
    assert backward_anchor_layers(calm) == [2, 3]

    def step():
        calm.zero_grad(set_to_none=True)
        loss, saved = _saved_bytes(lambda: calm(tokens).float().square().mean())
        loss.backward()
        return loss.detach(), saved, {n: p.grad.clone() for n, p in calm.bridges.named_parameters()}

    l0, s0, g0 = step()
    names = set(calm.anchor.state_dict())
    assert apply_activation_checkpointing(calm) == [2, 3] and checkpointed_layers(calm) == [2, 3]
    assert set(calm.anchor.state_dict()) == names  # state_dict names unchanged by the wrapper
    l1, s1, g1 = step()
    assert torch.equal(l0, l1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n
    assert s1 < 0.8 * s0, (s0, s1)
    assert all(p.grad is None for p in calm.anchor.parameters())
    with pytest.raises(ValueError, match="out of range"):
        apply_activation_checkpointing(calm, [9])


def test_distributed_bf16_autocast_forward_and_loss_close_to_fp32():
    calm = _tiny_calm()
    task = KVArith(SCALES["tiny"])
    ex = task.sample("kv_arithmetic", "held_in", 4, "bf16")
    tokens, mask, _ = collate(ex, task.tok.pad_id)
    tokens = tokens % 40
    ref = answer_loss(calm(tokens), tokens, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = calm(tokens)
    assert logits.dtype == torch.bfloat16
    got = answer_loss(logits, tokens, mask)
    assert torch.isfinite(got) and abs(got - ref) / ref < 1e-2
    got.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in calm.bridges.parameters())


def test_distributed_plan_counts_match_real_models():
    calm = _tiny_calm()
    assert count_params(calm.anchor.cfg) == sum(p.numel() for p in calm.anchor.parameters())
    assert theta_c_params(32, 48, 2) == sum(p.numel() for p in theta_c(calm).values())
    p = plan(calm.anchor.cfg, calm.augments[0].cfg, [(0, 1), (1, 2)], world=2, strategy="fsdp",
             tokens_per_rank=64)
    q = plan(calm.anchor.cfg, calm.augments[0].cfg, [(0, 1), (1, 2)], world=2, strategy="ddp",
             tokens_per_rank=64)
    assert p["bytes_per_rank"]["base_weights"] * 2 == q["bytes_per_rank"]["base_weights"]
    assert p["bytes_per_rank"]["adam"] * 2 == q["bytes_per_rank"]["adam"]
