"""Generate with a calm_fast ONNX export on ONNX Runtime. Needs onnxruntime and numpy only:
no torch, no calm_fast (deployments ship this file and the export directory).

As a module:
    gen = OrtGenerator("out_dir", provider="cpu")        # or "cuda" (onnxruntime-gpu)
    ids = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=16)          # greedy, batched
    for nxt in gen.stream([[1, 2, 3]], max_new_tokens=16, temperature=0.8, seed=0): ...
    logits, state = gen.prefill(input_ids, attention_mask); logits, state = gen.step(ids, state)

As a script:
    python export/ort_generate.py OUT_DIR --prompt 1,2,3 --max-new-tokens 16 \
        [--provider cpu|cuda] [--temperature T] [--top-k K] [--top-p P] [--seed S] \
        [--eos-id E] [--context 7,8,9] [--stream]
prints the whole sequence (prompt + new tokens) as a JSON list of ids on its last line.

Caches stay in ONNX Runtime's memory between steps (IO binding): on CUDA they never leave the
device; only the logits come back to the host for sampling.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort

FORMAT = "calm_fast.onnx/1"
MANIFEST = "calm_onnx.json"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
TOP_P_RTOL = 1e-6  # relative slack of the top-p boundary (calm_fast.generate.TOP_P_RTOL)
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64}
EXPORT_ID_KEY = "calm_fast.export_id"  # in every graph's metadata_props; the manifest's export_id
_ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}


class ExportDirError(ValueError):
    """The export directory is missing, incomplete or inconsistent."""


def _load_manifest(export_dir: Path) -> dict:
    if not export_dir.is_dir():
        raise ExportDirError(f"{export_dir}: not a directory (expected a calm_fast ONNX export)")
    path = export_dir / MANIFEST
    if not path.is_file():
        hint = ("; model.onnx is there without it: an export that was interrupted or is still "
                "being written, export again" if (export_dir / "model.onnx").exists() else "")
        raise ExportDirError(f"{export_dir}: not a calm_fast ONNX export (missing {MANIFEST}){hint}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportDirError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ExportDirError(f"{path}: format {got!r} is not {FORMAT!r}")
    for key in ("vocab_size", "graphs", "dtype", "kind"):
        if key not in manifest:
            raise ExportDirError(f"{path}: missing field {key!r}")
    if "model" not in manifest["graphs"]:
        raise ExportDirError(f"{path}: no 'model' graph listed")
    if manifest.get("mode") == "context" and "context" not in manifest["graphs"]:
        raise ExportDirError(f"{path}: context-mode export lists no 'context' graph")
    return manifest


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _session_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        so.intra_op_num_threads = threads
    return so


class _Graph:
    """One InferenceSession plus its manifest entry, checked against each other."""

    def __init__(self, export_dir: Path, spec: dict, provider: str, device: str, threads,
                 export_id: str | None = None):
        self.spec = spec
        path = export_dir / spec["file"]
        if not path.is_file():
            raise ExportDirError(f"{export_dir}: incomplete export, missing {spec['file']}")
        try:
            self.session = ort.InferenceSession(str(path), _session_options(threads),
                                                providers=[provider])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ExportDirError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        got_id = self.session.get_modelmeta().custom_metadata_map.get(EXPORT_ID_KEY)
        if got_id != export_id:
            # Another export's graph beside this manifest (an interrupted re-export, a partial copy).
            raise ExportDirError(f"{path}: belongs to another export (its export_id {got_id!r} is not "
                                 f"{MANIFEST}'s {export_id!r}); the directory mixes two exports, "
                                 f"export again")
        if self.session.get_providers()[0] != provider:
            # ORT falls back to CPU silently when the CUDA libraries fail to load.
            raise ValueError(f"{provider} did not load for {path.name} (ONNX Runtime fell back to "
                             f"{self.session.get_providers()}); check the CUDA/cuDNN libraries")
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        want_in, want_out = [s["name"] for s in spec["inputs"]], [s["name"] for s in spec["outputs"]]
        if set(got_in) != set(want_in) or set(got_out) != set(want_out):
            raise ExportDirError(f"{path}: graph inputs/outputs do not match {MANIFEST} "
                                 f"(graph has {len(got_in)} inputs / {len(got_out)} outputs, "
                                 f"manifest {len(want_in)} / {len(want_out)})")
        self.inputs = {s["name"]: s for s in spec["inputs"]}
        self.outputs = [s["name"] for s in spec["outputs"]]
        self.device = device

    def check(self, feeds: dict) -> None:
        """Names, dtypes, ranks, fixed sizes, and one value per symbolic axis (total = past + seq)."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"missing input(s) {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        unknown = [n for n in feeds if n not in self.inputs]
        if unknown:
            raise ValueError(f"unknown input(s) {unknown[:4]}")
        sym: dict[str, tuple[int, str]] = {}
        for name, spec in self.inputs.items():
            value = feeds[name]
            if isinstance(value, np.ndarray):
                dtype, shape, dtype_ok = value.dtype, tuple(value.shape), value.dtype == _NP[spec["dtype"]]
            elif isinstance(value, ort.OrtValue):  # e.g. device-resident presents of a previous run
                dtype, shape = value.data_type(), tuple(value.shape())
                dtype_ok = dtype == _ORT_TYPES[spec["dtype"]]
            else:
                raise TypeError(f"input {name} must be a numpy array or an onnxruntime OrtValue, "
                                f"got {type(value).__module__}.{type(value).__name__}")
            if not dtype_ok:
                raise ValueError(f"input {name} must be {spec['dtype']}, got {dtype}")
            if len(shape) != len(spec["shape"]):
                raise ValueError(f"input {name} must have rank {len(spec['shape'])} "
                                 f"{tuple(spec['shape'])}, got shape {shape}")
            for axis, (want, got) in enumerate(zip(spec["shape"], shape)):
                if isinstance(want, int):
                    if got != want:
                        raise ValueError(f"input {name} must have shape {tuple(spec['shape'])}, got "
                                         f"{shape} (axis {axis} must be {want})")
                elif want in sym and sym[want][0] != got:
                    raise ValueError(f"input {name} has {want}={got} on axis {axis}, but "
                                     f"{sym[want][1]} has {want}={sym[want][0]}")
                else:
                    sym[want] = (got, name)
        if {"past", "seq", "total"} <= sym.keys() and sym["total"][0] != sym["past"][0] + sym["seq"][0]:
            raise ValueError(f"attention_mask covers {sym['total'][0]} positions but past + new = "
                             f"{sym['past'][0]} + {sym['seq'][0]}")

    def run(self, feeds: dict, keep_on_device: set[str]) -> dict:
        """Run with IO binding: numpy inputs are copied in, OrtValues are used where they are;
        outputs in `keep_on_device` stay as OrtValues on the provider's device, the rest come
        back as numpy."""
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.outputs:
            binding.bind_output(name, self.device if name in keep_on_device else "cpu")
        self.session.run_with_iobinding(binding)
        out = {}
        for name, value in zip(self.outputs, binding.get_outputs()):
            out[name] = value if name in keep_on_device else value.numpy()
        return out


class State:
    """The caches of a batch mid-generation: past tensors by input name (device-resident
    OrtValues), static inputs (context mode), the attention mask so far, and the position."""

    def __init__(self, past: dict, static: dict, attention_mask: np.ndarray):
        self.past, self.static, self.attention_mask = past, static, attention_mask

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]


def left_pad(prompts, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (ids (B, T) int64, mask (B, T) int64), left padded."""
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(x, (int, np.integer)) for x in prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = [list(p) for p in prompts]
    if any(len(p) == 0 for p in rows):
        raise ValueError("every prompt must hold at least one token")
    t = max(len(p) for p in rows)
    ids = np.full((len(rows), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for i, p in enumerate(rows):
        ids[i, t - len(p):] = p
        mask[i, t - len(p):] = 1
    return ids, mask


def sample_next(logits: np.ndarray, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """logits (B, V) -> ids (B,) int64. temperature 0 = greedy."""
    if temperature == 0.0:
        return logits.argmax(axis=-1).astype(np.int64)
    rng = rng or np.random.default_rng()
    # Shift the largest logit to 0 first, as calm_fast.generate does: a tiny temperature then
    # drives the others to -inf instead of overflowing them to +inf (inf - inf = NaN: id 0).
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        x = np.where(x == 0, x, x / temperature)
    if top_k is not None and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    if top_p is not None and top_p < 1.0:  # the same rule as calm_fast.generate.sample_next
        order = np.argsort(-x, axis=-1, kind="stable")
        sx = np.take_along_axis(x, order, axis=-1)
        p = np.exp(sx - sx[:, :1])
        p /= p.sum(-1, keepdims=True)
        drop = np.cumsum(p, -1) - p >= top_p * (1 - TOP_P_RTOL)  # mass before it reaches top_p
        sx = np.where(drop, -np.inf, sx)
        np.put_along_axis(x, order, sx, axis=-1)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u = rng.random((x.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), x.shape[-1] - 1).astype(np.int64)


class OrtGenerator:
    """Batched greedy or sampled generation over a calm_fast ONNX export directory."""

    def __init__(self, export_dir, provider: str = "cpu", *, threads: int | None = None):
        if not isinstance(provider, str) or provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        if threads is not None and not _is_int(threads):
            raise TypeError(f"threads must be an int or None, got {type(threads).__name__} {threads!r}")
        if threads is not None and threads < 0:
            raise ValueError(f"threads must be >= 0 (0 = ONNX Runtime's default), got {threads}")
        threads = None if threads is None else int(threads)
        ep = PROVIDERS[provider]
        available = ort.get_available_providers()
        if ep not in available:
            hint = " (install onnxruntime-gpu instead of onnxruntime)" if provider == "cuda" else ""
            raise ValueError(f"provider {provider!r} needs {ep}, which onnxruntime {ort.__version__} "
                             f"here lacks{hint}; available: {available}")
        self.export_dir = Path(export_dir)
        self.manifest = _load_manifest(self.export_dir)
        self.provider, self.vocab_size = provider, int(self.manifest["vocab_size"])
        self.mode = self.manifest.get("mode")
        self.max_seq_len = self.manifest.get("max_seq_len")
        device = "cuda" if provider == "cuda" else "cpu"
        export_id = self.manifest.get("export_id")  # None: an export from before export ids
        self.model = _Graph(self.export_dir, self.manifest["graphs"]["model"], ep, device, threads,
                            export_id)
        self.context = None
        if self.mode == "context":
            self.context = _Graph(self.export_dir, self.manifest["graphs"]["context"], ep, device,
                                  threads, export_id)
        specs = self.manifest["graphs"]["model"]["inputs"]
        self._past_specs = [s for s in specs if s["role"] == "past"]
        self._present = {s["present"]: s["name"] for s in self._past_specs}  # present -> past
        self._dtype = _NP[self.manifest["dtype"]]

    # ---- one forward --------------------------------------------------------------------------
    def _check_ids(self, ids, name: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(f"{name} must be a non-empty 2-D (batch, seq) array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"{name} holds token id {bad}, out of range for vocab_size={self.vocab_size}")
        return ids.astype(np.int64)

    def _mask(self, mask, ids: np.ndarray, name: str) -> np.ndarray:
        if mask is None:
            return np.ones(ids.shape, dtype=np.int64)
        mask = np.asarray(mask)
        if mask.shape != ids.shape:
            raise ValueError(f"{name} must have shape {ids.shape}, got {mask.shape}")
        return (mask != 0).astype(np.int64)

    def prefill(self, input_ids, attention_mask=None, *, context=None, context_mask=None):
        """Run the prompt (B, T) through every model; returns (logits (B, T, V), State)."""
        ids = self._check_ids(input_ids, "input_ids")
        mask = self._mask(attention_mask, ids, "attention_mask")
        if self.max_seq_len is not None and ids.shape[1] > self.max_seq_len:
            raise ValueError(f"prompt of {ids.shape[1]} tokens exceeds max_seq_len={self.max_seq_len}")
        b = ids.shape[0]
        static = {}
        if self.mode == "context":
            if context is None:
                raise ValueError("this export is in 'context' mode: pass context=... token ids")
            cids = self._check_ids(context, "context")
            if cids.shape[0] != b:
                raise ValueError(f"context batch {cids.shape[0]} != prompt batch {b}")
            limit = self.manifest.get("max_context_len")
            if limit is not None and cids.shape[1] > limit:
                raise ValueError(f"context of {cids.shape[1]} tokens exceeds max_context_len={limit}")
            cmask = self._mask(context_mask, cids, "context_mask")
            outs = self.context.run({"context_ids": cids, "context_mask": cmask},
                                    keep_on_device=set(self.context.outputs))
            static = dict(outs, context_mask=cmask)
        elif context is not None:
            raise ValueError(f"context was given but this export is a {self.mode or 'decoder'} model")
        past = {}
        for s in self._past_specs:
            shape = [b if d == "batch" else 0 if d == "past" else d for d in s["shape"]]
            past[s["name"]] = np.zeros(shape, dtype=self._dtype)
        return self._forward(ids, State(past, static, np.zeros((b, 0), np.int64)), mask)

    def step(self, input_ids, state: State, attention_mask=None):
        """Feed the next tokens (B, T) (usually T = 1) after `state`; returns (logits, new State)."""
        ids = self._check_ids(input_ids, "input_ids")
        if ids.shape[0] != state.attention_mask.shape[0]:
            raise ValueError(f"batch of {ids.shape[0]} does not match the state's batch of "
                             f"{state.attention_mask.shape[0]}")
        if self.max_seq_len is not None and state.length + ids.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence of {state.length + ids.shape[1]} tokens exceeds "
                             f"max_seq_len={self.max_seq_len}")
        return self._forward(ids, state, self._mask(attention_mask, ids, "attention_mask"))

    def _forward(self, ids, state: State, new_mask):
        mask = np.concatenate([state.attention_mask, new_mask], axis=1)
        feeds = {"input_ids": ids, "attention_mask": mask, **state.past, **state.static}
        self.model.check(feeds)
        out = self.model.run(feeds, keep_on_device=set(self._present))
        past = {self._present[name]: out[name] for name in self._present}
        return out["logits"], State(past, state.static, mask)

    def run(self, feeds: dict) -> dict:
        """Low level: one run of model.onnx on numpy (or OrtValue) feeds, checked as prefill()
        and step() check theirs: names, dtypes, shapes, token ids in range, total length within
        max_seq_len. Every output comes back as numpy."""
        if not isinstance(feeds, dict):
            raise TypeError(f"feeds must be a dict of input name -> numpy array, got {type(feeds).__name__}")
        self.model.check(feeds)
        ids = feeds["input_ids"]
        if isinstance(ids, ort.OrtValue) and ids.device_name().lower() == "cpu":
            ids = ids.numpy()
        if isinstance(ids, np.ndarray) and ids.size:
            # ONNX Gather wraps negative ids (-1 = the last row) and fails on ids >= vocab.
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"input_ids holds token id {lo if lo < 0 else hi}, out of range for "
                                 f"vocab_size={self.vocab_size}")
        mask = feeds["attention_mask"]
        total = mask.shape[1] if isinstance(mask, np.ndarray) else mask.shape()[1]
        if self.max_seq_len is not None and total > self.max_seq_len:
            raise ValueError(f"attention_mask covers {total} positions, more than "
                             f"max_seq_len={self.max_seq_len}")
        return self.model.run(feeds, keep_on_device=set())

    # ---- generation ---------------------------------------------------------------------------
    def stream(self, prompts, max_new_tokens: int = 16, *, temperature: float = 0.0,
               top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
               seed: int | None = None, context=None, pad_id: int = 0) -> Iterator[np.ndarray]:
        """Yield the next id of every sequence, (B,) int64, one step at a time. `prompts`: lists
        of ids (left padded here); `context`: lists of ids (context mode). Rows that emitted
        eos_id keep emitting it; the stream ends when all rows are done."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if not _is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
            # NaN would sample id 0 every step, inf uniformly: neither is what anyone asked for.
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (not _is_int(top_k) or top_k <= 0):
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if eos_id is not None and not _is_int(eos_id):
            raise ValueError(f"eos_id must be an int token id or None, got {eos_id!r}")
        if eos_id is not None and not 0 <= eos_id < self.vocab_size:
            raise ValueError(f"eos_id {eos_id} is out of range for vocab_size={self.vocab_size}")
        ids, mask = left_pad(prompts, pad_id)
        if self.max_seq_len is not None and ids.shape[1] + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} "
                             f"exceeds max_seq_len={self.max_seq_len}")
        cids = cmask = None
        if context is not None:
            cids, cmask = left_pad(context, pad_id)
        if max_new_tokens == 0:
            return
        rng = np.random.default_rng(seed)
        logits, state = self.prefill(ids, mask, context=cids, context_mask=cmask)
        done = np.zeros(ids.shape[0], dtype=bool)
        for i in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], float(temperature), top_k, top_p, rng)
            if eos_id is not None:
                nxt = np.where(done, eos_id, nxt)
                done |= nxt == eos_id
            yield nxt
            if i == max_new_tokens - 1 or (eos_id is not None and done.all()):
                return
            logits, state = self.step(nxt[:, None], state)

    def generate(self, prompts, max_new_tokens: int = 16, **kw) -> list[list[int]]:
        """Prompt + new ids per sequence (no padding), as lists of ints."""
        left_pad(prompts)  # validates before anything runs
        rows = [list(p) for p in ([prompts] if isinstance(prompts[0], (int, np.integer)) else prompts)]
        new = [nxt for nxt in self.stream(prompts, max_new_tokens, **kw)]
        if not new:
            return rows
        steps = np.stack(new, axis=1)
        return [row + [int(x) for x in steps[i]] for i, row in enumerate(rows)]


def _ids(text: str, flag: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated token ids, got {text!r}") from None
    if not ids:
        raise ValueError(f"{flag} is empty")
    return ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Generate with a calm_fast ONNX export (onnxruntime + numpy only).")
    p.add_argument("export_dir")
    p.add_argument("--prompt", required=True, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eos-id", type=int, default=None)
    p.add_argument("--context", default=None, help="context token ids (context-mode exports)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print each new id as it is produced")
    args = p.parse_args(argv)
    try:
        prompt = _ids(args.prompt, "--prompt")
        context = None if args.context is None else [_ids(args.context, "--context")]
        gen = OrtGenerator(args.export_dir, args.provider, threads=args.threads)
        new = []
        for nxt in gen.stream([prompt], args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, eos_id=args.eos_id,
                              seed=args.seed, context=context):
            new.append(int(nxt[0]))
            if args.stream:
                print(new[-1], flush=True)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(prompt + new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
