"""The training pipeline: schedule, answer-only loss, a tiny end-to-end run, exact resume."""
import json

import pytest
import torch

from calm_fast.demo import (COMPOSE_TRAIN, MAPPINGS, VARIANTS, Variant, calm_param_count, load_bases,
                            train_bases, train_composition)
from calm_fast.train import TrainConfig, answer_loss, lr_at

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    train_bases("tiny", d, seed=0, progress=False, log=lambda *a: None)
    return d


def test_lr_schedule_warmup_and_cosine():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 99))


def test_answer_loss_ignores_prompt_tokens():
    tokens = torch.tensor([[1, 5, 6, 7]])
    mask = torch.tensor([[False, False, True, False]])  # only position 2 -> token 7 counts
    logits = torch.zeros(1, 4, 10)
    logits[0, 2, 7] = 100.0  # right where it counts; garbage elsewhere
    logits[0, 0, 3] = 100.0
    assert answer_loss(logits, tokens, mask) < 1e-6


def test_tiny_bases_train_and_loss_falls(tiny_bases):
    for role in ("m_A", "m_B"):
        recs = [json.loads(l) for l in (tiny_bases / f"{role}_run" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in recs if "loss" in r]
        assert losses[-1] < 0.8 * losses[0], (role, losses)
        assert any("eval" in r for r in recs)
    task, m_A, m_B = load_bases(tiny_bases)
    assert m_A.cfg.vocab_size == task.tok.vocab_size


def test_composition_trains_only_theta_c_and_loss_falls(tiny_bases, tmp_path):
    task, m_A, m_B = load_bases(tiny_bases)
    before = {k: v.clone() for k, v in m_B.state_dict().items()}
    cfg = TrainConfig(**{**COMPOSE_TRAIN["tiny"], "steps": 40, "lr": 1e-2, "log_every": 5, "progress": False})
    v = train_composition(task, m_A, m_B, "calm", "kv_arithmetic", cfg, MAPPINGS["tiny"], tmp_path,
                          log=lambda *a: None)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0]
    assert all(torch.equal(before[k], val) for k, val in m_B.state_dict().items())  # frozen is frozen
    assert set(v.params) == {f"bridges.{n}" for n, _ in v.model.bridges.named_parameters()}


@pytest.mark.parametrize("log_every", [1, 2])
def test_checkpoint_resumes_exactly(tiny_bases, tmp_path, log_every):
    """Interrupted right after its step-3 checkpoint (and in the middle of appending a
    metrics line) and resumed, a run logs the same losses as one that never stopped; with a
    record every 2 steps, the one at step 4 averages steps 3 and 4 across the stop (the running
    window is in the checkpoint: it used to restart empty, audit of session 10)."""
    d = tmp_path / "d"
    task, m_A, m_B = load_bases(tiny_bases)
    cfg = TrainConfig(**{**COMPOSE_TRAIN["tiny"], "steps": 6, "ckpt_every": 3, "log_every": log_every,
                         "progress": False})
    ref_dir = tmp_path / "ref"
    train_composition(task, m_A, m_B, "calm", "kv_arithmetic", cfg, MAPPINGS["tiny"], ref_dir, log=lambda *a: None)
    ref = [json.loads(l) for l in (ref_dir / "metrics.jsonl").read_text().splitlines()]

    class Stop(Exception):
        pass

    import calm_fast.train as tr
    real_save = tr.save_checkpoint

    def save_then_stop(directory, step, *a, **k):
        real_save(directory, step, *a, **k)
        if step == 3:
            raise Stop

    tr.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Stop):
            train_composition(task, m_A, m_B, "calm", "kv_arithmetic", cfg, MAPPINGS["tiny"], d, log=lambda *a: None)
    finally:
        tr.save_checkpoint = real_save
    with open(d / "metrics.jsonl", "a") as f:  # a kill in the middle of the next append
        f.write('{"step": 4, "lo')
    train_composition(task, m_A, m_B, "calm", "kv_arithmetic", cfg, MAPPINGS["tiny"], d, log=lambda *a: None)
    got = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in got if "loss" in r] == [r["loss"] for r in ref if "loss" in r]
    assert [r["step"] for r in got if "loss" in r] == list(range(log_every, 7, log_every))


def test_variants_have_matched_parameter_budgets(tiny_bases):
    task, m_A, m_B = load_bases(tiny_bases)
    budget = calm_param_count(m_A, m_B, MAPPINGS["tiny"])
    for name in VARIANTS:
        v = Variant(name, m_A, m_B, MAPPINGS["tiny"], 0, "cpu")
        if name == "full_ft":
            assert v.n_params() == sum(p.numel() for p in m_B.parameters())
        elif name == "lora":
            assert 0.5 * budget <= v.n_params() <= 1.5 * budget
            tokens = torch.randint(0, task.tok.vocab_size, (2, 5))
            assert torch.allclose(v.model(tokens), m_B(tokens))  # LoRA starts as the identity
        else:
            assert v.n_params() == budget


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_wraps_every_attention_and_mlp_projection(arch):
    """The ablation's LoRA adapts every linear map of every block (GPT-2's MLP is fc/proj,
    which the target list once missed), and nothing else (not the LM head)."""
    from calm_fast.config import DecoderConfig
    from calm_fast.decoder import Decoder
    from calm_fast.lora import LoRALinear, add_lora
    model = Decoder(DecoderConfig(arch=arch, vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=2,
                                  ffn_dim=24, max_seq_len=16))
    in_blocks = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("layers.")}
    add_lora(model, 2)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == in_blocks and len(wrapped) == 2 * (7 if arch == "llama" else 6)
