"""One implementation, one task, in its own process (so peak RSS is its own).

Run by bench/peer/bench_peer.py, never by hand:
    <python> bench/peer/worker.py --impl ours|peer --task train|generate --config JSON
It builds the models, warms up, prints {"ready": ...}, then answers one JSON line per command
read from stdin: "run" -> {"times": [seconds, ...]}, "quit" -> {"peak_rss_mb": ...}.

ours = calm_fast (from the repository root, PYTHONPATH set by the driver);
peer = lucidrains' CALM-pytorch 0.2.2 on x-transformers (bench/peer/.venv).
Both are built as Llama-style stacks (RMSNorm, RoPE over the full head, SwiGLU with
ffn = 4 x dim, no q/k/v bias, untied LM head) so the two do the same arithmetic as far as
the two stacks allow; bench/README.md lists what still differs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # the peer's sampler draws a progress bar

import torch
import torch.nn.functional as F


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tokens(cfg, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab"], (batch, length), generator=g)


# ---------------------------------------------------------------- ours (calm_fast)
def build_ours(cfg, backend):
    import calm_fast as cf
    torch.manual_seed(0)

    def dec(d):
        return cf.Decoder(cf.DecoderConfig(arch="llama", vocab_size=cfg["vocab"], dim=d["dim"], n_layers=d["layers"],
                                           n_heads=d["heads"], n_kv_heads=d["heads"], ffn_dim=4 * d["dim"],
                                           max_seq_len=cfg["max_seq_len"]))
    anchor, aug = dec(cfg["anchor"]), dec(cfg["augment"])
    mapping = [(a - 1, b - 1) for a, b in cfg["connections"]]  # 1-based (peer) -> 0-based (ours)
    kw = {} if backend is None else {"backend": backend}
    return cf.CALM(anchor, [aug], mapping=mapping, mode="aligned", **kw)


def ours_train(cfg, backend=None):
    calm = build_ours(cfg, backend)
    calm.train()
    opt = torch.optim.AdamW(calm.trainable_parameters(), lr=1e-4)
    seq = tokens(cfg, cfg["batch"], cfg["seq"] + 1, 1234)
    inp, labels = seq[:, :-1], seq[:, 1:]

    def step():
        logits = calm(inp)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step, {"trainable_params": sum(p.numel() for p in calm.trainable_parameters()),
                  "token_checksum": int(seq.sum())}


def ours_generate(cfg, backend=None):
    import calm_fast as cf
    calm = build_ours(cfg, backend)
    calm.eval()
    prompt = tokens(cfg, 1, cfg["prompt"], 4321)

    def run():
        return cf.generate(calm, prompt, cfg["new_tokens"], temperature=0.0)
    return run, {"token_checksum": int(prompt.sum())}


# ---------------------------------------------------------------- peer (CALM-pytorch)
def build_peer(cfg):
    from x_transformers import Decoder, TransformerWrapper
    from CALM_pytorch import CALM, AugmentParams
    torch.manual_seed(0)

    def dec(d):
        hd = d["dim"] // d["heads"]
        return TransformerWrapper(
            num_tokens=cfg["vocab"], max_seq_len=cfg["max_seq_len"], use_abs_pos_emb=False,
            attn_layers=Decoder(dim=d["dim"], depth=d["layers"], heads=d["heads"], attn_dim_head=hd,
                                rotary_pos_emb=True, rotary_emb_dim=hd, use_rmsnorm=True,
                                ff_glu=True, ff_swish=True, ff_no_bias=True, attn_flash=True))
    anchor, aug = dec(cfg["anchor"]), dec(cfg["augment"])
    a = cfg["anchor"]
    calm = CALM(anchor_llm=anchor,
                augment_llms=AugmentParams(model=aug, connections=tuple(map(tuple, cfg["connections"]))),
                attn_kwargs=dict(linear_project_context=True, pre_rmsnorm=True, flash=True,
                                 heads=a["heads"], dim_head=a["dim"] // a["heads"]))
    return calm


def peer_train(cfg):
    calm = build_peer(cfg)
    opt = torch.optim.AdamW(calm.parameters(), lr=1e-4)
    seq = tokens(cfg, cfg["batch"], cfg["seq"] + 1, 1234)

    def step():
        # The peer shifts internally: anchor reads seq[:, :-1], labels are seq[:, 1:]; the
        # augment reads the same 256 tokens (prompt=seq[:, :-1]).
        loss = calm(seq, prompt=seq[:, :-1])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step, {"trainable_params": sum(p.numel() for p in calm.parameters()),
                  "token_checksum": int(seq.sum())}


def _greedy(logits):
    # The peer's generate always Gumbel-samples after a filter_fn; keeping only the argmax
    # makes that greedy (its top_k filter cannot be used: it calls an unimported ceil).
    return torch.full_like(logits, float("-inf")).scatter(1, logits.argmax(-1, keepdim=True), 0.0)


def peer_generate(cfg):
    calm = build_peer(cfg)
    prompt = tokens(cfg, 1, cfg["prompt"], 4321)

    def run():
        # The peer's own API: augment over the prompt once, then the anchor re-run over the
        # whole sequence for every new token (no KV cache).
        return calm.generate(prompt, seq_len=cfg["prompt"] + cfg["new_tokens"], filter_fn=_greedy, filter_kwargs={})
    return run, {"token_checksum": int(prompt.sum())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=("ours", "peer"), required=True)
    ap.add_argument("--task", choices=("train", "generate"), required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--backend", default=None)
    args = ap.parse_args()
    cfg = json.loads(args.config)
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    base_rss = current_rss_mb()
    if args.impl == "ours":
        fn, info = (ours_train if args.task == "train" else ours_generate)(cfg, args.backend)
    else:
        fn, info = (peer_train if args.task == "train" else peer_generate)(cfg)
    steps = cfg["train_steps_per_run"] if args.task == "train" else 1
    if args.task == "generate":
        warm = dict(cfg, new_tokens=cfg.get("gen_warmup_tokens", cfg["new_tokens"]))
        wfn, _ = (ours_generate(warm, args.backend) if args.impl == "ours" else peer_generate(warm))
        out = wfn()  # a short generate: every code path, none of the minutes
        del wfn
    for _ in range(cfg["warmup"] if args.task == "train" else 0):
        out = fn()
    if args.task == "generate":
        info["warmup_generated_len"] = int(out.shape[-1]) if isinstance(out, torch.Tensor) else sum(len(o) for o in out)
    import importlib.metadata as md
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for pkg in ("CALM-Pytorch", "x-transformers", "calm_fast"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    if args.impl == "ours":
        import calm_fast
        versions["calm_fast"] = calm_fast.__version__
    print(json.dumps({"ready": True, "rss_after_import_mb": base_rss, "threads": torch.get_num_threads(),
                      "versions": versions, **info}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            print(json.dumps({"times": times, "rss_mb": current_rss_mb()}), flush=True)
        elif cmd == "quit":
            print(json.dumps({"peak_rss_mb": rss_mb(), "rss_mb": current_rss_mb()}), flush=True)
            return


if __name__ == "__main__":
    main()
