"""The key-value arithmetic task: generator, splits, tokenizer, evaluation, shipped bases."""
import re

import pytest
import torch

from calm_fast.tasks.kv_arith import (DATASETS, SCALES, SPECIALS, KVArith, TaskConfig, Tokenizer, collate, evaluate,
                                      evaluate_expression, exact_match, generate_answers, make_keys)


def test_generator_is_deterministic_from_the_seed():
    a, b = KVArith(TaskConfig(seed=3)), KVArith(TaskConfig(seed=3))
    assert a.keys == b.keys and a.value == b.value and a.held_in == b.held_in
    for d in DATASETS:
        assert [e.text for e in a.sample(d, "held_out", 20, 7)] == [e.text for e in b.sample(d, "held_out", 20, 7)]
    c = KVArith(TaskConfig(seed=4))
    assert c.keys != a.keys
    assert [e.text for e in a.sample("kv_arithmetic", "all", 20, 7)] != \
        [e.text for e in a.sample("kv_arithmetic", "all", 20, 8)]


def test_keys_values_and_disjoint_splits():
    t = KVArith(TaskConfig(n_kv=200, seed=0))
    assert len(set(t.keys)) == 200
    assert all(re.fullmatch(r"[a-z]{2,6}", k) for k in t.keys)
    assert sorted(t.value.values()) == list(range(1, 201))  # unique values in [1, N_KV]
    assert set(t.held_in).isdisjoint(t.held_out)
    assert set(t.held_in) | set(t.held_out) == set(t.keys)
    assert len(t.held_in) == 40  # 20% held in
    for e in t.sample("kv_arithmetic", "held_in", 50, 0):
        assert all(w in t.held_in for w in e.text.split("=")[0].split() if w.isalpha())


def test_keys_are_single_tokens_and_roles_never_see_the_other_data():
    t = KVArith(TaskConfig(n_kv=50))
    tok = t.tok
    for k in t.keys:  # one key token, then its (digits - 1) placeholder slots
        ids = tok.encode(k)
        assert tok.is_key(ids[0]) and not any(tok.is_key(i) for i in ids[1:])
        assert len(ids) == max(1, t.cfg.digits) and all(tok.itos[i] == "_" for i in ids[1:])
    for e in t.sample("numeric_arithmetic", "all", 100, 0):  # m_B's data: no key token
        assert not any(tok.is_key(i) for i in e.prompt + e.answer)
    for e in t.sample("kv_substitution", "all", 100, 0):  # m_A's data: the answer is the substitution
        lhs, rhs = e.text.split(" = ")
        assert rhs == " ".join(str(t.value[w]) if w in t.value else w for w in lhs.split())


def test_tokenizer_round_trip_and_lsd_first():
    tok = Tokenizer(make_keys(30, 0))
    key = tok.itos[tok.first_key_id]
    for text in ["12 + 7 = 19", f"{key} - {key} * 3 = 0", "100 - 1 = 99", "5 * 4 = 20", "0"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("123") == [tok.stoi["3"], tok.stoi["2"], tok.stoi["1"]]  # least significant first
    assert tok.decode(tok.encode("3 - 10 =") + tok.encode("-7") + [tok.eos_id]) == "3 - 10 = -7 <eos>"
    with pytest.raises(ValueError, match="unknown word"):
        tok.encode("12 + zzzzzzzzz =")


def test_key_slots_and_padded_digits():
    """CPU default: numbers are zero-padded 2-digit LSD-first; a key is one token followed by a
    placeholder slot, so a key and a number take the same positions; display text is ordinary."""
    t = KVArith()
    tok = t.tok
    ids = tok.encode("12 + 7 = 19")
    d = {c: tok.stoi[c] for c in "0123456789+="}
    assert ids == [d["2"], d["1"], d["+"], d["7"], d["0"], d["="], d["9"], d["1"]]
    assert tok.decode(ids) == "12 + 7 = 19"
    num = t.sample("numeric_arithmetic", "all", 5, 0)
    kv = t.sample("kv_arithmetic", "all", 5, 0)
    assert all(len(a.prompt) == len(b.prompt) == 7 for a, b in zip(num, kv))  # same layout, position by position
    key = t.keys[0]
    assert tok.decode(tok.encode(f"{key} + 3 =")) == f"{key} + 3 ="


def test_operand_tokens_option():
    t = KVArith(TaskConfig(operand_tokens=True, key_slots=False))
    tok = t.tok
    ids = tok.encode("12 + 7 = 19")
    assert ids == [tok.stoi["<12>"], tok.stoi["+"], tok.stoi["<7>"], tok.eq_id, tok.stoi["9"], tok.stoi["1"]]
    assert tok.decode(ids) == "12 + 7 = 19"
    assert len(t.sample("numeric_arithmetic", "all", 1, 0)[0].prompt) == 5


def test_expression_precedence():
    assert evaluate_expression([10, 14, 2], ["+", "*"]) == 38  # the paper's x1 + x8 * xn = 38
    assert evaluate_expression([10, 22, 24], ["+", "-"]) == 8
    assert evaluate_expression([2, 3, 4, 5], ["*", "-", "*"]) == -14
    assert evaluate_expression([7], []) == 7


def test_scales():
    paper = SCALES["paper"]
    assert paper.n_kv == 25_000 and (paper.min_operands, paper.max_operands) == (3, 6) and paper.operators == "+-*"
    with pytest.raises(ValueError, match="operators"):
        TaskConfig(operators="/")


def test_collate_masks_answer_targets_only():
    t = KVArith(TaskConfig(n_kv=20))
    ex = t.sample("numeric_arithmetic", "all", 4, 0)
    tokens, mask, plen = collate(ex)
    for i, e in enumerate(ex):
        targets = tokens[i, 1:][mask[i, :-1]].tolist()
        assert targets == e.answer


def test_exact_match_on_hand_built_examples():
    eos = 2
    targets = [[5, 6, eos], [7, eos], [9, eos]]
    preds = [[5, 6, eos, 0, 0], [7, 8, eos], [9]]  # right, wrong digit, no EOS
    assert exact_match(preds, targets, eos) == pytest.approx(100 / 3)
    assert exact_match([[5, 6, eos, 4]], [[5, 6, eos]], eos) == 100.0  # tokens after EOS ignored
    with pytest.raises(ValueError):
        exact_match([[1]], [], eos)


def test_evaluation_of_an_oracle_and_a_constant_model():
    """A Decoder whose logits are forced to the right answer scores 100; a constant one 0."""
    from calm_fast import Decoder, DecoderConfig
    t = KVArith(SCALES["tiny"])
    ex = t.sample("numeric_arithmetic", "all", 6, 0)
    m = Decoder(DecoderConfig(vocab_size=t.tok.vocab_size, dim=16, n_layers=1, n_heads=2, max_seq_len=32))
    pred = generate_answers(m, ex, t.max_answer_len("numeric_arithmetic"), t.tok.eos_id)
    assert len(pred) == 6 and all(len(p) <= t.max_answer_len("numeric_arithmetic") for p in pred)
    with torch.no_grad():  # make it always emit EOS: never correct (answers have >= 1 digit)
        m.lm_head.weight.zero_()
        m.lm_head.weight[t.tok.eos_id] = 1.0
        m.norm.weight.fill_(1.0)
    assert evaluate(m, t, "numeric_arithmetic", "all", 8) == 0.0
    assert exact_match([e.answer for e in ex], [e.answer for e in ex], t.tok.eos_id) == 100.0


def test_shipped_bases_load_and_score_above_a_floor():
    from calm_fast.demo import ASSETS, load_bases
    if not (ASSETS / "m_B.safetensors").is_file():
        pytest.skip("no shipped base models")
    torch.manual_seed(0)
    task, m_A, m_B = load_bases(ASSETS)
    assert m_A.cfg.vocab_size == m_B.cfg.vocab_size == task.tok.vocab_size
    assert evaluate(m_A, task, "kv_substitution", "all", 64, seed=1) >= 80
    assert evaluate(m_B, task, "numeric_arithmetic", "all", 64, seed=1) >= 70
    assert evaluate(m_B, task, "kv_arithmetic", "held_out", 32, seed=1) <= 10  # m_B does not know the keys


def test_n_values_option_shares_values_between_keys():
    t = KVArith(TaskConfig(n_kv=60, n_values=20))
    assert sorted(set(t.value.values())) == list(range(1, 21))
    assert all(list(t.value.values()).count(v) == 3 for v in range(1, 21))


def test_dictionary_stream_with_slots_reads_a_key_as_a_prompt_does():
    t = KVArith(TaskConfig(n_kv=60, n_values=20))
    tokens, mask, inputs = t.sample_dictionary(4, 1, pairs=4, slot_fraction=1.0)
    same, _, _ = t.sample_dictionary(4, 1, pairs=4)
    assert torch.equal(tokens, same)  # the labels do not depend on the slot fraction
    slot = t.tok.stoi["_"]
    for row, inp in zip(tokens.tolist(), inputs.tolist()):
        for j in range(1, len(row), 3):  # 'k _ d1' is read, 'k d0 d1' is predicted
            assert inp[j] == row[j] and inp[j + 1] == slot and inp[j + 2] == row[j + 2]
    half = t.sample_dictionary(200, 2, pairs=4, slot_fraction=0.5)[2]
    share = (half[:, 2::3] == slot).float().mean().item()
    assert 0.4 < share < 0.6
    with pytest.raises(ValueError, match="slot_fraction must be a number in"):
        t.sample_dictionary(1, 0, pairs=1, slot_fraction=1.5)


def test_dictionary_stream_puts_each_value_right_after_its_key():
    t = KVArith(TaskConfig(n_kv=60, n_values=20))
    tokens, mask, inputs = t.sample_dictionary(3, 0, pairs=4)
    assert tokens.shape == mask.shape == (3, 1 + 4 * 3)  # <bos> + 4 x (key, d0, d1)
    assert torch.equal(inputs, tokens)  # slot_fraction=0: the model reads what it predicts
    for row, m in zip(tokens.tolist(), mask.tolist()):
        assert row[0] == t.tok.bos_id and not m[0] and not m[-1]
        for j in range(1, len(row), 3):
            key = t.tok.itos[row[j]]
            assert row[j + 1:j + 3] == t.tok.encode_number(t.value[key])  # the value's digits, LSD first
            assert m[j] and m[j + 1] and not m[j + 2]  # loss on the value digits, not on the next key
    ops = KVArith(TaskConfig(n_kv=60, n_values=20, operand_tokens=True, key_slots=False))
    tokens, mask, _ = ops.sample_dictionary(2, 0, pairs=3)
    assert tokens.shape == (2, 7) and ops.tok.itos[tokens[0, 2].item()] == f"<{ops.value[ops.tok.itos[tokens[0, 1].item()]]}>"
    assert ops.tok.vocab_size == len(SPECIALS) + 21 + 60  # number tokens <0>..<n_values>


def test_literal_operands_write_some_keys_as_their_numbers():
    t = KVArith(TaskConfig(n_kv=60, n_values=20))
    plain = t.sample("kv_arithmetic", "held_in", 40, 3)
    assert [e.prompt for e in t.sample("kv_arithmetic", "held_in", 40, 3, literal_fraction=0.0)] == \
        [e.prompt for e in plain]
    mixed = t.sample("kv_arithmetic", "held_in", 40, 3, literal_fraction=0.5)
    n_keys = sum(tok >= t.tok.first_key_id for e in mixed for tok in e.prompt)
    assert 0 < n_keys < sum(tok >= t.tok.first_key_id for e in plain for tok in e.prompt)
    for a, b in zip(plain, mixed):  # same expressions and answers; only how operands are written
        assert a.answer == b.answer and a.value == b.value
    numeric = t.sample("kv_arithmetic", "held_in", 5, 3, literal_fraction=1.0)
    assert all(tok < t.tok.first_key_id for e in numeric for tok in e.prompt)
    for bad, match in ((1.5, "literal_fraction must be a number in"), (0.5, "kv_arithmetic only")):
        with pytest.raises(ValueError, match=match):
            t.sample("kv_substitution" if bad == 0.5 else "kv_arithmetic", "held_in", 1, 0, literal_fraction=bad)


def test_rerun_ablation_replaces_one_row_and_records_it(tmp_path):
    """scripts/rerun_ablation.py on a copy of the reference results (its steps cut to 2 in the
    copy, so the run is quick): the row is replaced, the old one kept under "reruns", the
    markdown says a row was re-run, and the other rows are untouched."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    from calm_fast.demo import ASSETS
    root = Path(__file__).resolve().parents[1]
    if not (ASSETS / "m_B.safetensors").is_file():
        pytest.skip("no shipped base models")
    r = json.loads((root / "results" / "kv_arith.json").read_text())
    r["config"]["compose_train"]["steps"] = 2
    r["config"]["eval_samples"] = 16
    (tmp_path / "kv_arith.json").write_text(json.dumps(r))
    done = subprocess.run([sys.executable, str(root / "scripts" / "rerun_ablation.py"), "random_m_A", "--results",
                           str(tmp_path), "--runs", str(tmp_path / "runs"), "--threads", "1"],
                          cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    new = json.loads((tmp_path / "kv_arith.json").read_text())
    assert new["reruns"][-1]["variant"] == "random_m_A" and new["reruns"][-1]["before"] == r["ablations"]["random_m_A"]
    assert new["ablations"]["random_m_A"]["trained_params"] == r["ablations"]["random_m_A"]["trained_params"]
    assert {k: v for k, v in new["ablations"].items() if k != "random_m_A"} == \
        {k: v for k, v in r["ablations"].items() if k != "random_m_A"}
    assert "Re-run with later code" in (tmp_path / "kv_arith.md").read_text()
