"""Generate bench/README.md (and its plots, bench/peer/plots/*.png) from bench/results/*.json.

    cd /work/main && .venv/bin/python bench/make_readme.py

Reads peer.json, roofline_cpu.json and train_cpu.json; any that is missing is reported as not
run. The analysis paragraphs (ANALYSIS below) are written by hand after reading the results
and the profiles; every figure in the tables comes from the JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "bench/results"
PLOTS = ROOT / "bench/peer/plots"

TARGETS = {"train": 3.0, "generate": 30.0, "roofline": 0.60, "overhead": 1.10}

# What the peer computes differently (and what our side does to match it). Hand-written from
# reading CALM_pytorch/CALM.py 0.2.2 and x_transformers 2.31.10 in bench/peer/.venv.
DIFFERENCES = """\
| | calm_fast (ours) | CALM-pytorch 0.2.2 (peer) |
|---|---|---|
| base stacks | `cf.Decoder(arch="llama")`: RMSNorm, RoPE on the full head, SwiGLU (ffn 4·dim, no biases), untied head | x-transformers `TransformerWrapper(Decoder(use_rmsnorm, rotary_pos_emb, rotary_emb_dim=head_dim, ff_glu, ff_swish, ff_no_bias, attn_flash))`, no absolute positions. Same shapes; **its GLU input projection keeps a bias** (`ff_no_bias` only drops the output bias): +2·4·dim adds per token per block, negligible |
| cross-attention mask | **causal** (anchor position i sees augment positions ≤ i) | **not causal**: every anchor position sees every augment position, including future tokens (a teacher-forcing leak) |
| bridge arithmetic | `h + W_o·Attn(h W_q, P(h_A) W_k, P(h_A) W_v)` | the same plus an **RMSNorm on the query side** (`pre_rmsnorm=True`, its default) and **sigmoid gates on the value heads** (`gate_value_heads=True`, hard-wired): one extra norm and a `dim → heads` linear per bridge |
| augment model | runs without autograd up to its deepest tapped block, no LM head | runs without autograd through all its blocks **and its LM head** (discarded). Here the deepest tap is the last block, so only the 256 × 256 head is extra |
| training loss | `F.cross_entropy(calm(x[:, :-1]), x[:, 1:])`, `torch.optim.AdamW` | `calm(x, prompt=x[:, :-1])` (it shifts internally; the augment reads the same 256 tokens), same `torch.optim.AdamW`. Both back-propagate only from the first bridge up (frozen bases) |
| generation | `cf.generate(calm, prompt, 256, temperature=0)`: prefill, then one token per step through **every cache** (anchor KV, augment KV, bridge K/V); each new token goes to both models | `calm.generate(prompt, seq_len=320, filter_fn=argmax-only)`, its own API: the augment runs **once over the prompt only** (generated tokens never reach it), then the **anchor re-runs over the whole sequence for every new token** (no KV cache). Greedy via a filter that keeps only the argmax (its Gumbel sampler then picks it); its `top_k` filter cannot be used (it calls an unimported `ceil`) |
| bookkeeping | — | the anchor's block outputs are recorded by forward hooks into a list that `CALM.forward` never clears (`ExtractHiddensWrapper` built in `__init__`): **its RSS grows every step** (see the RSS trace below) |

So per generated token the peer does less augment work than we do (none) and far more anchor
work (a full forward over up to 320 positions instead of one cached position)."""

ANALYSIS_FILE = ROOT / "bench/peer/ANALYSIS.md"


def load(name):
    p = RES / name
    return json.loads(p.read_text()) if p.exists() else None


def f(x, nd=2):
    return "—" if x is None else f"{x:.{nd}f}"


def verdict(ok: bool, how: str) -> str:
    return ("**met**" if ok else "**missed**") + f" ({how})"


def _save(fig, name: str) -> str:
    """Write one figure into PLOTS and close it; returns its file name."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(PLOTS / name, dpi=90)
    plt.close(fig)
    return name


def plots(peer, roof, train) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    PLOTS.mkdir(parents=True, exist_ok=True)
    made = []
    if peer and "train_step" in peer:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for ax, key, title, unit in ((axes[0], "train_step", "training step", "s"),
                                     (axes[1], "generate", "256-token generation", "s")):
            if key not in peer:
                continue
            t = peer[key]
            ours, theirs = t["ours_s"], t["peer_s"]
            ax.bar(["calm_fast", "CALM-pytorch"], [ours["median"], theirs["median"]], color=["tab:blue", "tab:gray"],
                   yerr=[[ours["median"] - ours["min"], theirs["median"] - theirs["min"]],
                         [ours["max"] - ours["median"], theirs["max"] - theirs["median"]]], capsize=4)
            ax.set_title(f"{title}: {t['ratio_peer_over_ours']['median']:.1f}x")
            ax.set_ylabel(f"{unit} (median, min-max bars)")
        rss = peer["peak_rss_mb"]
        axes[2].bar(["calm_fast", "CALM-pytorch"], [rss["ours"], rss["peer"]], color=["tab:blue", "tab:gray"])
        axes[2].set_title("peak RSS (MiB)")
        made.append(_save(fig, "peer.png"))
    if roof:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        names = ["composed", "anchor", "augment"]
        ach = [roof["tokens_per_s"][n] for n in names]
        lim = [roof["roofline"][n]["roofline_tokens_per_s"] for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], lim, 0.4, label="roofline (copy bandwidth / bytes per token)", color="lightgray")
        ax.bar([i + 0.2 for i in x], ach, 0.4, label="measured", color="tab:blue")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        made.append(_save(fig, "roofline.png"))
    if train:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        names = list(train["tokens_per_s"])
        ax.bar(names, [train["tokens_per_s"][n] for n in names], color="tab:blue")
        if peer and "train_tokens_per_s" in peer:
            ax.axhline(peer["train_tokens_per_s"]["peer"], color="gray", ls="--", label="CALM-pytorch (peer.json)")
            ax.legend(fontsize=8)
        ax.set_ylabel("training tokens/s")
        made.append(_save(fig, "train.png"))
    return made


def peer_section(peer) -> list[str]:
    out = ["## 1. calm_fast vs CALM-pytorch (lucidrains), side by side", ""]
    if not peer:
        return out + ["_Not run: `bench/results/peer.json` is missing._", ""]
    cfg = peer["config"]
    out += [f"Command: `{peer['command']}` (after `bench/peer/setup_peer.sh`).", "",
            f"Reference configuration: anchor {cfg['anchor']['layers']} × {cfg['anchor']['dim']} "
            f"({cfg['anchor']['heads']} heads), augment {cfg['augment']['layers']} × {cfg['augment']['dim']} "
            f"({cfg['augment']['heads']} heads), vocab {cfg['vocab']}, bridges at anchor blocks "
            f"{[b for _, b in cfg['connections']]} reading augment blocks {[a for a, _ in cfg['connections']]} "
            f"(1-based), batch {cfg['batch']} × {cfg['seq']} tokens, fp32; generation: {cfg['new_tokens']} new "
            f"tokens after a {cfg['prompt']}-token prompt, batch 1, greedy. torch threads per process: "
            f"{cfg.get('threads') or 'torch default'}.", "",
            "Each (implementation, task) is its own process; the two processes of a task are timed in "
            "alternation (pair k runs ours first when k is even, the peer first when odd), and every pair "
            "gives a ratio. Training: each measurement is the median of "
            f"{cfg['train_steps_per_run']} steps after {cfg['warmup']} warm-up step(s).", "",
            "| task | calm_fast median [min, max] | CALM-pytorch median [min, max] | speed-up (peer / ours), per pair: median [min, max] | pairs | target |",
            "|---|---|---|---|---|---|"]
    for key, name, tgt in (("train_step", "training step (fwd + bwd + AdamW)", TARGETS["train"]),
                           ("generate", f"generate {cfg['new_tokens']} tokens", TARGETS["generate"])):
        if key not in peer:
            continue
        t = peer[key]
        o, p, r = t["ours_s"], t["peer_s"], t["ratio_peer_over_ours"]
        ok = r["median"] >= tgt
        out.append(f"| {name} | {o['median']:.3f} s [{o['min']:.3f}, {o['max']:.3f}] | {p['median']:.3f} s "
                   f"[{p['min']:.3f}, {p['max']:.3f}] | **{r['median']:.2f}×** [{r['min']:.2f}, {r['max']:.2f}] | "
                   f"{r['n']} | ≥ {tgt:g}×: " + verdict(ok, f"{r['median'] / tgt:.2f} of target") + " |")
    if "train_tokens_per_s" in peer:
        tp = peer["train_tokens_per_s"]
        out += ["", f"Training throughput: calm_fast {tp['ours']:.0f} tokens/s, CALM-pytorch {tp['peer']:.0f} tokens/s."]
    if "generate_tokens_per_s" in peer:
        g = peer["generate_tokens_per_s"]
        out += [f"Generation: calm_fast {g['ours']:.1f} tokens/s, CALM-pytorch {g['peer']:.2f} tokens/s (prefill included)."]
    out += ["", "Peak resident memory (ru_maxrss of each worker process; the process imports torch, builds both "
            "models, warms up and runs every measurement; a generation worker builds its models twice, once for a "
            "short warm-up generate, so both sides carry one extra copy of the weights, ~230 MiB):", "",
            "| task | calm_fast MiB | CALM-pytorch MiB | RSS right after `import torch` (ours / peer) | target |", "|---|---|---|---|---|"]
    for key in ("train_step", "generate"):
        if key in peer:
            m, b = peer[key]["peak_rss_mb"], peer[key]["rss_after_import_mb"]
            out.append(f"| {key} | {m['ours']:.0f} | {m['peer']:.0f} | {b['ours']:.0f} / {b['peer']:.0f} | lower: "
                       + verdict(m["ours"] < m["peer"], f"{m['ours'] / m['peer']:.2f} of the peer's") + " |")
    for key in ("train_step", "generate"):
        if key in peer:
            tr = peer[key]["rss_after_each_run_mb"]
            out.append("")
            out.append(f"RSS after each measurement, {key} (MiB): calm_fast {[round(x) for x in tr['ours']]}, "
                       f"CALM-pytorch {[round(x) for x in tr['peer']]}.")
    out += ["", "Per-pair times (s):", "", "| task | pair | order | calm_fast | CALM-pytorch | ratio |", "|---|---|---|---|---|---|"]
    for key in ("train_step", "generate"):
        if key in peer:
            for i, (pr, order) in enumerate(zip(peer[key]["pairs"], peer[key]["order"])):
                out.append(f"| {key} | {i} | {' then '.join(order)} | {pr['ours']:.3f} | {pr['peer']:.3f} | "
                           f"{pr['peer'] / pr['ours']:.2f} |")
    out += ["", "### Where the peer computes something different", "", DIFFERENCES, ""]
    return out


def roof_section(roof) -> list[str]:
    out = ["## 2. Decode against the memory-bandwidth roofline", ""]
    if not roof:
        return out + ["_Not run: `bench/results/roofline_cpu.json` is missing._", ""]
    bw, nb = roof["bandwidth"], roof["bytes_per_token"]
    out += [f"Command: `{roof['command']}`. torch threads: {roof['config']['threads']}; bridge backend: "
            f"`{roof['config']['backend']}`.", "",
            f"Bandwidth ({bw['buffer_mb']} MiB buffers, median of the runs): copy {bw['copy_gbs']:.1f} GB/s "
            f"(read + write counted; best {bw['copy_gbs_max']:.1f}), read-only reduction {bw['read_gbs']:.1f} GB/s "
            f"(best {bw['read_gbs_max']:.1f}). The roofline uses the copy figure, as the issue asks.", "",
            f"Bytes read per decode token at the mean decode position ({roof['mean_decode_position']:.1f} keys):", "",
            "| part | MB |", "|---|---|"]
    for k in ("anchor_weights", "augment_weights_to_deepest_tap", "bridge_weights", "anchor_kv", "augment_kv",
              "bridge_kv", "composed_total", "anchor_total", "augment_alone_total"):
        out.append(f"| {k} | {nb[k] / 1e6:.2f} |")
    out += ["", "| model | step ms (median [min, max]) | tokens/s | roofline tokens/s | fraction of roofline | "
            "fraction of read-only roofline | effective GB/s |", "|---|---|---|---|---|---|---|"]
    for k in ("composed", "anchor", "augment"):
        s, r = roof["step_s"][k], roof["roofline"][k]
        out.append(f"| {k} | {s['median'] * 1e3:.2f} [{s['min'] * 1e3:.2f}, {s['max'] * 1e3:.2f}] | "
                   f"{roof['tokens_per_s'][k]:.1f} | {r['roofline_tokens_per_s']:.1f} | "
                   f"**{r['fraction_of_roofline']:.2f}** | {r['fraction_of_read_roofline']:.2f} | {r['achieved_gbs']:.1f} |")
    fr, ov = roof["composed_fraction_of_roofline"], roof["composition_overhead"]
    out += ["", f"- Composed decode at **{fr:.0%}** of the roofline (target ≥ 60%): "
            + verdict(fr >= TARGETS["roofline"], f"{fr / TARGETS['roofline']:.2f} of target"),
            f"- Anchor alone at **{roof['anchor_fraction_of_roofline']:.0%}** of its roofline.",
            f"- Composition overhead, composed step / (anchor step + augment step), from the generation "
            f"times = **{ov:.3f}** (target ≤ 1.10): " + verdict(ov <= TARGETS["overhead"], f"{ov:.3f} vs 1.10"),
            *_single_step_lines(roof), "",
            "Profile of 32 composed decode tokens (torch.profiler, sorted by self CPU time):", "", "```",
            roof["profile_composed_generate32"].rstrip(), "```", ""]
    return out


def _single_step_lines(roof) -> list[str]:
    """The second overhead estimate (interleaved single cached steps), when the run has it."""
    if "composition_overhead_single_step" not in roof:
        return []
    s, ov = roof["single_step_s"], roof["composition_overhead_single_step"]
    ms = ", ".join(f"{k} {s[k]['median'] * 1e3:.2f} ms" for k in ("composed", "anchor", "augment"))
    return [f"- The same ratio from single cached decode steps at the mean position, the three models "
            f"interleaved step by step ({s['composed']['n']} rounds; medians {ms}) = **{ov:.3f}**: "
            + verdict(ov <= TARGETS["overhead"], f"{ov:.3f} vs 1.10")]


def train_section(train, peer) -> list[str]:
    out = ["## 3. Training throughput: eager vs torch.compile vs native kernels vs augment-state caching", ""]
    if not train:
        return out + ["_Not run: `bench/results/train_cpu.json` is missing._", ""]
    out += [f"Command: `{train['command']}`. torch threads: {train['config']['threads']}; "
            f"available backends: {train['available_backends']}.", "",
            "| variant | step s (median [min, max]) | tokens/s | vs eager | first step s (incl. compile) |",
            "|---|---|---|---|---|"]
    first = train.get("first_step_s (includes compilation)", {})
    for n, s in train["step_s"].items():
        out.append(f"| {n} | {s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}] | {train['tokens_per_s'][n]:.0f} | "
                   f"{train.get('speedup_vs_eager', {}).get(n, float('nan')):.2f}× | {first.get(n, float('nan')):.1f} |")
    for note in train.get("notes", []):
        out.append(f"\n_{note}_")
    if peer and "train_tokens_per_s" in peer:
        out += ["", f"For scale: CALM-pytorch trains at {peer['train_tokens_per_s']['peer']:.0f} tokens/s in "
                "peer.json (a separate run; compare ratios only within one run)."]
    key = next((k for k in train if k.startswith("profile_")), None)
    if key:
        out += ["", f"Profile of one {key[len('profile_'):-len('_step')]} step (torch.profiler, self CPU time):", "",
                "```", train[key].rstrip(), "```", ""]
    return out


def _la(x):
    return "?" if not x else ", ".join(f"{v:.1f}" for v in x)


def main():
    peer, roof, train = load("peer.json"), load("roofline_cpu.json"), load("train_cpu.json")
    made = plots(peer, roof, train)
    machine = (peer or {}).get("machine") or (roof or {}).get("machine") or {}
    versions = (peer or {}).get("versions", {})
    lines = ["# calm_fast benchmarks: vs CALM-pytorch, vs the hardware", "",
             "_Generated by `bench/make_readme.py` from `bench/results/*.json`; do not edit by hand._", "",
             "## Machine and versions", "",
             f"- CPU: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('mem_gib', '?')} GiB; "
             f"{machine.get('os', '')}",
             f"- Load average (1, 5, 15 min) at the start / end of the peer run: {_la(machine.get('loadavg_at_start'))} / "
             f"{_la(machine.get('loadavg_at_end'))} on 2 cores. **The machine was shared with other engineers' jobs during every "
             "run**; absolute times are inflated and noisy, which is why each comparison alternates its sides and "
             "reports per-pair ratios.",
             f"- calm_fast side: {json.dumps(versions.get('ours', {}))}",
             f"- peer side (bench/peer/.venv, pins in bench/peer/requirements-peer.txt): {json.dumps(versions.get('peer', {}))}",
             "", "## Reproduce", "", "```",
             "bench/peer/setup_peer.sh                       # the peer's venv, pinned",
             (peer or {}).get("command", "cd /work/main && .venv/bin/python bench/peer/bench_peer.py"),
             (roof or {}).get("command", "cd /work/main && PYTHONPATH=. .venv/bin/python bench/bench_roofline.py"),
             (train or {}).get("command", "cd /work/main && PYTHONPATH=. .venv/bin/python bench/bench_train.py"),
             "cd /work/main && .venv/bin/python bench/make_readme.py", "```", ""]
    lines += ["## Targets", "", "| target | result |", "|---|---|"]
    if peer and "train_step_speedup" in peer:
        s = peer["train_step_speedup"]
        lines.append(f"| training step ≥ 3× faster than CALM-pytorch | {s:.2f}× — "
                     + verdict(s >= 3, f"{s / 3:.2f} of target") + " |")
    if peer and "generate_speedup" in peer:
        s = peer["generate_speedup"]
        lines.append(f"| 256-token generation ≥ 30× faster | {s:.1f}× — " + verdict(s >= 30, f"{s / 30:.2f} of target") + " |")
    if peer:
        by = peer.get("peak_rss_mb_by_task", {})
        parts = [f"{t}: {m['ours']:.0f} vs {m['peer']:.0f} MiB" for t, m in by.items()]
        ok = all(m["ours"] < m["peer"] for m in by.values())
        worst = max(m["ours"] / m["peer"] for m in by.values())
        lines.append(f"| lower peak memory (ours vs peer) | {'; '.join(parts)} — "
                     + verdict(ok, f"at most {worst:.2f} of the peer's") + " |")
    if roof:
        fr, ov = roof["composed_fraction_of_roofline"], roof["composition_overhead"]
        lines.append(f"| composed decode ≥ 60% of the bandwidth roofline | {fr:.0%} — "
                     + verdict(fr >= 0.6, f"{fr / 0.6:.2f} of target") + " |")
        estimates = {"from generation times": ov,
                     "interleaved single steps": roof.get("composition_overhead_single_step")}
        for how, o in estimates.items():
            if o is not None:
                lines.append(f"| composition overhead ≤ 1.10 ({how}) | {o:.3f} — "
                             + verdict(o <= 1.10, f"{o:.3f} {'≤' if o <= 1.10 else '>'} 1.10") + " |")
    lines.append("")
    if ANALYSIS_FILE.exists():
        lines += ["## Analysis", "", ANALYSIS_FILE.read_text().strip(), ""]
    if made:
        lines += ["## Plots", ""] + [f"![{m}](peer/plots/{m})" for m in made] + [""]
    lines += peer_section(peer) + roof_section(roof) + train_section(train, peer)
    (ROOT / "bench/README.md").write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote bench/README.md ({len(lines)} lines), plots: {made}")


if __name__ == "__main__":
    main()
