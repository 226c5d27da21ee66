"""Prefill + incremental decode for a Decoder or a CALM: greedy, temperature, top-k, top-p,
EOS, batches of prompts of different lengths (left padding), streaming."""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from .composed import CALM
from .decoder import Decoder
from .validation import check_attention_mask, check_tokens, is_int


def _prompt_lists(prompt) -> list[list[int]]:
    """A list of ids (one prompt) or a list of such lists -> a list of lists."""
    if prompt and all(is_int(x) for x in prompt):
        return [list(prompt)]
    if all(isinstance(p, (list, tuple)) for p in prompt):
        return [list(p) for p in prompt]
    bad = next((p for p in prompt if not is_int(p) and not isinstance(p, (list, tuple))), None)
    if bad is not None:
        raise TypeError(f"token ids must be ints, got {bad!r} in the prompt")
    raise TypeError("prompt mixes token ids and lists: give a list of ids (one prompt) or a list of lists")


def left_pad(prompts: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of token-id lists -> (tokens (B, T), attention_mask (B, T) bool), left padded."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    if not is_int(pad_id):
        raise TypeError(f"pad_id must be an int token id, got {pad_id!r}")
    for i, p in enumerate(prompts):
        bad = [x for x in p if not is_int(x)]
        if bad:
            raise TypeError(f"token ids must be ints, got {bad[0]!r} in prompt {i}")
    t = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), t), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), t), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, t - len(p):] = True
    return tokens, mask


TOP_P_RTOL = 1e-6  # relative slack of the top-p boundary (same in export/ort_generate.py)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 = greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    # Shift the largest logit to 0 first: a tiny temperature then drives the others to -inf
    # instead of overflowing them all to +inf (inf - inf = NaN in the softmax).
    # The max stays exactly 0 even when the temperature underflows to 0 in float32.
    shifted = logits.float() - logits.float().max(dim=-1, keepdim=True).values
    logits = torch.where(shifted == 0, shifted, shifted / temperature)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:  # 1.0 keeps every token (a float cumsum reaches 1
        # before the tail does). Drop a token when the tokens ranked before it already hold
        # top_p of the mass, in float64 and within TOP_P_RTOL, so that rounding does not decide
        # an exact boundary (V equal logits, top_p = m/V keeps m) and the ONNX Runtime loop
        # (export/ort_generate.py) keeps the same tokens.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_logits.double(), dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p * (1 - TOP_P_RTOL)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_id, vocab_size):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if eos_id is not None and not is_int(eos_id):
        raise ValueError(f"eos_id must be an int token id or None, got {eos_id!r}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id {eos_id} is out of range for vocab_size={vocab_size}")


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    """Generation reads each row's next-token logits at the last column, so every row must end
    with a real token: pads only before the real tokens (left padding)."""
    m = attention_mask
    ok = bool(m[:, -1].all()) and bool((m[:, 1:] >= m[:, :-1]).all())
    if not ok:
        rows = [i for i in range(m.shape[0])
                if not bool(m[i, -1]) or not bool((m[i, 1:] >= m[i, :-1]).all())]
        raise ValueError(f"attention_mask row(s) {rows[:5]} are not left-padded: generation needs every "
                         f"row's pads before its real tokens and a real token last (got row {rows[0]}: "
                         f"{m[rows[0]].int().tolist()})")


class _DecoderSession:
    def __init__(self, model: Decoder, batch: int, max_len: int):
        self.model = model
        self.cache = model.setup_cache(batch, max_len)

    @torch.no_grad()
    def step(self, tokens, attention_mask, pos, validate=True):
        return self.model(tokens, attention_mask, cache=self.cache, pos=pos, validate=validate)


def stream(model, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, eos_id: int | None = None, attention_mask: torch.Tensor | None = None,
           context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
           generator: torch.Generator | None = None, pad_id: int = 0) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence, (B,), one step at a time. Rows that emitted
    `eos_id` keep emitting it; the stream ends when all rows are done or after max_new_tokens."""
    base = model.anchor if isinstance(model, CALM) else model
    if not isinstance(base, Decoder):
        raise TypeError(f"generate needs a Decoder or a CALM, got {type(model).__name__}")
    vocab = base.cfg.vocab_size
    if isinstance(prompt, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask is built from the prompt lists; pass it only with a tensor prompt")
        prompt, attention_mask = left_pad(_prompt_lists(prompt), pad_id, base.device)
    check_tokens(prompt, vocab, "prompt")
    attention_mask = check_attention_mask(attention_mask, prompt)
    if attention_mask is not None:
        _check_left_padded(attention_mask)
    _check_sampling(max_new_tokens, temperature, top_k, top_p, eos_id, vocab)
    b, t = prompt.shape
    max_len = t + max_new_tokens
    if max_len > base.cfg.max_seq_len:
        raise ValueError(f"prompt of {t} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"max_seq_len={base.cfg.max_seq_len}")
    if max_new_tokens == 0:
        return
    if isinstance(model, CALM):
        session = model.start_session(b, max_len, context=context, context_mask=context_mask)
    else:
        if context is not None:
            raise ValueError("context is only for a CALM in 'context' mode")
        session = _DecoderSession(model, b, max_len)
    done = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    logits = session.step(prompt, attention_mask, 0)[:, -1]
    pos = t
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            done |= nxt == eos_id
        yield nxt
        if i == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
            return
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, 1)], dim=1)
        logits = session.step(nxt[:, None], attention_mask, pos, validate=False)[:, -1]
        pos += 1


def generate(model, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, attention_mask: torch.Tensor | None = None,
             context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None, callback: Callable[[torch.Tensor], None] | None = None,
             pad_id: int = 0) -> torch.Tensor:
    """Prompt + generated ids, (B, T + N), N <= max_new_tokens (fewer when every row hit EOS).
    `prompt`: a (B, T) tensor (with `attention_mask` for left padding) or lists of ids."""
    base = model.anchor if isinstance(model, CALM) else model
    if isinstance(prompt, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask is built from the prompt lists; pass it only with a tensor prompt")
        prompt, attention_mask = left_pad(_prompt_lists(prompt), pad_id, getattr(base, "device", None))
    new = []
    for nxt in stream(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, attention_mask,
                      context, context_mask, generator, pad_id):
        if callback is not None:
            callback(nxt)
        new.append(nxt[:, None])
    return torch.cat([prompt, *new], dim=1)
