"""The key-value arithmetic experiment end to end: base models, composition, ablations, table.

    train_bases   m_A on KV-Substitution (all keys), m_B on Numeric-Arithmetic (no key token)
    compose       Θ_C on D_C = KV-Arithmetic (or KV-Substitution) over held-in keys
    evaluate      exact match, greedy cached generation, held-out keys
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from . import checkpoint
from .composed import CALM
from .config import DecoderConfig
from .decoder import Decoder
from .tasks.kv_arith import DATASETS, SCALES, KVArith, TaskConfig, collate, evaluate, prompt_context
from .train import TrainConfig, answer_loss, autocast_ctx, fit

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets" / "kv_arith"
RESULTS = REPO / "results"
PAPER_TABLE = {"kv_substitution": {"m_A": 98.1, "m_B": 0.0, "calm": 92.9},
               "numeric_arithmetic": {"m_A": 4.2, "m_B": 73.7, "calm": 72.0},
               "kv_arithmetic": {"m_A": 0.7, "m_B": 0.0, "calm": 84.3}}
ROW_NAMES = {"kv_substitution": "KV-Substitution", "numeric_arithmetic": "Numeric-Arithmetic",
             "kv_arithmetic": "KV-Arithmetic (held-out keys)"}

# ---- per-scale settings ----------------------------------------------------------------------
MODELS = {  # (m_A, m_B) shapes; vocab and max_seq_len come from the task
    "cpu": (dict(dim=96, n_layers=4, n_heads=4), dict(dim=128, n_layers=4, n_heads=4)),
    "paper": (dict(dim=256, n_layers=8, n_heads=4), dict(dim=512, n_layers=12, n_heads=8)),
    "tiny": (dict(dim=32, n_layers=2, n_heads=2), dict(dim=32, n_layers=2, n_heads=2)),
}
BASE_TRAIN = {  # role -> TrainConfig fields
    "cpu": {"m_A": dict(steps=600, batch_size=64, lr=3e-3, warmup=100, eval_every=200, ckpt_every=200),
            "m_B": dict(steps=3000, batch_size=64, lr=2e-3, warmup=100, eval_every=250, ckpt_every=250)},
    "paper": {"m_A": dict(steps=40000, batch_size=256, lr=1e-3, warmup=1000, eval_every=2000, ckpt_every=2000),
              "m_B": dict(steps=60000, batch_size=256, lr=5e-4, warmup=1000, eval_every=2000, ckpt_every=2000)},
    "tiny": {"m_A": dict(steps=30, batch_size=16, lr=3e-3, warmup=5, eval_samples=16),
             "m_B": dict(steps=30, batch_size=16, lr=3e-3, warmup=5, eval_samples=16)},
}
BASE_DATA = {"m_A": "kv_substitution", "m_B": "numeric_arithmetic"}
M_B_SOFT_OPERANDS = True  # see _soft_operands
DICT_SEQS = 32  # m_A's dictionary sequences per step, beside its KV-Substitution batch
DICT_SLOT_FRACTION = 0.5  # of those pairs, the share read as 'k _ d1' (see KVArith.sample_dictionary)
# GPT-2 family (learned absolute positions): the bridge's cross-attention has no positional
# encoding of its own, so in aligned mode it can match an anchor position to the same m_A
# position only through position features in both residual streams (see docs/kv_arith.md).
ARCH = "gpt2"


def model_config(task: KVArith, role: str, scale: str) -> DecoderConfig:
    shape = MODELS[scale][0 if role == "m_A" else 1]
    return DecoderConfig(arch=ARCH, vocab_size=task.tok.vocab_size, max_seq_len=task.max_seq_len() + 2,
                         **shape)


def pick_device(name: str | torch.device | None) -> torch.device:
    """"auto"/None: cuda when available, else cpu; else "cpu", "cuda" or "cuda:N", which must
    exist here (a ValueError naming the value otherwise, never torch's assertion)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine (use cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---- bases ---------------------------------------------------------------------------------------
def train_base(role: str, task: KVArith, mcfg: DecoderConfig, tcfg: TrainConfig, out_dir,
               device: torch.device, log=print, resume: bool = True) -> Decoder:
    """m_A: KV-Substitution over all keys (values, never an arithmetic answer).
    m_B: Numeric-Arithmetic over the keys' value range (never a key token)."""
    if role not in BASE_DATA:
        raise ValueError(f"role must be 'm_A' or 'm_B', got {role!r}")
    out_dir = Path(out_dir)
    torch.manual_seed(tcfg.seed)
    model = Decoder(mcfg).to(device)
    dataset = BASE_DATA[role]
    params = dict(model.named_parameters())

    spelling = role == "m_B" and task.cfg.operand_tokens
    dictionary = role == "m_A"
    pairs = (mcfg.max_seq_len - 1) // (1 + len(task.tok.encode("1")))

    def step_loss(step, micro):
        seed = f"train-{tcfg.seed}-{step}-{micro}"
        if spelling:  # a quarter of m_B's batch: how each number token is written in digits
            k = tcfg.batch_size // 4
            ex = task.sample(dataset, "all", tcfg.batch_size - k, seed) + task.sample_spelling(k, seed)
        else:
            ex = task.sample(dataset, "all", tcfg.batch_size, seed)
        tokens, mask, plen = collate(ex, task.tok.pad_id)
        tokens, mask = tokens.to(device), mask.to(device)
        hook = None
        if role == "m_B" and M_B_SOFT_OPERANDS:
            hook = model.tok_emb.register_forward_hook(_soft_operands(task, tokens, plen, step, micro, tcfg.seed))
        with autocast_ctx(tcfg.bf16, device):
            logits = model(tokens, validate=False)
        if hook is not None:
            hook.remove()
        loss = answer_loss(logits, tokens, mask)
        n = tokens.numel()
        if dictionary:  # m_A: "<bos> k v k' v' ...", the value right after its key (DICT_SEQS sequences)
            dt, dm, di = task.sample_dictionary(DICT_SEQS, seed, pairs, slot_fraction=DICT_SLOT_FRACTION)
            dt, dm, di = dt.to(device), dm.to(device), di.to(device)
            with autocast_ctx(tcfg.bf16, device):
                dlogits = model(di, validate=False)
            loss = 0.5 * (loss + answer_loss(dlogits, dt, dm))
            n += dt.numel()
        return loss, n

    if tcfg.compile:
        step_loss = _compiled(step_loss)

    def ev(step):
        return {dataset: evaluate(model, task, dataset, "all", tcfg.eval_samples, seed=f"base-{step}")}

    checkpoint.save_json(out_dir / f"{role}.config.json", mcfg.to_dict())
    checkpoint.save_json(out_dir / f"{role}.train.json", {"train": tcfg.to_dict(), "task": task.cfg.to_dict(),
                                                          "data": dataset + (" (soft operand digits in half of each batch)" if role == "m_B" and M_B_SOFT_OPERANDS else "") + (" + number_spelling (1/4 of each batch)"
                                                                             if spelling else "") +
                                                                  (f" + dictionary stream ({DICT_SEQS} seqs of {pairs} "
                                                                   f"key-value pairs per step, a share of "
                                                                   f"{DICT_SLOT_FRACTION} of the pairs read as "
                                                                   f"'k _ d1', loss averaged)"
                                                                   if dictionary else ""), "split": "all"})
    t0 = time.perf_counter()
    fit(params, step_loss, tcfg, out_dir / f"{role}_run", ev, desc=f"train {role}", resume=resume,
        modules=[model])
    log(f"{role}: trained in {time.perf_counter() - t0:.0f} s")
    checkpoint.save_tensors(out_dir / f"{role}.safetensors", model.state_dict())
    return model


def _soft_operands(task: KVArith, tokens, plen, step, micro, seed):
    """m_B reads "soft" operand digits in half of each batch: at a digit left of "=", the
    embedding E[d] becomes E[d] + a (E[d'] - E[d]) + noise (a ~ U(0, 0.45), d' a random digit,
    Gaussian noise of RMS up to 0.4 |E[d]|), so that its input is a robust code rather than a
    lookup of exact embeddings. What m_A hands over through a linear bridge is such a code: a
    least-squares map from m_A's states to m_B's digit embeddings has ~58% relative error, and
    m_B trained on exact embeddings then fails (docs/kv_arith.md, "Why soft operands")."""
    g = torch.Generator().manual_seed(hash((seed, step, micro)) % (2 ** 31))
    digits = torch.tensor(sorted(task.tok.digit_ids))
    lhs = torch.arange(tokens.shape[1])[None, :] < (plen[:, None] - 1)
    sel = torch.isin(tokens.cpu(), digits) & lhs
    sel &= (torch.rand(tokens.shape[0], 1, generator=g) < 0.5)
    a = torch.rand(tokens.shape, generator=g) * 0.45
    other = digits[torch.randint(0, 10, tokens.shape, generator=g)]
    sigma = torch.rand(tokens.shape[0], 1, 1, generator=g) * 0.4

    def hook(module, inputs, out):
        e_other = torch.nn.functional.embedding(other.to(out.device), module.weight)
        rms = out.detach().norm(dim=-1, keepdim=True)
        eps = torch.randn(out.shape, generator=g).to(out.device)
        soft = out + a.to(out.device)[..., None] * (e_other - out) + sigma.to(out.device) * rms * eps / out.shape[-1] ** 0.5
        return torch.where(sel.to(out.device)[..., None], soft, out)
    return hook


def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def load_base(directory, role: str, device=None) -> Decoder:
    directory = Path(directory)
    cfg = DecoderConfig.from_dict(checkpoint.load_json(directory / f"{role}.config.json"))
    model = Decoder(cfg)
    tensors = checkpoint.load_tensors(directory / f"{role}.safetensors")
    expected = model.state_dict()
    checkpoint.check_shapes(directory / f"{role}.safetensors", tensors, expected)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.eval()
    return model.to(device or "cpu")


def load_bases(directory=ASSETS, device=None) -> tuple[KVArith, Decoder, Decoder]:
    directory = Path(directory)
    if not (directory / "task.json").is_file():
        raise FileNotFoundError(f"no base models in {directory} (expected task.json, m_A.*, m_B.*); "
                                f"run `calm-fast train-bases --out {directory}`")
    task = KVArith(TaskConfig.from_dict(checkpoint.load_json(directory / "task.json")))
    return task, load_base(directory, "m_A", device), load_base(directory, "m_B", device)


def train_bases(scale: str = "cpu", out_dir=ASSETS, seed: int = 0, device=None, roles=("m_A", "m_B"),
                resume: bool = True, log=print, progress: bool = True) -> None:
    """Train the base models from scratch with the settings of `scale`; writes
    {out_dir}/task.json, m_A.*, m_B.* (weights, config, training config, metrics)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    out_dir = Path(out_dir)
    device = pick_device(device)
    task_cfg = TaskConfig.from_dict({**SCALES[scale].to_dict(), "seed": seed})
    task = KVArith(task_cfg)
    checkpoint.save_json(out_dir / "task.json", task_cfg.to_dict())
    for role in roles:
        tcfg = TrainConfig(**{**BASE_TRAIN[scale][role], "seed": seed, "progress": progress})
        train_base(role, task, model_config(task, role, scale), tcfg, out_dir, device, log, resume)


# ---- composition and ablations -------------------------------------------------------------
MAPPINGS = {  # explicit (m_A layer, m_B layer) pairs per scale; see docs/kv_arith.md, "Mapping"
    # m_A's last block -> the anchor's embedding output (anchor layer -1): a value written after
    # m_B's block 0 comes too late for m_B to read (docs/kv_arith.md, "Evidence").
    "cpu": [(3, -1)],
    "paper": [(7, -1), (1, 1), (3, 3), (5, 5), (7, 7), (7, 9), (7, 11)],
    "tiny": [(1, -1), (1, 1)],
}
COMPOSE_TRAIN = {
    "cpu": dict(steps=10000, batch_size=32, lr=1e-3, warmup=100, eval_every=1000, eval_samples=100,
                ckpt_every=2000),
    "paper": dict(steps=5000, batch_size=128, lr=1e-3, warmup=200, eval_every=500, eval_samples=500),
    "tiny": dict(steps=20, batch_size=8, lr=3e-3, warmup=2, eval_samples=8),
}
# D_C = KV-Arithmetic over held-in keys, each operand written as its number instead of its key
# with this probability ('ab _ + 37 ='): the bridge also sees digits where keys stand and learns
# to leave them alone. With 0 (the paper's pure D_C) CALM still solves held-out KV-Arithmetic
# but wipes out m_B's Numeric-Arithmetic (docs/kv_arith.md, "Forgetting").
DC_LITERAL_FRACTION = 0.5


def dc_literal_fraction(dc: str, value: float | None = None) -> float:
    """The literal-operand share for D_C `dc` (None: DC_LITERAL_FRACTION; only kv_arithmetic has one)."""
    if dc != "kv_arithmetic":
        if value:
            raise ValueError(f"literal_fraction applies to D_C kv_arithmetic only, not {dc!r}")
        return 0.0
    return DC_LITERAL_FRACTION if value is None else value


VARIANTS = ("calm", "random_m_A", "encoder", "lora", "full_ft")
VARIANT_NAMES = {"calm": "CALM", "random_m_A": "CALM with a random m_A", "encoder": "m_A as an encoder (context mode)",
                 "lora": "LoRA on m_B (rank matched to Θ_C)", "full_ft": "m_B fully fine-tuned on D_C (skyline)"}


def scale_of(task: KVArith) -> str:
    for name, cfg in SCALES.items():
        if {**cfg.to_dict(), "seed": 0} == {**task.cfg.to_dict(), "seed": 0}:
            return name
    return "cpu"


class Variant:
    """A model to train on D_C: its trainable parameters, a training forward and the object
    `generate` runs for evaluation."""

    def __init__(self, name: str, m_A: Decoder, m_B: Decoder, mapping, seed: int, device):
        import copy
        self.name, self.mode = name, "aligned"
        torch.manual_seed(seed)
        if name in ("calm", "random_m_A", "encoder"):
            aug = m_A
            if name == "random_m_A":
                aug = Decoder(m_A.cfg).to(device)  # same shape, random weights
            self.mode = "context" if name == "encoder" else "aligned"
            self.model = CALM(m_B, [aug], mapping=mapping, mode=self.mode).to(device)
            self.params = {f"bridges.{n}": p for n, p in self.model.bridges.named_parameters()}
        elif name == "lora":
            from .lora import add_lora, rank_for_budget
            budget = calm_param_count(m_A, m_B, mapping)
            self.model = copy.deepcopy(m_B)
            self.rank = rank_for_budget(self.model, budget)
            add_lora(self.model, self.rank)
            self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        elif name == "full_ft":
            self.model = copy.deepcopy(m_B)
            self.model.requires_grad_(True)
            self.params = dict(self.model.named_parameters())
        else:
            raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
        self.modules = [self.model]

    def logits(self, examples, tokens):
        if self.mode == "context":
            ctx, cmask = prompt_context(examples)
            return self.model(tokens, context=ctx.to(tokens.device), context_mask=cmask.to(tokens.device))
        if isinstance(self.model, CALM):
            return self.model(tokens)
        return self.model(tokens, validate=False)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.params.values())


def calm_param_count(m_A: Decoder, m_B: Decoder, mapping) -> int:
    probe = CALM(m_B, [m_A], mapping=mapping)
    return sum(p.numel() for p in probe.trainable_parameters())


def train_composition(task: KVArith, m_A: Decoder, m_B: Decoder, variant: str = "calm",
                      dc: str = "kv_arithmetic", tcfg: TrainConfig | None = None, mapping=None,
                      out_dir=None, device=None, log=print, literal_fraction: float | None = None) -> Variant:
    """Train one variant on D_C = `dc` over held-in keys. literal_fraction (kv_arithmetic):
    the share of operands written as numbers instead of keys (None: DC_LITERAL_FRACTION)."""
    if dc not in ("kv_arithmetic", "kv_substitution"):
        raise ValueError(f"D_C must be 'kv_arithmetic' or 'kv_substitution', got {dc!r}")
    device = pick_device(device)
    tcfg = tcfg or TrainConfig(**COMPOSE_TRAIN[scale_of(task)])
    v = Variant(variant, m_A, m_B, mapping, tcfg.seed, device)
    literal_fraction = dc_literal_fraction(dc, literal_fraction)

    def step_loss(step, micro):
        ex = task.sample(dc, "held_in", tcfg.batch_size, f"dc-{tcfg.seed}-{step}-{micro}", literal_fraction)
        tokens, mask, _ = collate(ex, task.tok.pad_id)
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast_ctx(tcfg.bf16, device):
            logits = v.logits(ex, tokens)
        return answer_loss(logits, tokens, mask), tokens.numel()

    if tcfg.compile:
        step_loss = _compiled(step_loss)

    def ev(step):
        return {"kv_arithmetic_held_out": evaluate(v.model, task, "kv_arithmetic", "held_out", tcfg.eval_samples,
                                                   seed=f"dev-{step}", mode=v.mode)}

    t0 = time.perf_counter()
    fit(v.params, step_loss, tcfg, out_dir, ev, desc=f"{variant} [{dc}] seed {tcfg.seed}", modules=v.modules)
    v.train_seconds = time.perf_counter() - t0
    log(f"{VARIANT_NAMES[variant]} on D_C={dc}, seed {tcfg.seed}: {v.n_params():,} trained parameters, "
        f"{v.train_seconds:.0f} s")
    return v


def evaluate_row(model, task: KVArith, n: int, mode: str = "aligned", seed: int = 777) -> dict[str, float]:
    """The table's three rows: KV-Substitution and KV-Arithmetic on held-out keys,
    Numeric-Arithmetic on the keys' value range ([1, n_values], or [1, N_KV] with unique values)."""
    return {"kv_substitution": evaluate(model, task, "kv_substitution", "held_out", n, seed, mode=mode),
            "numeric_arithmetic": evaluate(model, task, "numeric_arithmetic", "all", n, seed, mode=mode),
            "kv_arithmetic": evaluate(model, task, "kv_arithmetic", "held_out", n, seed, mode=mode)}


# ---- the demo ---------------------------------------------------------------------------------
def _mean_std(xs):
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def run_demo(*, bases=ASSETS, train_bases_first: bool = False, scale: str = "cpu", seeds=(0,),
             ablations: bool = False, dcs=("kv_arithmetic",), steps: int | None = None,
             literal_fraction: float | None = None,
             eval_samples: int = 500, out=RESULTS, runs="runs/kv_arith", device=None, base_seed: int = 0,
             log=print, progress: bool = True, command: str = "") -> dict:
    t_start = time.perf_counter()
    device = pick_device(device)
    if train_bases_first:
        bases = Path(runs) / "bases"
        log(f"training the base models from scratch into {bases} (scale {scale})")
        train_bases(scale, bases, seed=base_seed, device=device, progress=progress, resume=False)
    task, m_A, m_B = load_bases(bases, device)
    scale = scale_of(task)
    mapping = MAPPINGS[scale]
    tcfg_base = {**COMPOSE_TRAIN[scale], "progress": progress}
    if steps is not None:
        tcfg_base["steps"] = steps
    log(f"task: {task.cfg.to_dict()}; {len(task.held_in)} held-in / {len(task.held_out)} held-out keys")
    log(f"m_A {sum(p.numel() for p in m_A.parameters()):,} params, m_B {sum(p.numel() for p in m_B.parameters()):,} "
        f"params; mapping (m_A layer, m_B layer) = {mapping}")
    t0 = time.perf_counter()
    base_rows = {"m_A": evaluate_row(m_A, task, eval_samples), "m_B": evaluate_row(m_B, task, eval_samples)}
    log(f"bases evaluated in {time.perf_counter() - t0:.0f} s: {base_rows}")
    result = {"paper": PAPER_TABLE, "seeds": list(seeds), "per_seed": {}, "dc": {}, "ablations": {},
              "curves": {}, "timing": {}}
    for dc in dcs:
        per_seed = {}
        for seed in seeds:
            tcfg = TrainConfig(**{**tcfg_base, "seed": seed})
            run_dir = Path(runs) / f"calm_{dc}_seed{seed}"
            v = train_composition(task, m_A, m_B, "calm", dc, tcfg, mapping, run_dir, device, log,
                                  literal_fraction if dc == "kv_arithmetic" else None)
            v.model.save_bridges(run_dir / "bridges")
            t0 = time.perf_counter()
            per_seed[seed] = evaluate_row(v.model, task, eval_samples)
            log(f"  seed {seed}: {per_seed[seed]} (eval {time.perf_counter() - t0:.0f} s)")
            result["curves"][f"calm_{dc}_seed{seed}"] = _read_metrics(run_dir)
            result["timing"][f"calm_{dc}_seed{seed}_train_s"] = round(v.train_seconds, 1)
            result["theta_c_params"] = v.n_params()
        result["dc"][dc] = {"per_seed": per_seed,
                            "mean": {d: _mean_std([r[d] for r in per_seed.values()])[0] for d in DATASETS},
                            "std": {d: _mean_std([r[d] for r in per_seed.values()])[1] for d in DATASETS}}
    main_dc = dcs[0]
    result["per_seed"] = result["dc"][main_dc]["per_seed"]
    result["table"] = {d: {"m_A": base_rows["m_A"][d], "m_B": base_rows["m_B"][d],
                           "calm": result["dc"][main_dc]["mean"][d]} for d in DATASETS}
    result["table_std"] = {d: {"calm": result["dc"][main_dc]["std"][d]} for d in DATASETS}
    if ablations:
        for name in VARIANTS[1:]:
            result["ablations"][name], result["curves"][name] = run_ablation(
                name, task, m_A, m_B, main_dc, TrainConfig(**{**tcfg_base, "seed": seeds[0]}), mapping,
                Path(runs) / f"{name}_{main_dc}_seed{seeds[0]}", device, log,
                literal_fraction if main_dc == "kv_arithmetic" else None, eval_samples)
    result["config"] = {"task": task.cfg.to_dict(), "scale": scale, "bases": str(bases),
                        "m_A": m_A.cfg.to_dict(), "m_B": m_B.cfg.to_dict(), "mapping": mapping, "mode": "aligned",
                        "compose_train": tcfg_base, "d_c": list(dcs), "eval_samples": eval_samples,
                        "d_c_literal_fraction": dc_literal_fraction("kv_arithmetic", literal_fraction),
                        "eval": "exact match, greedy cached generation; KV rows on held-out keys only",
                        "device": str(device), "threads": torch.get_num_threads(), "command": command,
                        "machine": f"{platform.machine()} {platform.processor()} python {platform.python_version()} "
                                   f"torch {torch.__version__}"}
    result["bases_params"] = {"m_A": sum(p.numel() for p in m_A.parameters()),
                              "m_B": sum(p.numel() for p in m_B.parameters())}
    result["timing"]["total_s"] = round(time.perf_counter() - t_start, 1)
    result["targets"] = check_targets(result)
    out = Path(out)
    checkpoint.save_json(out / "kv_arith.json", result)
    (out / "kv_arith.md").write_text(markdown_table(result))
    try:
        plot_curves(result, out / "kv_arith.png", bases)
    except ImportError:
        log("matplotlib is not installed: no plot")
    log("\n" + markdown_table(result))
    return result


def run_ablation(name: str, task: KVArith, m_A: Decoder, m_B: Decoder, dc: str, tcfg: TrainConfig, mapping,
                 run_dir: Path, device, log, literal_fraction, eval_samples: int) -> tuple[dict, list[dict]]:
    """One row of the ablation table (paper Table 5) and its training curve."""
    v = train_composition(task, m_A, m_B, name, dc, tcfg, mapping, run_dir, device, log, literal_fraction)
    row = evaluate_row(v.model, task, eval_samples, v.mode)
    log(f"  {name}: {row}")
    return ({**row, "trained_params": v.n_params(), "train_s": round(v.train_seconds, 1),
             **({"lora_rank": v.rank} if name == "lora" else {})}, _read_metrics(run_dir))


def _read_metrics(run_dir) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines()] if p.is_file() else []


def check_targets(r: dict) -> dict:
    t = r["table"]
    kv, num = t["kv_arithmetic"], t["numeric_arithmetic"]
    out = {"m_A_kv_arith_le_5": kv["m_A"] <= 5, "m_B_kv_arith_le_5": kv["m_B"] <= 5,
           "calm_kv_arith_ge_84.3": kv["calm"] >= 84.3,
           "calm_kv_arith_ge_90pct_of_m_B_numeric": kv["calm"] >= 0.9 * num["m_B"],
           "calm_keeps_95pct_of_m_B_numeric": num["calm"] >= 0.95 * num["m_B"],
           "m_B_numeric_ge_90": num["m_B"] >= 90, "m_A_kv_sub_ge_95": t["kv_substitution"]["m_A"] >= 95}
    if r.get("ablations"):
        out["every_ablation_below_calm"] = all(a["kv_arithmetic"] < kv["calm"] for a in r["ablations"].values())
    return out


def _setup_line(r: dict) -> str:
    c = r["config"]
    lit = c.get("d_c_literal_fraction", 0.0)
    return (f"CALM: mapping (m_A block, m_B layer; -1 = embedding output) {[tuple(p) for p in c['mapping']]}, "
            f"{c['compose_train'].get('steps')} steps; D_C = {c['d_c'][0].replace('_', ' ')} over held-in keys"
            + (f", each operand written as its number with probability {lit}" if lit and c["d_c"][0] == "kv_arithmetic"
               else "") + ".")


def markdown_table(r: dict) -> str:
    """The paper's layout (rows: datasets; columns: m_A, m_B, CALM), paper's numbers beside."""
    t, p, s = r["table"], r["paper"], r.get("table_std", {})
    seeds = r.get("seeds", [])
    lines = [f"Key-value arithmetic, exact match % (ours: {r['config']['eval_samples']} examples per cell; "
             f"CALM = mean ± std over seeds {seeds}; paper = Table 1 of CALM, ICLR 2024)", "",
             _setup_line(r), "",
             "| dataset | m_A | m_B | CALM | paper m_A | paper m_B | paper CALM |", "|---|---|---|---|---|---|---|"]
    for d in DATASETS:
        sd = s.get(d, {}).get("calm", 0.0)
        calm = f"{t[d]['calm']:.1f}" + (f" ± {sd:.1f}" if len(seeds) > 1 else "")
        lines.append(f"| {ROW_NAMES[d]} | {t[d]['m_A']:.1f} | {t[d]['m_B']:.1f} | **{calm}** | "
                     f"{p[d]['m_A']} | {p[d]['m_B']} | {p[d]['calm']} |")
    if r["config"].get("d_c_literal_fraction"):
        lines += ["", "Numeric-Arithmetic with this D_C: a share of D_C prompts are numeric expressions with their "
                      "answers, so most evaluation prompts of that row were trained on; it shows that the composition "
                      "leaves them intact, not retention on unseen prompts (docs/kv_arith.md, \"Forgetting\")."]
    if r.get("reruns"):
        lines += ["", "Re-run with later code (scripts/rerun_ablation.py; the JSON keeps the rows before): " +
                  ", ".join(f"{x['variant']} ({x['date']})" for x in r["reruns"]) + "."]
    if "kv_substitution" in r.get("dc", {}) and len(r["dc"]) > 1:
        m = r["dc"]["kv_substitution"]["mean"]
        lines += ["", f"D_C = KV-Substitution over held-in keys (paper §4.1) instead: CALM "
                      f"KV-Substitution {m['kv_substitution']:.1f}, Numeric-Arithmetic {m['numeric_arithmetic']:.1f}, "
                      f"KV-Arithmetic {m['kv_arithmetic']:.1f}."]
    if r.get("ablations"):
        lines += ["", "Ablations (paper Table 5; same D_C, same number of added parameters except the skyline):", "",
                  "| model | trained params | KV-Substitution | Numeric-Arithmetic | KV-Arithmetic (held-out) |",
                  "|---|---|---|---|---|",
                  f"| CALM | {r.get('theta_c_params', 0):,} | {t['kv_substitution']['calm']:.1f} | "
                  f"{t['numeric_arithmetic']['calm']:.1f} | {t['kv_arithmetic']['calm']:.1f} |"]
        for name, a in r["ablations"].items():
            extra = f" (rank {a['lora_rank']})" if "lora_rank" in a else ""
            lines.append(f"| {VARIANT_NAMES[name]}{extra} | {a['trained_params']:,} | {a['kv_substitution']:.1f} | "
                         f"{a['numeric_arithmetic']:.1f} | {a['kv_arithmetic']:.1f} |")
    tg = r.get("targets", {})
    if tg:
        lines += ["", "Targets: " + ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in tg.items())]
    return "\n".join(lines) + "\n"


def plot_curves(r: dict, path, bases=None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    acc_ax = axes[0].twinx()
    acc_ax.set(ylim=(0, 102), ylabel="exact match % (dashed)")
    if bases is not None:
        for role in ("m_A", "m_B"):
            recs = _read_metrics(Path(bases) / f"{role}_run")
            xs = [x["step"] for x in recs if "loss" in x]
            axes[0].plot(xs, [x["loss"] for x in recs if "loss" in x], label=f"{role} ({BASE_DATA[role]})")
            ev = [x for x in recs if "eval" in x]
            if ev:
                acc_ax.plot([x["step"] for x in ev], [list(x["eval"].values())[0] for x in ev], "--",
                            color=axes[0].lines[-1].get_color(), alpha=0.7)
    axes[0].set(title="base models: training loss (dashed: exact match %)", xlabel="step", yscale="log")
    axes[0].legend()
    for name, recs in r.get("curves", {}).items():
        xs = [x["step"] for x in recs if "loss" in x]
        axes[1].plot(xs, [x["loss"] for x in recs if "loss" in x], label=name)
        ev = [x for x in recs if "eval" in x]
        axes[2].plot([x["step"] for x in ev], [x["eval"]["kv_arithmetic_held_out"] for x in ev], "o-", label=name)
    axes[1].set(title="composition: training loss on D_C (held-in keys)", xlabel="step", yscale="log")
    axes[2].set(title="KV-Arithmetic on held-out keys (dev), %", xlabel="step", ylim=(0, 100))
    axes[1].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
