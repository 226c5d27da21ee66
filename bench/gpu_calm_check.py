"""End-to-end CALM on a GPU: the "auto" backends (CUDA/Triton kernels) against the reference
backend on the same model — decode tokens/s and greedy tokens first (the stage has run out of
time before reaching them), then logits, gradients and cached decoding in bf16 and fp32.
Prints one line per check; exits non-zero on a failed check."""
import sys
import time

import torch

import calm_fast as cf


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def build(dtype, mode="aligned"):
    torch.manual_seed(0)
    anchor = cf.Decoder(cf.DecoderConfig(arch="llama", vocab_size=512, dim=1024, n_layers=8, n_heads=8,
                                         n_kv_heads=4, max_seq_len=1024))
    aug = cf.Decoder(cf.DecoderConfig(arch="llama", vocab_size=512, dim=512, n_layers=8, n_heads=8,
                                      max_seq_len=1024))
    calm = cf.CALM(anchor, [aug], mode=mode)
    with torch.no_grad():
        for p in calm.trainable_parameters():
            p.normal_(0, 0.02)
    return calm.to("cuda", dtype).eval()


def generation_speed():
    """Decode tokens/s, reference vs auto backends (first: a stage cut short still reports it)."""
    calm = build(torch.bfloat16)
    prompt = torch.randint(0, 512, (1, 64), device="cuda")
    outs = {}
    for backend in ("reference", "auto"):
        calm.backend = backend
        cf.generate(calm, prompt, max_new_tokens=8)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs[backend] = cf.generate(calm, prompt, max_new_tokens=64)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"generate bf16 B=1 backend={backend:9s}: {64 / dt:7.1f} tokens/s (eager Python loop)",
              flush=True)
    agree = (outs["auto"] == outs["reference"]).float().mean().item()
    print(f"greedy tokens auto vs reference agree on {100 * agree:.1f}% of positions (bf16; ties may differ)",
          flush=True)


def main():
    ok = True
    print("device:", torch.cuda.get_device_name(), "backends:", cf.ops.available_backends("cuda", torch.bfloat16))
    generation_speed()
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-3)):
        calm = build(dtype)
        x = torch.randint(0, 512, (4, 300), device="cuda")
        mask = torch.ones_like(x, dtype=torch.bool)
        mask[1, :77] = False
        calm.backend = "reference"
        ref = calm(x, mask)
        ref_grads = torch.autograd.grad(ref.float().logsumexp(-1)[mask].mean(), calm.trainable_parameters())
        calm.backend = "auto"
        out = calm(x, mask)
        grads = torch.autograd.grad(out.float().logsumexp(-1)[mask].mean(), calm.trainable_parameters())
        e_fwd = rel(out[mask], ref[mask])
        e_grad = max(rel(g, r) for g, r in zip(grads, ref_grads))
        # cached decoding with the auto backends vs the reference full forward
        session = calm.start_session(4, 320)
        with torch.no_grad():
            steps = [session.step(x[:, :280], mask[:, :280], 0)]
            for p in range(280, 300):
                steps.append(session.step(x[:, p:p + 1], mask[:, :p + 1], p))
        cached = torch.cat(steps, 1)
        e_cache = rel(cached[mask], ref[mask].detach())
        line_ok = e_fwd < tol and e_grad < 10 * tol and e_cache < tol
        ok &= line_ok
        print(f"{str(dtype):15s} fwd {e_fwd:.2e}  grad {e_grad:.2e}  cached {e_cache:.2e}  (tol {tol:g}) "
              f"{'OK' if line_ok else 'FAIL'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
