"""Crash safety of checkpoints: a process killed (SIGKILL) while it saves leaves the previous
checkpoint loadable, and training resumed from it is bitwise the run that never stopped.

A helper process imports torch and calm_fast once, then forks one child per crash; each child
runs calm_fast.train.fit with a checkpoint after every step, and hangs at a chosen point of
its k-th save (half of a file's bytes written, before an fsync, before a rename, between the
two files of a checkpoint, after the last rename). The test process SIGKILLs it there, then
loads the checkpoint and resumes training in-process with train.fit.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from calm_fast import train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

# The training problem, shared verbatim by this process and the children.
PROBLEM = textwrap.dedent("""
    import torch
    from calm_fast.train import TrainConfig

    def make_problem():
        g = torch.Generator().manual_seed(0)
        params = {"w": torch.nn.Parameter(torch.randn(5, 3, generator=g)),
                  "b": torch.nn.Parameter(torch.zeros(3))}
        target = torch.randn(5, 3, generator=g)

        def step_loss(step, micro):
            gx = torch.Generator().manual_seed(1000 * step + micro)
            x = torch.randn(8, 5, generator=gx)
            return ((x @ params["w"] + params["b"] - x @ target) ** 2).mean(), 8

        cfg = TrainConfig(steps=STEPS, batch_size=8, grad_accum=2, lr=5e-2, warmup=2,
                          ckpt_every=1, log_every=1, progress=False, seed=0)
        return params, step_loss, cfg
""")
STEPS = 6

HELPER = textwrap.dedent("""
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    from calm_fast import train
    STEPS = int(sys.argv[1])
    exec(sys.argv[2])
    # Warm up before forking: AdamW's first construction imports torch._dynamo (seconds).
    _p, _l, _c = make_problem()
    train.make_optimizer(_p, _c)

    def arm(kill):
        # Hang (for the parent's SIGKILL) at the kill point of save number kill["save"].
        state = {"save": 0, "fsync": 0, "replace": 0, "write": 0}
        marker = kill["marker"]

        def hang():
            open(marker, "w").close()
            while True:
                time.sleep(60)

        def hit(event):
            if state["save"] != kill["save"]:
                return False
            state[event] += 1
            return kill["event"] == event and kill["n"] == state[event]

        real_save = train.save_checkpoint
        def save_checkpoint(*a, **k):
            state.update(save=state["save"] + 1, fsync=0, replace=0, write=0)
            return real_save(*a, **k)
        train.save_checkpoint = save_checkpoint

        real_fsync, real_replace, real_fdopen = os.fsync, os.replace, os.fdopen
        def fsync(fd):
            if hit("fsync"):
                hang()
            return real_fsync(fd)
        def replace(a, b):
            if hit("replace"):
                hang()
            return real_replace(a, b)

        class HalfWriter:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *exc): return self.f.__exit__(*exc)
            def __getattr__(self, name): return getattr(self.f, name)
            def write(self, data):
                if hit("write"):
                    self.f.write(data[: len(data) // 2])
                    self.f.flush()
                    hang()
                return self.f.write(data)
        def fdopen(*a, **k):
            return HalfWriter(real_fdopen(*a, **k))
        os.fsync, os.replace, os.fdopen = fsync, replace, fdopen

    for line in sys.stdin:
        cmd = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                if cmd.get("kill"):
                    arm(cmd["kill"])
                params, step_loss, cfg = make_problem()
                if cmd.get("steps"):
                    cfg.steps = cmd["steps"]
                train.fit(params, step_loss, cfg, out_dir=cmd["out_dir"], resume=True)
            finally:
                os._exit(0)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)
""")


class Helper:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", HELPER, str(STEPS), PROBLEM],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def start(self, **cmd) -> int:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._line())["pid"]

    def wait(self) -> int:
        return json.loads(self._line())["status"]

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"helper process died (rc={self.proc.poll()})")
        return line

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def helper():
    h = Helper()
    yield h
    h.close()


def _problem():
    ns = {"STEPS": STEPS}
    exec(PROBLEM, ns)
    return ns["make_problem"]()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run that never stopped: final parameters and logged losses."""
    out = tmp_path_factory.mktemp("ref")
    params, step_loss, cfg = _problem()
    records = train.fit(params, step_loss, cfg, out_dir=out)
    return {n: p.detach().clone() for n, p in params.items()}, [r["loss"] for r in records if "loss" in r]


def _kill_at(helper, out_dir: Path, kill: dict, timeout=120.0) -> None:
    marker = out_dir.parent / f"{out_dir.name}.marker"
    pid = helper.start(out_dir=str(out_dir), kill=dict(kill, marker=str(marker)))
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            helper.wait()
            raise AssertionError(f"the child never reached kill point {kill}")
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    status = helper.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _resume_and_compare(out_dir: Path, uninterrupted, expect_step: int) -> None:
    ref_params, ref_losses = uninterrupted
    # The checkpoint left behind loads, and holds the expected step.
    params, step_loss, cfg = _problem()
    opt = train.make_optimizer(params, cfg)
    meta = train.load_checkpoint(out_dir / train.CKPT_DIR, params, opt)
    assert meta["step"] == expect_step
    # Resumed training is bitwise the uninterrupted run.
    params, step_loss, cfg = _problem()
    records = train.fit(params, step_loss, cfg, out_dir=out_dir, resume=True)
    for n, p in params.items():
        assert torch.equal(p.detach(), ref_params[n]), f"parameter {n} differs after resume"
    assert [r["loss"] for r in records if "loss" in r] == ref_losses


SAVE = 3  # kill during the 3rd save (step 3's checkpoint); step 2's is on disk
POINTS = [
    pytest.param("write", 1, SAVE - 1, id="half-of-tensors-written"),
    pytest.param("fsync", 1, SAVE - 1, id="before-tensors-fsync"),
    pytest.param("replace", 1, SAVE - 1, id="before-tensors-rename"),
    # The checkpoint is the one safetensors file: once it is renamed, step SAVE is on disk
    # (state.json after it is only a readable copy).
    pytest.param("fsync", 2, SAVE, id="after-tensors-rename"),
    pytest.param("write", 2, SAVE, id="half-of-json-written"),
    pytest.param("replace", 2, SAVE, id="before-json-rename"),
    pytest.param("fsync", 4, SAVE, id="after-json-rename"),
]


@pytest.mark.parametrize("event,n,expect_step", POINTS)
def test_sigkill_during_save_keeps_a_loadable_checkpoint_and_exact_resume(
        helper, uninterrupted, tmp_path, event, n, expect_step):
    out = tmp_path / "run"
    _kill_at(helper, out, {"save": SAVE, "event": event, "n": n})
    _resume_and_compare(out, uninterrupted, expect_step)


def test_sigkill_at_random_times_never_corrupts(helper, tmp_path):
    """Kill a long run of saves at random moments: whatever is on disk always loads (or
    there is no checkpoint yet), and a leftover temporary file is never mistaken for one."""
    rng = random.Random(0)
    loaded = 0
    for i in range(5):
        out = tmp_path / f"run{i}"
        pid = helper.start(out_dir=str(out), steps=400)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        helper.wait()
        ckpt = out / train.CKPT_DIR
        if not (ckpt / "state.safetensors").exists():
            continue
        params, step_loss, cfg = _problem()
        cfg.steps = 400
        meta = train.load_checkpoint(ckpt, params, train.make_optimizer(params, cfg))
        assert 1 <= meta["step"] <= 400
        loaded += 1
    assert loaded >= 1, "no kill landed after the first checkpoint; the timing is off"


def test_atomic_write_leaves_the_old_file_on_error(tmp_path, monkeypatch):
    """In-process: a failure inside the write (disk full, say) keeps the old file and
    removes the temporary one."""
    from calm_fast import checkpoint
    path = tmp_path / "x.json"
    checkpoint.save_json(path, {"v": 1})

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        checkpoint.save_json(path, {"v": 2})
    monkeypatch.undo()
    assert checkpoint.load_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# -------------------------------------------------------------- Θ_C (save_bridges)

def _bridged_calm(mapping, seed, mode="aligned"):
    from calm_fast import CALM, Decoder, DecoderConfig
    torch.manual_seed(0)
    anchor = Decoder(DecoderConfig(vocab_size=31, dim=16, n_layers=4, n_heads=4, max_seq_len=16))
    aug = Decoder(DecoderConfig(vocab_size=31, dim=8, n_layers=4, n_heads=2, max_seq_len=16))
    calm = CALM(anchor, [aug], mapping=mapping, mode=mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in calm.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return calm


def _same_bridges(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.bridges.state_dict().values(), b.bridges.state_dict().values()))


@pytest.mark.filterwarnings("ignore:.*calm_config.json differs")
@pytest.mark.parametrize("stop", ["before_bridges_rename", "between_files"])
def test_interrupted_save_bridges_never_pairs_new_bridges_with_an_old_config(tmp_path, monkeypatch, stop):
    """Regression: save_bridges wrote bridges.safetensors and calm_config.json as two atomic
    files; killed between them, the old-mapping model loaded the new model's bridges silently.
    Now the config lives inside bridges.safetensors: whatever the stop, the directory loads as
    exactly one whole save, and a model of the other composition is refused."""
    from calm_fast import checkpoint
    from calm_fast.composed import read_bridges_config
    old = _bridged_calm([(1, 1)], seed=1)
    old.save_bridges(tmp_path)
    new = _bridged_calm([(3, 1)], seed=2)
    real_write = checkpoint.atomic_write_bytes
    calls = []

    def killed(path, data):
        calls.append(Path(path).name)
        if stop == "before_bridges_rename" or Path(path).name == "calm_config.json":
            raise KeyboardInterrupt("killed")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        new.save_bridges(tmp_path)
    monkeypatch.undo()
    survivor, other = (old, new) if stop == "before_bridges_rename" else (new, old)
    assert read_bridges_config(tmp_path).mappings == survivor.config.mappings
    with pytest.raises(ValueError, match="does not match"):
        _bridged_calm(other.config.mappings[0], seed=3).load_bridges(tmp_path)
    fresh = _bridged_calm(survivor.config.mappings[0], seed=3)
    if stop == "between_files":
        with pytest.warns(UserWarning, match="calm_config.json differs"):
            fresh.load_bridges(tmp_path)
    else:
        fresh.load_bridges(tmp_path)
    assert _same_bridges(fresh, survivor)


def test_load_bridges_refuses_another_mode(tmp_path):
    """Regression: context-mode bridges loaded into an aligned-mode CALM without a word."""
    _bridged_calm([(3, 1)], seed=1, mode="context").save_bridges(tmp_path)
    with pytest.raises(ValueError, match="trained in 'context' mode, this CALM is in 'aligned' mode"):
        _bridged_calm([(3, 1)], seed=2).load_bridges(tmp_path)


def test_load_bridges_reads_the_older_format(tmp_path):
    """Bridges saved before the config was embedded (plain safetensors + calm_config.json)."""
    from safetensors.torch import save_file
    from calm_fast import checkpoint
    calm = _bridged_calm([(3, 1)], seed=1)
    save_file({k: v.contiguous() for k, v in calm.bridges.state_dict().items()}, str(tmp_path / "bridges.safetensors"))
    checkpoint.save_json(tmp_path / "calm_config.json", calm.config.to_dict())
    fresh = _bridged_calm([(3, 1)], seed=2)
    fresh.load_bridges(tmp_path)
    assert _same_bridges(fresh, calm)
    checkpoint.save_json(tmp_path / "calm_config.json", {**calm.config.to_dict(), "mode": "context"})
    with pytest.raises(ValueError, match="'context' mode"):
        fresh.load_bridges(tmp_path)
