"""Composed decode against the machine's memory-bandwidth roofline.

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/bench_roofline.py [--repeats 5] [--threads N]

At batch 1 a decode step is a chain of matrix-vector products: every weight it touches and
every cache row it attends over is read once from memory, so tokens/s can be no better than
bandwidth / bytes-read-per-token. We measure
  * bandwidth: a large copy (read + write, counted as 2x the buffer) and a large reduction
    (read only), both well beyond the last-level cache;
  * decode step time (public API: cf.generate(model, prompt, N) - cf.generate(model, prompt, 1),
    so the prefill is not counted) of the composed model, the anchor alone and the augment
    alone, interleaved (composed, anchor, augment, composed, ...) so load hits them alike;
  * bytes per token: anchor weights (all blocks, final norm, LM head, one embedding row) +
    augment weights up to its deepest tapped block (no LM head) + the bridges' folded decode
    weights (W_q, [W_k W_p; W_v W_p], b_kv, W_o) + every KV row read (anchor, augment, bridge
    caches) at the mean decode position.
Reports the fraction of the roofline reached, and composition overhead = composed step /
(anchor step + augment step), measured twice: from the generation times above, and from
single cached decode steps at the mean decode position, the three models interleaved step by
step for --step-rounds rounds (each session prefilled once; no generation loop, sampling or
prompt handling in the timed region; each model reads its weights from memory as in
generation, since the three together are far larger than the cache). Also saves a
torch.profiler table of composed decode steps. Writes bench/results/roofline_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import calm_fast as cf  # noqa: E402

REF = {"vocab": 256, "max_seq_len": 512, "anchor": (12, 512, 8), "augment": (6, 256, 4),
       "mapping": [(1, 2), (2, 5), (4, 8), (5, 11)], "prompt": 64, "new_tokens": 256}


def decoder(layers, dim, heads, vocab, max_len):
    return cf.Decoder(cf.DecoderConfig(arch="llama", vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads,
                                       n_kv_heads=heads, ffn_dim=4 * dim, max_seq_len=max_len))


def bandwidth(size_mb: int, repeats: int) -> dict:
    n = size_mb * 2**20 // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy, read = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        copy.append(2 * n * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        src.sum()
        read.append(n * 4 / (time.perf_counter() - t) / 1e9)
    return {"buffer_mb": size_mb, "copy_gbs": statistics.median(copy), "copy_gbs_max": max(copy),
            "read_gbs": statistics.median(read), "read_gbs_max": max(read)}


def block_weight_bytes(dec: cf.Decoder, upto: int) -> int:
    return sum(p.numel() * p.element_size() for i in range(upto + 1) for p in dec.layers[i].parameters())


def bytes_per_token(calm: cf.CALM, mean_pos: float) -> dict:
    a, g = calm.anchor, calm.augments[0]
    f = 4
    deepest = max(x for x, _ in calm.mappings[0])
    anchor_w = block_weight_bytes(a, a.cfg.n_layers - 1) + a.norm.weight.numel() * f + \
        a.lm_head.weight.numel() * f + a.cfg.dim * f
    aug_w = block_weight_bytes(g, deepest) + g.cfg.dim * f
    db, da = a.cfg.dim, g.cfg.dim
    bridge_w = len(calm.mappings[0]) * (db * db * 2 + 2 * db * da + 2 * db) * f
    anchor_kv = a.cfg.n_layers * 2 * a.cfg.n_kv_heads * a.cfg.head_dim * mean_pos * f
    aug_kv = (deepest + 1) * 2 * g.cfg.n_kv_heads * g.cfg.head_dim * mean_pos * f
    bridge_kv = len(calm.mappings[0]) * 2 * db * mean_pos * f
    aug_full_w = block_weight_bytes(g, g.cfg.n_layers - 1) + g.norm.weight.numel() * f + \
        g.lm_head.weight.numel() * f + g.cfg.dim * f
    aug_full_kv = g.cfg.n_layers * 2 * g.cfg.n_kv_heads * g.cfg.head_dim * mean_pos * f
    return {"anchor_weights": anchor_w, "augment_weights_to_deepest_tap": aug_w, "bridge_weights": bridge_w,
            "anchor_kv": anchor_kv, "augment_kv": aug_kv, "bridge_kv": bridge_kv,
            "composed_total": anchor_w + aug_w + bridge_w + anchor_kv + aug_kv + bridge_kv,
            "anchor_total": anchor_w + anchor_kv, "augment_alone_total": aug_full_w + aug_full_kv}


def gen_time(model, prompt, n):
    t = time.perf_counter()
    cf.generate(model, prompt, n, temperature=0.0)
    return time.perf_counter() - t


@torch.inference_mode()
def single_step_times(models: dict, prompt_len: int, vocab: int, rounds: int) -> dict:
    """Median seconds of one cached decode step at position `prompt_len`, per model, the
    models interleaved (order reversed every other round)."""
    g = torch.Generator().manual_seed(99)
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    tok = torch.randint(0, vocab, (1, 1), generator=g)
    steps = {}
    for name, m in models.items():
        if isinstance(m, cf.CALM):
            session = m.start_session(1, prompt_len + 1)
            session.step(prompt, None, 0)
            steps[name] = lambda s=session: s.step(tok, None, prompt_len, validate=False)
        else:
            cache = m.setup_cache(1, prompt_len + 1)
            m(prompt, None, cache=cache, pos=0)
            steps[name] = lambda m=m, c=cache: m(tok, None, cache=c, pos=prompt_len, validate=False)
    times = {k: [] for k in steps}
    for r in range(rounds + 3):  # the first 3 rounds warm up
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            t = time.perf_counter()
            steps[name]()
            if r >= 3:
                times[name].append(time.perf_counter() - t)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} for k, v in times.items()}


def check_args(ap: argparse.ArgumentParser, args) -> None:
    """Every argument the run would trip over later (a ZeroDivisionError or an empty median
    after the generation timings, a prompt-length error, an unknown backend at the first
    call), as an argparse error (exit 2) before any model is built."""
    for flag in ("repeats", "bw_mb", "step_rounds"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.threads < 0:
        ap.error(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    if args.new_tokens < 2:
        ap.error(f"--new-tokens must be >= 2 (a step is (time of N tokens - time of 1) / (N - 1)), "
                 f"got {args.new_tokens}")
    room = REF["max_seq_len"] - REF["prompt"]
    if args.new_tokens > room:
        ap.error(f"--new-tokens must be <= {room} (the {REF['prompt']}-token prompt plus the new tokens must "
                 f"fit max_seq_len {REF['max_seq_len']}), got {args.new_tokens}")
    here = cf.ops.available_backends("cpu")
    if args.backend != "auto" and args.backend not in here:
        ap.error(f"--backend must be auto or one available on the CPU ({', '.join(here)}), got {args.backend!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--bw-mb", type=int, default=1024, help="bandwidth buffer size, MiB")
    ap.add_argument("--new-tokens", type=int, default=REF["new_tokens"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--step-rounds", type=int, default=60, help="rounds of the single-step overhead measurement")
    ap.add_argument("--out", default=str(ROOT / "bench/results/roofline_cpu.json"))
    args = ap.parse_args(argv)
    check_args(ap, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    v, ml = REF["vocab"], REF["max_seq_len"]
    anchor, aug = decoder(*REF["anchor"], v, ml), decoder(*REF["augment"], v, ml)
    calm = cf.CALM(anchor, [aug], mapping=REF["mapping"], backend=args.backend).eval()
    # a trained-looking bridge (W_o = 0 at init would still be read; make the numbers non-trivial)
    with torch.no_grad():
        for b in calm.bridges[0]:
            b.wo.weight.normal_(std=0.02)
    prompt = torch.randint(0, v, (1, REF["prompt"]), generator=torch.Generator().manual_seed(4321))
    n = args.new_tokens
    models = {"composed": calm, "anchor": anchor, "augment": aug}
    for m in models.values():  # warm-up
        gen_time(m, prompt, 8)
    bw_runs, steps = [], {k: [] for k in models}
    for r in range(args.repeats):
        bw_runs.append(bandwidth(args.bw_mb, 3))
        order = list(models) if r % 2 == 0 else list(models)[::-1]
        for k in order:
            full = gen_time(models[k], prompt, n)
            pre = gen_time(models[k], prompt, 1)
            steps[k].append((full - pre) / (n - 1))
        print(f"repeat {r}: " + "  ".join(f"{k} {steps[k][-1] * 1e3:.2f} ms" for k in models)
              + f"  copy {bw_runs[-1]['copy_gbs']:.1f} GB/s", file=sys.stderr, flush=True)
    bw = {key: statistics.median(b[key] for b in bw_runs) for key in ("copy_gbs", "read_gbs")}
    bw["copy_gbs_max"] = max(b["copy_gbs_max"] for b in bw_runs)
    bw["read_gbs_max"] = max(b["read_gbs_max"] for b in bw_runs)
    bw["buffer_mb"] = args.bw_mb
    # keys attended by the mean timed step: the n - 1 steps after the prefill's token attend
    # prompt + 1 ... prompt + n - 1 keys, prompt + n/2 on average (was + 1/2 too high, 0.015%)
    mean_pos = REF["prompt"] + n / 2
    nbytes = bytes_per_token(calm, mean_pos)
    med = {k: statistics.median(s) for k, s in steps.items()}
    res = {"command": "cd /work/main && PYTHONPATH=. .venv/bin/python bench/bench_roofline.py " + " ".join(sys.argv[1:]),
           "config": {**REF, "threads": torch.get_num_threads(), "backend": args.backend},
           "machine": {"cpu": platform.processor() or _cpu(), "cores": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
           "versions": {"torch": torch.__version__, "calm_fast": cf.__version__, "python": sys.version.split()[0]},
           "bandwidth": bw, "bytes_per_token": nbytes, "mean_decode_position": mean_pos,
           "step_s": {k: {"median": med[k], "min": min(s), "max": max(s), "values": s} for k, s in steps.items()},
           "tokens_per_s": {k: 1 / med[k] for k in med}}
    roof = {}
    for k, key in (("composed", "composed_total"), ("anchor", "anchor_total"), ("augment", "augment_alone_total")):
        roof[k] = {"roofline_tokens_per_s": bw["copy_gbs"] * 1e9 / nbytes[key],
                   "fraction_of_roofline": (1 / med[k]) / (bw["copy_gbs"] * 1e9 / nbytes[key]),
                   "fraction_of_read_roofline": (1 / med[k]) / (bw["read_gbs"] * 1e9 / nbytes[key]),
                   "achieved_gbs": nbytes[key] / med[k] / 1e9}
    res["roofline"] = roof
    res["composed_fraction_of_roofline"] = roof["composed"]["fraction_of_roofline"]
    res["anchor_fraction_of_roofline"] = roof["anchor"]["fraction_of_roofline"]
    res["composition_overhead"] = med["composed"] / (med["anchor"] + med["augment"])
    single = single_step_times(models, int(mean_pos), v, args.step_rounds)
    res["single_step_s"] = single
    res["composition_overhead_single_step"] = single["composed"]["median"] / (
        single["anchor"]["median"] + single["augment"]["median"])
    # where a composed decode step's time goes
    from torch.profiler import ProfilerActivity, profile, record_function
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("generate_32_tokens"):
            cf.generate(calm, prompt, 32, temperature=0.0)
    res["profile_composed_generate32"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(res["profile_composed_generate32"], file=sys.stderr)
    print(json.dumps({k: res[k] for k in ("tokens_per_s", "composed_fraction_of_roofline",
                                          "anchor_fraction_of_roofline", "composition_overhead",
                                          "composition_overhead_single_step")}, indent=2))


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
