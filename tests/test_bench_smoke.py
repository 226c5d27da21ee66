"""The CPU benchmarks in bench/ run end to end at tiny sizes and write reports whose numbers
agree with each other (every ratio is the quotient of the times it names; each throughput
times its time is the variant's fixed work). Timings at these sizes mean nothing: this checks
the scripts users run, not the speed (bench/RESULTS.md has the figures and their commands)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from calm_fast import ops

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, *args, timeout: int = 300) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "bench" / script), *map(str, args)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def test_bench_bridge_cpu_quick(tmp_path):
    _bench("bench_bridge.py", "--device", "cpu", "--quick", "--repeats", "1", "--threads", "1",
           "--out-dir", tmp_path)
    report = json.loads((tmp_path / "bridge_cpu.json").read_text())
    assert (tmp_path / "bridge_cpu.png").stat().st_size > 0
    groups = defaultdict(dict)
    for row in report["rows"]:
        assert math.isfinite(row["ms"]) and row["ms"] > 0, row
        groups[(row["phase"], row["B"], row.get("T"), row.get("D_B"))][row["variant"]] = row
    phases = {key[0] for key in groups}
    assert {"prefill", "decode"} <= phases, phases
    want_cpp = "cpp" in ops.available_backends("cpu")
    for key, rows in groups.items():
        if want_cpp:
            assert "cpp" in rows, (key, sorted(rows))
        work = {name: r["tflops"] * r["ms"] for name, r in rows.items()}
        first = next(iter(work.values()))
        assert all(_close(w, first) for w in work.values()), (key, work)  # same FLOPs, any variant
        if key[0] == "attention":  # the op alone: times and TFLOP/s, no ratios in the report
            continue
        for base in ("ref", "sdpa"):
            assert base in rows, (key, sorted(rows))
            for name, r in rows.items():
                assert _close(r[f"speedup_vs_{base}"], rows[base]["ms"] / r["ms"]), (key, name, base)


def test_bench_train_small(tmp_path):
    out = tmp_path / "train.json"
    variants = ["eager", "cached_states"] + (["cpp_eager"] if "cpp" in ops.available_backends("cpu") else [])
    _bench("bench_train.py", "--small", "--repeats", "2", "--steps", "1", "--variants", ",".join(variants),
           "--out", out)
    report = json.loads(out.read_text())
    assert sorted(report["step_s"]) == sorted(variants), report["notes"]
    tokens = report["config"]["batch"] * report["config"]["seq"]
    for name in variants:
        step = report["step_s"][name]
        assert len(step["values"]) == 2 and step["min"] <= step["median"] <= step["max"]
        assert _close(report["tokens_per_s"][name], tokens / step["median"])
        assert _close(report["speedup_vs_eager"][name], report["step_s"]["eager"]["median"] / step["median"])
        # W_o starts at zero: every variant's first loss is the anchor's, bit for bit.
        assert report["first_step_loss"][name] == report["first_step_loss"]["eager"]


def test_bench_onnx_tiny_generates_the_eager_tokens(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "onnx.json"
    _bench("bench_onnx.py", "--batches", "1", "3", "--prompt-len", "5", "--new-tokens", "4", "--repeats", "1",
           "--vocab", "64", "--anchor-dim", "64", "--anchor-layers", "2", "--augment-dim", "32",
           "--augment-layers", "2", "--no-compile", "--out", out)
    report = json.loads(out.read_text())
    engines = {(r["engine"], r["batch"]) for r in report["results"]}
    assert {("eager", 1), ("ort_cpu", 1), ("eager", 3), ("ort_cpu", 3)} <= engines, engines
    for r in report["results"]:
        assert r["decode_tokens_per_s"] > 0 and r["e2e_tokens_per_s"] > 0, r
        if r["engine"] != "eager":
            assert r["same_tokens_as_eager"] is True, r


def test_bench_onnx_refuses_widths_its_heads_do_not_divide():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "bench/bench_onnx.py"), "--anchor-dim", "200"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--anchor-dim" in done.stderr and "200" in done.stderr, done.stderr


def test_bench_decode_call_and_roofline(tmp_path):
    text = _bench("bench_decode_call.py", "--rounds", "3", "--flush-mb", "8")
    assert "raw _C.decode_step" in text and "eager reference" in text, text
    out = tmp_path / "roofline.json"
    _bench("bench_roofline.py", "--repeats", "1", "--bw-mb", "16", "--new-tokens", "4", "--step-rounds", "2",
           "--out", out)
    report = json.loads(out.read_text())
    for key in ("anchor_fraction_of_roofline", "composition_overhead", "composition_overhead_single_step"):
        assert math.isfinite(report[key]) and report[key] > 0, (key, report[key])


def _bench_onnx_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("calm_bench_onnx", ROOT / "bench" / "bench_onnx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_ONNX_TINY = ["--prompt-len", "5", "--new-tokens", "3", "--repeats", "1", "--vocab", "64", "--anchor-dim", "64",
              "--anchor-layers", "2", "--augment-dim", "32", "--augment-layers", "2", "--no-compile",
              "--threads", "1", "--batches", "1"]


@pytest.mark.parametrize("extra,flag", [
    (["--new-tokens", "1"], "--new-tokens"), (["--new-tokens", "0"], "--new-tokens"),
    (["--repeats", "0"], "--repeats"), (["--batches", "0"], "--batches"),
    (["--batches", "4", "--prompt-len", "3"], "--prompt-len"), (["--anchor-dim", "320"], "--anchor-dim"),
    (["--anchor-layers", "0"], "--anchor-layers"), (["--vocab", "1"], "--vocab"),
    (["--threads", "-1"], "--threads"), (["--prompt-len", "500", "--new-tokens", "20"], "--prompt-len"),
])
def test_bench_onnx_bad_arguments_are_argparse_errors(monkeypatch, capsys, extra, flag):
    """Audit bug: these crashed late (ZeroDivisionError, StatisticsError, a prompt error naming no
    flag, DecoderConfig's heads/kv-heads error), some after every engine had run."""
    pytest.importorskip("onnxruntime")
    bench = _bench_onnx_module()

    def no_work(*a, **k):
        raise AssertionError("the benchmark started before its arguments were checked")
    monkeypatch.setattr(bench, "build_model", no_work)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(_ONNX_TINY + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err, err


def test_bench_onnx_warns_when_tokens_differ(tmp_path, monkeypatch, capsys):
    """same_tokens_as_eager False (an engine computed something else, so its speed means
    nothing) is a visible warning on stderr and in the report, not only a field of one row."""
    pytest.importorskip("onnxruntime")
    bench = _bench_onnx_module()

    class Wrong(bench.OrtGenerator):
        def stream(self, *a, **k):
            for nxt in super().stream(*a, **k):
                yield (nxt + 1) % self.vocab_size
    monkeypatch.setattr(bench, "OrtGenerator", Wrong)
    out = tmp_path / "onnx.json"
    import torch
    threads = torch.get_num_threads()
    try:
        bench.main(_ONNX_TINY + ["--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # main() sets --threads for this process
    report = json.loads(out.read_text())
    assert [r["same_tokens_as_eager"] for r in report["results"] if r["engine"] == "ort_cpu"] == [False]
    assert len(report["warnings"]) == 1 and "ort_cpu" in report["warnings"][0], report["warnings"]
    assert "WARNING: batch 1 ort_cpu: greedy tokens differ from eager's" in capsys.readouterr().err


def _bench_module(script: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"calm_bench_{Path(script).stem}", ROOT / "bench" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _no_work(*a, **k):
    raise AssertionError("the benchmark started before its arguments were checked")


def _argparse_error(main, argv, flag, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and flag in lines[0], err
    return lines[0]


_NO_CUDA = [] if __import__("torch").cuda.is_available() else [(["--device", "cuda"], "--device")]


@pytest.mark.parametrize("extra,flag", [
    (["--dtype", "bogus"], "--dtype"), (["--dtype", "int32"], "--dtype"), (["--device", "bogus"], "--device"),
    (["--device", "meta"], "--device"), (["--repeats", "0"], "--repeats"), (["--repeats", "-1"], "--repeats"),
    (["--cache-rows", "0"], "--cache-rows"), (["--d-a", "-3"], "--d-a"), (["--threads", "-2"], "--threads"),
    (["--head-dim", "0"], "--head-dim"), (["--head-dim", "96"], "--head-dim"),
    (["--head-dim", "1024", "--only", "decode"], "--head-dim"),
    (["--backends", "bogus"], "--backends"), (["--backends", ","], "--backends"),
    (["--backends", "reference"], "--backends"),
] + _NO_CUDA)
def test_bench_bridge_bad_arguments_are_argparse_errors(monkeypatch, capsys, extra, flag):
    """Audit bug: these were tracebacks (AttributeError for --dtype, RuntimeError for --device,
    a reshape error for --head-dim), a StatisticsError after the ceilings (--repeats -1), a
    silent fallback to the default (--repeats/--cache-rows/--head-dim 0), or a report with the
    asked-for backends silently left out (--backends)."""
    bench = _bench_module("bench_bridge.py")
    for name in ("bench_prefill", "bench_decode", "bench_attention"):
        monkeypatch.setattr(bench, name, _no_work)
    monkeypatch.setattr(bench.common, "ceilings", _no_work)
    argv = ["--quick", "--repeats", "1", "--out-dir", "/nonexistent/never-written"]
    if "--device" not in extra:
        argv = ["--device", "cpu"] + argv
    _argparse_error(bench.main, argv + extra, flag, capsys)


def _main_with_argv(monkeypatch, bench, script: str, argv: list[str]):
    """bench.main() reading argv from sys.argv, as when the script is run."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    return bench.main


@pytest.mark.parametrize("extra,flag", [
    (["--variants", "bogus"], "--variants"), (["--variants", "eager,bogus"], "--variants"),
    (["--variants", ""], "--variants"), (["--variants", "eager,eager"], "--variants"),
    (["--repeats", "0"], "--repeats"), (["--steps", "0"], "--steps"), (["--steps", "-1"], "--steps"),
    (["--threads", "-1"], "--threads"), (["--variants", "cpp_eager", "--no-cpp"], "--variants"),
])
def test_bench_train_bad_arguments_are_argparse_errors(monkeypatch, capsys, extra, flag):
    """Audit bug: an unknown --variants name was a KeyError (after the variants before it had
    been built and compiled), --repeats/--steps 0 a StatisticsError after building every
    variant, --variants naming only cpp variants without the extension a ZeroDivisionError."""
    bench = _bench_module("bench_train.py")
    monkeypatch.setattr(bench, "Variant", _no_work)
    if "--no-cpp" in extra:
        extra = [a for a in extra if a != "--no-cpp"]
        monkeypatch.setattr(bench.cf.ops, "available_backends", lambda *a, **k: ["reference", "sdpa"])
    argv = ["--small", "--repeats", "1", "--steps", "1", "--variants", "eager", "--out", "/nonexistent/x.json"]
    main = _main_with_argv(monkeypatch, bench, "bench_train.py", argv + extra)
    _argparse_error(lambda _argv: main(), None, flag, capsys)


@pytest.mark.parametrize("extra,flag", [
    (["--new-tokens", "1"], "--new-tokens"), (["--new-tokens", "0"], "--new-tokens"),
    (["--new-tokens", "449"], "--new-tokens"), (["--repeats", "0"], "--repeats"), (["--bw-mb", "0"], "--bw-mb"),
    (["--step-rounds", "0"], "--step-rounds"), (["--threads", "-1"], "--threads"),
    (["--backend", "bogus"], "--backend"),
])
def test_bench_roofline_bad_arguments_are_argparse_errors(monkeypatch, capsys, extra, flag):
    """Audit bug: --new-tokens 1 was a ZeroDivisionError after every generation timing,
    --new-tokens past max_seq_len - prompt a prompt-length error naming no flag, --repeats or
    --step-rounds 0 a StatisticsError after the models ran, --bw-mb 0 a ZeroDivisionError in the
    roofline (zero bandwidth), --backend bogus a traceback at the first call."""
    bench = _bench_module("bench_roofline.py")
    monkeypatch.setattr(bench, "decoder", _no_work)
    argv = ["--repeats", "1", "--bw-mb", "16", "--new-tokens", "4", "--step-rounds", "2", "--out", "/nonexistent/x"]
    main = _main_with_argv(monkeypatch, bench, "bench_roofline.py", argv + extra)
    _argparse_error(lambda _argv: main(), None, flag, capsys)


@pytest.mark.parametrize("extra,flag", [
    (["--rounds", "0"], "--rounds"), (["--rounds", "-2"], "--rounds"), (["--flush-mb", "-1"], "--flush-mb"),
])
def test_bench_decode_call_bad_arguments_are_argparse_errors(monkeypatch, capsys, extra, flag):
    """Audit bug: --rounds 0 was a StatisticsError after the warm-up rounds had run every call
    layer, --flush-mb -1 a RuntimeError traceback from torch.zeros."""
    bench = _bench_module("bench_decode_call.py")
    monkeypatch.setattr(bench.native, "_decode_args", _no_work)
    main = _main_with_argv(monkeypatch, bench, "bench_decode_call.py", ["--flush-mb", "8"] + extra)
    _argparse_error(lambda _argv: main(), None, flag, capsys)


@pytest.mark.parametrize("extra,flag", [
    (["--reps", "0"], "--reps"), (["--batch", "1"], "--batch"), (["--batch", "0"], "--batch"),
    (["--seq", "0"], "--seq"), (["--seq", "257"], "--seq"),
])
def test_bench_scaling_bad_arguments_are_argparse_errors(monkeypatch, capsys, extra, flag):
    """Audit bug: --reps 0 was an IndexError after the first measured step; --batch 1 left each
    rank of the 2-process run an empty batch and --seq past max_seq_len failed inside the model,
    tracebacks naming no flag."""
    import torch
    if torch.cuda.is_available() and extra[0] == "--batch" and extra[1] == "1":
        pytest.skip("on CUDA there is no 2-process run: --batch 1 is valid")
    bench = _bench_module("bench_scaling.py")
    monkeypatch.setattr(bench, "single_process", _no_work)
    monkeypatch.setattr(bench, "two_process", _no_work)
    threads = torch.get_num_threads()
    try:
        main = _main_with_argv(monkeypatch, bench, "bench_scaling.py", ["--out", "/nonexistent/x"] + extra)
        _argparse_error(lambda _argv: main(), None, flag, capsys)
    finally:
        torch.set_num_threads(threads)  # main() sets OMP_NUM_THREADS's count for this process


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bench_attention_eager_limit_must_be_a_size(value):
    """A negative or NaN --eager-limit-gb silently dropped the eager reference from every row;
    now a usage error (checked before the script asks for a GPU)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "bench/bench_attention.py"), "--eager-limit-gb", value],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--eager-limit-gb" in done.stderr, done.stderr[-2000:]


def test_timing_helpers_refuse_an_empty_sample():
    sys.path.insert(0, str(ROOT / "bench"))
    import common
    with pytest.raises(ValueError, match="repeats"):
        common.time_fn(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        common.compare({"a": lambda: None}, warmup=-1)


def test_attention_flops_count_the_pairs_the_mask_allows():
    """Regression (audit, session 10): the causal count halved Tq*Tk whatever Tq and Tk, so a
    Tq != Tk point would have been mislabelled (2x at Tq = 2 Tk, 0.5x at Tq = 1)."""
    import torch
    from calm_fast.ops import reference as ref
    flops = _bench_module("bench_attention.py").attention_flops
    for tq, tk in ((1, 2048), (512, 1024), (1024, 512), (7, 7), (2048, 64), (1, 1)):
        allowed = ref.attention_mask(tq, tk, "aligned", None, torch.device("cpu"))
        assert flops(1, 1, tq, tk, 1, True, False) == 4 * int(allowed.sum()), (tq, tk)
        assert flops(2, 3, tq, tk, 5, False, True) == 2.5 * 4 * 2 * 3 * tq * tk * 5
