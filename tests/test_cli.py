"""The calm-fast command: --help everywhere, clear one-line errors, generate on tiny bases."""
import subprocess
import sys

import pytest

from calm_fast.cli import main

SUBCOMMANDS = ("demo", "train-bases", "train", "eval", "generate", "export")


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: calm-fast " + sub in out and "--seed" in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(s in out for s in SUBCOMMANDS)


def test_bad_argument_is_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-m", "calm_fast.cli", "demo", "--seeds", "one,two"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--seeds must be comma-separated ints" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("value", ["1.5", "nan", "half"])
def test_bad_literal_fraction_is_refused_before_any_work(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--literal-fraction", value])
    assert e.value.code == 2 and "expected a number in [0, 1]" in capsys.readouterr().err


def test_runtime_error_is_one_line(tmp_path, capsys):
    assert main(["eval", "--bases", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "no base models in" in err and "Traceback" not in err and err.count("\n") == 1
    cfg = tmp_path / "job.json"
    cfg.write_text('{"job": "dance", "out": "x"}')
    assert main(["train", "--config", str(cfg)]) == 2
    assert "'job' must be 'base' or 'compose'" in capsys.readouterr().err


def test_export_without_the_onnx_module_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "calm_fast.onnx_export", None)  # import fails
    assert main(["export", "--bridges", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "ONNX export is not available" in capsys.readouterr().err


def test_generate_with_tiny_bases(tmp_path, capsys):
    assert main(["train-bases", "--scale", "tiny", "--out", str(tmp_path), "--no-progress", "--threads", "1"]) == 0
    capsys.readouterr()
    assert main(["generate", "3 + 4 =", "--bases", str(tmp_path), "--model", "m_B", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 + 4 =")
    assert main(["generate", "3 + ??? =", "--bases", str(tmp_path)]) == 2
    assert "unknown word" in capsys.readouterr().err


def test_malformed_inputs_are_one_line_errors(tmp_path, capsys):
    """Regression: a job file holding a JSON list raised AttributeError, --device cuda on a
    machine without CUDA an AssertionError, --device bogus a RuntimeError, and a bridges
    directory whose config holds no mapping an IndexError: all tracebacks, exit 1."""
    import json

    import torch
    from safetensors.torch import save_file
    job = tmp_path / "list.json"
    job.write_text("[1, 2]")
    bridges = tmp_path / "br"
    bridges.mkdir()
    save_file({"x": torch.zeros(1)}, str(bridges / "bridges.safetensors"))  # the older format
    (bridges / "calm_config.json").write_text(json.dumps(
        {"mode": "aligned", "mappings": [], "anchor_dim": 0, "anchor_heads": 0, "augment_dims": []}))
    cases = [(["train", "--config", str(job)], "must hold a JSON object, got a JSON list"),
             (["generate", "1", "--device", "bogus"], "device must be cpu, cuda, cuda:N or auto, got 'bogus'"),
             (["generate", "1", "--bridges", str(bridges)], "has 0 augment model mapping(s)"),
             (["generate", "1", "--bridges", str(tmp_path / "none")], "missing safetensors file")]
    if not torch.cuda.is_available():
        cases.append((["generate", "1", "--device", "cuda"], "CUDA is not available"))
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, (argv, err)
