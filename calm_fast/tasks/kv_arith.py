"""The paper's key-value arithmetic task (CALM §4.1, Table 1): data, tokenizer, evaluation.

Everything is deterministic from a seed:
- N_KV keys, random strings of 2-6 lowercase letters, each ONE token of the task vocabulary,
  with unique values: a random permutation of [1, N_KV].
- Expressions: n operands joined by operators with normal precedence (x before + and -).
- Three datasets over expressions drawn the same way (each dataset from its own stream of the
  seed, so their expressions differ), prompt -> answer:
    KV-Substitution      "ab + cde - fg ="  ->  "10 + 22 - 24"
    KV-Arithmetic        "ab + cde - fg ="  ->  "8"
    Numeric-Arithmetic   "10 + 22 - 24 ="   ->  "8"
- Keys split into held-in (20%) and held-out (80%); the composition trains on held-in keys
  only and is evaluated on expressions made of held-out keys only.

Number format: every number is written least-significant digit first (LSD-first, "reversed"),
one token per digit, in prompts and answers alike, so a model adds digit by digit in the
order it writes them and carries forward. A negative number is its digits followed by the
sign token. `Tokenizer.encode`/`decode` take and give ordinary human-readable text
("12 + 7 = 19"); only the token order inside the model is reversed.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch

from ..checkpoint import load_json, save_json

PAD, BOS, EOS, SLOT = "<pad>", "<bos>", "<eos>", "_"
OPERATORS = ("+", "-", "*")
SPECIALS = (PAD, BOS, EOS, "=", "+", "-", "*") + tuple(str(d) for d in range(10))
DATASETS = ("kv_substitution", "numeric_arithmetic", "kv_arithmetic")


@dataclass
class TaskConfig:
    """The task's scale. The CPU default is scaled down from the paper (see docs/kv_arith.md):
    99 keys (paper 25K), 2 operands (paper 3-6), + and - (paper +, -, x), non-negative
    results, numbers zero-padded to 2 digits."""
    n_kv: int = 99
    min_operands: int = 2
    max_operands: int = 2
    operators: str = "+-"
    held_in_fraction: float = 0.2
    allow_negative: bool = False
    digits: int = 2          # > 0: every number zero-padded to this many digits (0 = natural width)
    operand_tokens: bool = False  # numbers left of "=" are single tokens (like keys); answers are digits
    n_values: int = 0        # > 0: values in [1, n_values], each used by ~N_KV/n_values keys
                             # (0 = the paper's unique values, a permutation of [1, N_KV])
    key_slots: bool = True   # each key is followed by (digits - 1) placeholder tokens "_", so a key
                             # and a number take the same positions (the key itself is one token)
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.n_kv, int) or self.n_kv < 5:
            raise ValueError(f"n_kv must be an int >= 5, got {self.n_kv!r}")
        if not 1 <= self.min_operands <= self.max_operands:
            raise ValueError(f"need 1 <= min_operands <= max_operands, got {self.min_operands}, {self.max_operands}")
        if not self.operators or any(o not in OPERATORS for o in self.operators):
            raise ValueError(f"operators must be a non-empty subset of {''.join(OPERATORS)!r}, got {self.operators!r}")
        if not 0.0 < self.held_in_fraction < 1.0:
            raise ValueError(f"held_in_fraction must be in (0, 1), got {self.held_in_fraction}")

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown task field(s): {unknown}")
        return cls(**d)


SCALES = {
    # CPU scale: 2000 keys sharing 99 values (~20 keys per value), so the 400 held-in keys cover
    # ~99% of the values (what the composition must generalise over is the value space).
    "cpu": TaskConfig(n_kv=2000, n_values=99),
    "paper": TaskConfig(n_kv=25_000, min_operands=3, max_operands=6, operators="+-*",
                        allow_negative=True, digits=0, operand_tokens=False, key_slots=False),
    "tiny": TaskConfig(n_kv=20, min_operands=2, max_operands=2, operators="+", digits=2),
}


def make_keys(n: int, seed: int) -> list[str]:
    """n unique random lowercase strings of 2-6 letters."""
    rng = random.Random(f"keys-{seed}")
    letters = "abcdefghijklmnopqrstuvwxyz"
    keys, seen = [], set()
    while len(keys) < n:
        k = "".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
        if k not in seen:
            seen.add(k)
            keys.append(k)
    return keys


class Tokenizer:
    """Word-level tokenizer: specials, operators, '=', digits 0-9, then one token per key.
    Text is whitespace-separated words; a number word becomes its digits LSD-first (and a
    trailing sign token if negative); decode turns them back into ordinary numbers."""

    def __init__(self, keys: list[str], digits: int = 0, number_tokens: int = 0, key_slots: int = 0):
        self.digits, self.number_tokens, self.key_slots = digits, number_tokens, key_slots
        self.itos = list(SPECIALS) + [f"<{n}>" for n in range(number_tokens)] + \
            ([SLOT] if key_slots else []) + list(keys)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate tokens in the vocabulary")
        self.pad_id, self.bos_id, self.eos_id = self.stoi[PAD], self.stoi[BOS], self.stoi[EOS]
        self.eq_id = self.stoi["="]
        self.digit_ids = {self.stoi[str(d)] for d in range(10)}
        self.n_keys = len(keys)
        self.first_key_id = len(SPECIALS) + number_tokens + (1 if key_slots else 0)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def is_key(self, token_id: int) -> bool:
        return token_id >= self.first_key_id

    def encode_number(self, n: int) -> list[int]:
        ids = [self.stoi[c] for c in reversed(str(abs(n)).zfill(self.digits))]
        return ids + [self.stoi["-"]] if n < 0 else ids

    def encode(self, text: str) -> list[int]:
        """Numbers left of the first "=" are single number tokens when the vocabulary has them
        (operand tokens); everywhere else they are digits, LSD-first."""
        ids, lhs = [], True
        for w in text.split():
            if w == "=":
                lhs = False
            if w.lstrip("-").isdigit() and w not in ("-",):
                n = int(w)
                if lhs and 0 <= n < self.number_tokens:
                    ids.append(self.stoi[f"<{n}>"])
                else:
                    ids += self.encode_number(n)
            elif w in self.stoi and w != SLOT:
                ids.append(self.stoi[w])
                if self.key_slots and self.stoi[w] >= self.first_key_id:
                    ids += [self.stoi[SLOT]] * self.key_slots
            else:
                raise ValueError(f"unknown word {w!r}: not a number, operator, special or key")
        return ids

    def decode(self, ids) -> str:
        """Token ids -> text, digit runs turned back into ordinary numbers."""
        words, digits = [], []

        def flush(neg=False):
            if digits:
                words.append(("-" if neg else "") + str(int("".join(reversed(digits)))))
                digits.clear()

        ids = [int(i) for i in ids]
        for j, i in enumerate(ids):
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} out of range for vocab_size={self.vocab_size}")
            s = self.itos[i]
            if s.isdigit():
                digits.append(s)
            elif s.startswith("<") and s[1:-1].isdigit():
                flush()
                words.append(s[1:-1])
            elif s == "-" and digits and (j + 1 == len(ids) or self.itos[ids[j + 1]] in ("=", EOS, PAD)):
                flush(neg=True)  # a trailing sign after a number's digits
            else:
                flush()
                if s not in (PAD, SLOT):
                    words.append(s)
        flush()
        return " ".join(words)


@dataclass
class Example:
    prompt: list[int]      # <bos> expression =
    answer: list[int]      # answer tokens + <eos>
    text: str = ""         # human-readable "prompt answer"
    value: int = 0


def evaluate_expression(values: list[int], ops: list[str]) -> int:
    """Normal precedence: x first, then + and - left to right."""
    terms, signs = [values[0]], []
    for op, v in zip(ops, values[1:]):
        if op == "*":
            terms[-1] *= v
        else:
            terms.append(v)
            signs.append(op)
    out = terms[0]
    for s, t in zip(signs, terms[1:]):
        out = out + t if s == "+" else out - t
    return out


class KVArith:
    """The task: keys, values, splits, tokenizer, and the three datasets."""

    def __init__(self, cfg: TaskConfig | None = None):
        self.cfg = cfg or TaskConfig()
        c = self.cfg
        self.keys = make_keys(c.n_kv, c.seed)
        rng = random.Random(f"values-{c.seed}")
        if c.n_values:
            values = [1 + i % c.n_values for i in range(c.n_kv)]
        else:
            values = list(range(1, c.n_kv + 1))
        rng.shuffle(values)
        self.value = dict(zip(self.keys, values))
        order = list(self.keys)
        random.Random(f"split-{c.seed}").shuffle(order)
        n_in = max(1, round(c.held_in_fraction * c.n_kv))
        self.held_in, self.held_out = sorted(order[:n_in]), sorted(order[n_in:])
        self.top = c.n_values or c.n_kv  # the largest value
        self.tok = Tokenizer(self.keys, c.digits, self.top + 1 if c.operand_tokens else 0,
                             max(0, c.digits - 1) if c.key_slots else 0)

    # ---- expressions ------------------------------------------------------------------------
    def sample_expression(self, rng: random.Random, keys: list[str]) -> tuple[list[str], list[str], int]:
        c = self.cfg
        while True:
            n = rng.randint(c.min_operands, c.max_operands)
            ks = [rng.choice(keys) for _ in range(n)]
            ops = [rng.choice(c.operators) for _ in range(n - 1)]
            result = evaluate_expression([self.value[k] for k in ks], ops)
            if c.allow_negative or result >= 0:
                return ks, ops, result

    def example(self, dataset: str, ks: list[str], ops: list[str], result: int,
                literal: list[bool] | None = None) -> Example:
        """literal[i]: write operand i of a kv_arithmetic prompt as its number, not its key."""
        vals = [str(self.value[k]) for k in ks]
        if literal is not None and dataset == "kv_arithmetic":
            ks = [v if lit else k for k, v, lit in zip(ks, vals, literal)]
        if dataset == "numeric_arithmetic":
            lhs, rhs = _join(vals, ops), str(result)
        elif dataset == "kv_arithmetic":
            lhs, rhs = _join(ks, ops), str(result)
        elif dataset == "kv_substitution":
            lhs, rhs = _join(ks, ops), _join(vals, ops)
        else:
            raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
        t = self.tok
        return Example([t.bos_id] + t.encode(lhs) + [t.eq_id], t.encode("= " + rhs)[1:] + [t.eos_id],
                       f"{lhs} = {rhs}", result)

    def sample_spelling(self, n: int, seed) -> list[Example]:
        """'<37> =' -> '37' in digits: how each number token is written. m_B learns it beside
        arithmetic (a pretrained LM knows how its number tokens are spelled); no key token."""
        rng = random.Random(f"spelling-{seed}")
        t = self.tok
        out = []
        for _ in range(n):
            v = rng.randint(0, self.top)
            out.append(Example([t.bos_id] + t.encode(str(v)) + [t.eq_id], t.encode(f"= {v}")[1:] + [t.eos_id],
                               f"{v} = {v}", v))
        return out

    def sample_dictionary(self, n: int, seed, pairs: int, split: str = "all", slot_fraction: float = 0.0):
        """m_A's dictionary stream: '<bos> k v k' v' ...' with each value written as m_B reads
        it left of '=' (a number token with operand_tokens, else its digits), so that m_A's
        state AT a key's position must predict the key's value. Returns (tokens (n, T),
        loss_mask (n, T), inputs (n, T)): the mask is set where the next token is a value (keys
        are random, nothing to learn there). With key slots, a `slot_fraction` of the pairs
        have their value's leading digits replaced in `inputs` by the slot tokens a key carries
        in a prompt ('k _ d1' for 'k d0 d1'; the labels stay `tokens`): m_A then predicts
        digit j+1 at a key's j-th slot, the state a composition reads in 'k _ + ...'."""
        _check_fraction("slot_fraction", slot_fraction)
        rng = random.Random(f"dictionary-{split}-{seed}")
        keys, t = self.split_keys(split), self.tok
        slots = t.key_slots if not t.number_tokens else 0
        seqs, masks, inputs = [], [], []
        for _ in range(n):
            ids, m, inp = [t.bos_id], [False], [t.bos_id]
            for _ in range(pairs):
                k = rng.choice(keys)
                v = t.encode(f"{self.value[k]}")  # lhs encoding: a number token or digits
                ids.append(t.stoi[k])
                m += [True] * len(v) + [False]
                ids += v
                masked = slots and rng.random() < slot_fraction
                inp += [t.stoi[k]] + ([t.stoi[SLOT]] * slots + v[slots:] if masked else v)
            seqs.append(ids)
            masks.append(m[:len(ids) - 1] + [False])
            inputs.append(inp)
        return torch.tensor(seqs), torch.tensor(masks), torch.tensor(inputs)

    def split_keys(self, split: str) -> list[str]:
        if split == "held_in":
            return self.held_in
        if split == "held_out":
            return self.held_out
        if split == "all":
            return self.keys
        raise ValueError(f"split must be 'held_in', 'held_out' or 'all', got {split!r}")

    def sample(self, dataset: str, split: str, n: int, seed, literal_fraction: float = 0.0) -> list[Example]:
        """n examples of `dataset` whose keys come from `split`, deterministic from seed.
        For numeric_arithmetic the operands are the values of those keys (any value in
        [1, N_KV] for split 'all'). literal_fraction (kv_arithmetic only): each operand is
        written as its number instead of its key with this probability ('ab _ + 37 =')."""
        _check_fraction("literal_fraction", literal_fraction)
        if literal_fraction and dataset != "kv_arithmetic":
            raise ValueError(f"literal_fraction applies to kv_arithmetic only, not {dataset!r}")
        rng = random.Random(f"{dataset}-{split}-{seed}")
        lit = random.Random(f"literal-{split}-{seed}")
        keys = self.split_keys(split)
        out = []
        for _ in range(n):
            ks, ops, result = self.sample_expression(rng, keys)
            literal = [lit.random() < literal_fraction for _ in ks] if literal_fraction else None
            out.append(self.example(dataset, ks, ops, result, literal))
        return out

    def max_answer_len(self, dataset: str) -> int:
        c = self.cfg
        top = self.top
        width = max(len(str(top)), c.digits)
        if dataset == "kv_substitution":
            return c.max_operands * width + c.max_operands - 1 + 1
        big = top ** c.max_operands if "*" in c.operators else top * c.max_operands
        return max(len(str(big)), c.digits) + 2  # digits, sign, <eos>

    def max_seq_len(self) -> int:
        c = self.cfg
        prompt = 2 + c.max_operands * max(len(str(c.n_values or c.n_kv)), c.digits) + c.max_operands - 1
        return prompt + max(self.max_answer_len(d) for d in DATASETS)


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _join(words: list[str], ops: list[str]) -> str:
    out = [words[0]]
    for o, w in zip(ops, words[1:]):
        out += [o, w]
    return " ".join(out)


# ---- batching -------------------------------------------------------------------------------
def collate(examples: list[Example], pad_id: int = 0, prompt_only: bool = False):
    """Right-padded (tokens (B, T), loss_mask (B, T) over answer targets, prompt_len (B,)).
    loss_mask[b, t] is True when tokens[b, t+1] is an answer token (predicted at t); the last
    column is never set. Right padding needs no attention mask: causal attention keeps pads
    out of every real position."""
    seqs = [e.prompt if prompt_only else e.prompt + e.answer for e in examples]
    t = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, (e, s) in enumerate(zip(examples, seqs)):
        tokens[i, :len(s)] = torch.tensor(s)
        if not prompt_only:
            loss_mask[i, len(e.prompt) - 1:len(s) - 1] = True
    plen = torch.tensor([len(e.prompt) for e in examples])
    return tokens, loss_mask, plen


def prompt_context(examples: list[Example], pad_id: int = 0):
    """Left-aligned prompts for context mode ('m_A as an encoder'): (tokens, mask)."""
    t = max(len(e.prompt) for e in examples)
    tokens = torch.full((len(examples), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), t), dtype=torch.bool)
    for i, e in enumerate(examples):
        tokens[i, :len(e.prompt)] = torch.tensor(e.prompt)
        mask[i, :len(e.prompt)] = True
    return tokens, mask


# ---- evaluation -----------------------------------------------------------------------------
def exact_match(predicted: list[list[int]], targets: list[list[int]], eos_id: int) -> float:
    """Percent of rows whose generated ids, cut at the first EOS (inclusive), equal the
    target answer (which ends in EOS)."""
    if len(predicted) != len(targets):
        raise ValueError(f"{len(predicted)} predictions for {len(targets)} targets")
    if not targets:
        return 0.0
    hits = 0
    for p, t in zip(predicted, targets):
        p = list(p)
        if eos_id in p:
            p = p[:p.index(eos_id) + 1]
        hits += p == list(t)
    return 100.0 * hits / len(targets)


@torch.no_grad()
def generate_answers(model, examples: list[Example], max_new_tokens: int, eos_id: int,
                     batch_size: int = 256, mode: str = "aligned", pad_id: int = 0) -> list[list[int]]:
    """Greedy cached generation for each prompt; returns the new ids per example."""
    from ..generate import generate
    out = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        kw = {}
        if mode == "context":
            kw["context"], kw["context_mask"] = prompt_context(chunk, pad_id)
        seq = generate(model, [e.prompt for e in chunk], max_new_tokens=max_new_tokens,
                       temperature=0.0, eos_id=eos_id, pad_id=pad_id, **kw)
        t = max(len(e.prompt) for e in chunk)
        out += [row[t:].tolist() for row in seq]
    return out


def evaluate(model, task: KVArith, dataset: str, split: str, n: int, seed=12345,
             batch_size: int = 256, mode: str = "aligned") -> float:
    """Exact match (%) of greedy cached generation on n fresh examples."""
    examples = task.sample(dataset, split, n, f"eval-{seed}")
    pred = generate_answers(model, examples, task.max_answer_len(dataset), task.tok.eos_id,
                            batch_size, mode, task.tok.pad_id)
    return exact_match(pred, [e.answer for e in examples], task.tok.eos_id)


def save_task(path, task: KVArith) -> None:
    save_json(path, task.cfg.to_dict())


def load_task(path) -> KVArith:
    return KVArith(TaskConfig.from_dict(load_json(path)))
