"""ONNX Runtime vs PyTorch eager vs torch.compile: tokens/s of the composed model, one run.

    PYTHONPATH=. python bench/bench_onnx.py [--device cpu|cuda] [--batches 1 8] [--repeats 5]

Every engine generates greedily from the same prompts with all caches; decode tokens/s =
batch * (new tokens - 1) / time from the first to the last new token (prefill excluded),
e2e tokens/s = batch * new tokens / total time. Medians over --repeats after one warm-up.
Engines:
  eager     calm_fast.generate (CALMSession: static caches, the fastest `auto` ops backend)
  compiled  torch.compile(dynamic=True) of the exported step module (functional concat caches),
            driven by the same greedy loop
  ort       export/ort_generate.py on CPUExecutionProvider (--device cpu) or
            CUDAExecutionProvider (--device cuda; recorded as missing when this onnxruntime
            has no CUDA EP); with --attention standard mha, also ort_<device>_mha (the export with
            com.microsoft MultiHeadAttention)
JSON goes to bench/results/onnx_<device>.json. An engine whose greedy tokens differ from eager's
(same_tokens_as_eager false: its speed is not comparable) is also a WARNING on stderr and an entry
of the report's "warnings". Bad arguments are argparse errors (exit 2) before any work.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "export"))
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
from ort_generate import OrtGenerator  # noqa: E402

import importlib  # noqa: E402

import calm_fast as cf  # noqa: E402

# The module, not the function that calm_fast re-exports under the same name.
eo = importlib.import_module("calm_fast.onnx_export")
from calm_fast.generate import left_pad  # noqa: E402


MAX_SEQ_LEN = 512


def heads(dim: int) -> int:
    """Heads of 64 channels; a model narrower than 64 gets one head."""
    return max(1, dim // 64)


def kv_heads(dim: int) -> int:
    """The anchor's KV heads: one per 128 channels (GQA, 2 query heads per KV head)."""
    return max(1, dim // 128)


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Every argument the run would trip over later, as an argparse error (exit 2) before any
    export or timing."""
    for flag in ("anchor_dim", "augment_dim"):
        dim = getattr(args, flag)
        if dim <= 0 or dim % heads(dim):
            p.error(f"--{flag.replace('_', '-')} must be a positive multiple of its {heads(max(dim, 1))} heads "
                    f"of 64 channels (or below 64), got {dim}")
    h, kv = heads(args.anchor_dim), kv_heads(args.anchor_dim)
    if h % kv:
        p.error(f"--anchor-dim {args.anchor_dim} gives {h} heads of 64 channels and {kv} KV heads (one per "
                f"128 channels), and {h} is not divisible by {kv}: use a multiple of 128 (or below 128)")
    for flag in ("anchor_layers", "augment_layers", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be >= 2 (decode tokens/s times the steps after the first new token), "
                f"got {args.new_tokens}")
    if args.vocab < 2:
        p.error(f"--vocab must be >= 2 (prompt ids are drawn from 1..vocab-1), got {args.vocab}")
    bad = [b for b in args.batches if b < 1]
    if bad:
        p.error(f"--batches must all be >= 1, got {bad[0]}")
    # prompts_for shortens row i by i % 4 tokens: the shortest row must keep one token.
    shortest = args.prompt_len - min(max(args.batches) - 1, 3)
    if shortest < 1:
        p.error(f"--prompt-len {args.prompt_len} is too short for batch {max(args.batches)}: row i has "
                f"prompt-len - (i % 4) tokens, so it must be >= {min(max(args.batches), 4)}")
    if args.prompt_len + args.new_tokens > MAX_SEQ_LEN:
        p.error(f"--prompt-len + --new-tokens must be <= {MAX_SEQ_LEN} (the models' max_seq_len), got "
                f"{args.prompt_len} + {args.new_tokens}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")


def build_model(args) -> cf.CALM:
    torch.manual_seed(0)
    anchor = cf.Decoder(cf.DecoderConfig(arch="llama", vocab_size=args.vocab, dim=args.anchor_dim,
                                         n_layers=args.anchor_layers, n_heads=heads(args.anchor_dim),
                                         n_kv_heads=kv_heads(args.anchor_dim), max_seq_len=MAX_SEQ_LEN))
    augment = cf.Decoder(cf.DecoderConfig(arch="llama", vocab_size=args.vocab, dim=args.augment_dim,
                                          n_layers=args.augment_layers, n_heads=heads(args.augment_dim),
                                          max_seq_len=MAX_SEQ_LEN))
    calm = cf.CALM(anchor, [augment], mode="aligned")
    for p in calm.trainable_parameters():
        torch.nn.init.normal_(p, std=0.02)  # non-zero W_o: the bridges really contribute
    return calm.eval()


def prompts_for(batch: int, length: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    # Different lengths per row: the padded path is the one deployments run.
    return [torch.randint(1, vocab, (length - (i % 4),), generator=g).tolist() for i in range(batch)]


def timed_stream(it, sync=lambda: None):
    """Consume a token stream; returns (seconds to first token, seconds from first to last, ids)."""
    t0 = time.perf_counter()
    first = last = None
    out = []
    for nxt in it:
        sync()
        last = time.perf_counter()
        first = first or last
        out.append(nxt)
    return first - t0, last - first, out


def eager_stream(calm, prompts, n, device):
    ids, mask = left_pad(prompts, device=device)
    return cf.stream(calm, ids, max_new_tokens=n, attention_mask=mask)


@torch.no_grad()
def compiled_stream(step, specs, prompts, n, device, dtype):
    """Greedy loop over the functional step module (what the ONNX graph computes)."""
    ids, mask = left_pad(prompts, device=device)
    mask = mask.long()
    b = ids.shape[0]
    past = [torch.zeros([b if d == "batch" else 0 if d == "past" else d for d in s["shape"]],
                        dtype=dtype, device=device) for s in specs if s["role"] == "past"]
    out = step(ids, mask, *past)
    for i in range(n):
        nxt = out[0][:, -1].argmax(-1)
        yield nxt
        if i == n - 1:
            return
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        out = step(nxt[:, None], mask, *out[1:])


def measure(name, make_stream, repeats, batch, n, sync):
    timed_stream(make_stream(), sync)  # warm-up (and compilation)
    ttft, decode, ids = [], [], None
    for _ in range(repeats):
        a, d, toks = timed_stream(make_stream(), sync)
        ttft.append(a)
        decode.append(d)
        ids = toks
    med_decode, med_ttft = statistics.median(decode), statistics.median(ttft)
    return {"engine": name, "batch": batch, "new_tokens": n,
            "decode_tokens_per_s": batch * (n - 1) / med_decode,
            "e2e_tokens_per_s": batch * n / (med_ttft + med_decode),
            "prefill_s": med_ttft, "decode_s": med_decode, "repeats": repeats,
            "_ids": [[int(x) for x in t.tolist()] for t in ids]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--anchor-dim", type=int, default=512)
    p.add_argument("--anchor-layers", type=int, default=8)
    p.add_argument("--augment-dim", type=int, default=256)
    p.add_argument("--augment-layers", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads")
    p.add_argument("--attention", choices=eo.ATTENTION_IMPLS, nargs="+", default=["standard"],
                   help="ONNX attention form(s); each is exported and timed as its own ORT engine")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile (its CPU build takes minutes per batch size on 2 cores)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    check_args(p, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    calm = build_model(args)
    results, notes, warnings = [], [], []
    provider = "cuda" if args.device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        gens = {}  # engine name -> OrtGenerator, one per exported attention form
        for attention in args.attention:
            name = f"ort_{provider}" + ("" if attention == "standard" else f"_{attention}")
            out_dir = Path(tmp) / attention
            eo.export_onnx(calm, out_dir, attention=attention)
            try:
                gens[name] = OrtGenerator(out_dir, provider, threads=args.threads)
            except ValueError as e:
                notes.append(f"{name}: {e}")
                print(f"{name} skipped: {e}", file=sys.stderr)
        calm.to(device)
        specs = eo._io_spec(calm.anchor, calm, "float32")[0]
        step = eo._Step(calm.anchor, calm, "standard", torch.float32).to(device).eval()
        compiled = None if args.no_compile else torch.compile(step, dynamic=True)
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        for batch in args.batches:
            prompts = prompts_for(batch, args.prompt_len, args.vocab)
            n = args.new_tokens
            engines = [("eager", lambda: eager_stream(calm, prompts, n, device))]
            if compiled is not None:
                engines.append(("compiled", lambda: compiled_stream(compiled, specs, prompts, n, device,
                                                                   torch.float32)))
            for name, gen in gens.items():
                engines.append((name, lambda gen=gen: gen.stream(prompts, n)))
            row = {}
            for name, make in engines:
                r = measure(name, make, args.repeats, batch, n, sync)
                row[name] = r
                print(f"batch {batch:2d} {name:10s} decode {r['decode_tokens_per_s']:9.1f} tok/s   "
                      f"e2e {r['e2e_tokens_per_s']:9.1f} tok/s", flush=True)
            ref = row["eager"]["_ids"]
            for name, r in row.items():
                r["same_tokens_as_eager"] = r.pop("_ids") == ref
                if not r["same_tokens_as_eager"]:
                    # Its speed is not comparable: it did not compute what eager did.
                    msg = (f"batch {batch} {name}: greedy tokens differ from eager's "
                           f"(same_tokens_as_eager is False)")
                    warnings.append(msg)
                    print(f"WARNING: {msg}", file=sys.stderr, flush=True)
                results.append(r)
            for name in gens:
                for base in ("eager", "compiled"):
                    if base in row:
                        row[name][f"speedup_vs_{base}"] = (row[name]["decode_tokens_per_s"]
                                                           / row[base]["decode_tokens_per_s"])
    report = {
        "bench": "onnx", "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__, "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(), "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "ops_backends": cf.ops.available_backends(device), "results": results, "notes": notes,
        "warnings": warnings,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"onnx_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
