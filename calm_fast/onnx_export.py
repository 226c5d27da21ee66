"""Export a CALM (or a plain Decoder) to ONNX for ONNX Runtime.

Layout of an export directory (described by `calm_onnx.json`, the only file the runtime in
export/ort_generate.py reads before it opens the graphs):

  model.onnx    one merged prefill/decode graph. Every cache is an input (`past ...`) and an
                output (`present ...`): prefill feeds caches with 0 past positions, decode
                feeds back the previous step's presents. Names:
                  anchor:   past_key_values.{i}.key/value       -> present.{i}.key/value
                  augment:  augment.{a}.past_key_values.{i}.key -> augment.{a}.present.{i}.key
                  bridge:   bridge.{a}.{k}.past_key_values.key  -> bridge.{a}.{k}.present.key
                (aligned mode; in context mode bridge K/V are static inputs `bridge.{a}.{k}.key`
                from context.onnx, and there is no augment cache).
  context.onnx  context mode only: context ids + mask -> every bridge's K/V, run once.
  bridge_{a}_{k}.onnx  (export_bridges=True) one bridge on its own, see `export_bridge`.

Why one merged graph: prefill and decode differ only in the number of new tokens and past
positions, both dynamic axes, so one graph (and one set of weights on disk) serves both.

Writing a directory is all-or-nothing for the loader: every graph is traced, saved and checked
in a hidden staging directory inside out_dir (an interruption there leaves the previous export
untouched); then the old manifest is removed, the graphs are renamed into place and the manifest
is written last. Every graph carries the manifest's `export_id` in its metadata_props
(`calm_fast.export_id`), and export/ort_generate.py refuses a graph whose id differs, so a
directory is either one complete export or refuses to load with a clear error.

The bridge's fused op (calm_fast.ops) is a torch custom op on some backends and has no ONNX
translation; the export modules below call the reference math directly (standard ONNX ops), or,
with `attention="mha"`, ORT's com.microsoft MultiHeadAttention so ORT runs its fused kernels.
Semantics follow ops/reference.py: aligned query i sees key j iff j <= i + (Tk - Tq); padded keys
are never seen; a query row with no visible key outputs 0.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path

import torch
from torch import nn

from .checkpoint import save_json
from .composed import CALM
from .decoder import ConcatKVCache, Decoder

FORMAT = "calm_fast.onnx/1"
MANIFEST = "calm_onnx.json"
MODEL_FILE = "model.onnx"
CONTEXT_FILE = "context.onnx"
MIN_OPSET = 18
EXPORT_ID_KEY = "calm_fast.export_id"  # metadata_props key; the manifest's "export_id"
_DATA_SUFFIX = ".data"  # external weights beside a graph over protobuf's limit: <file>.data
_EXTERNAL_DATA_BYTES = 1_800_000_000
ATTENTION_IMPLS = ("standard", "mha")
EXPORTERS = ("torchscript", "dynamo")


def _neg(dtype) -> float:
    """The dtype's lowest finite value instead of -inf: softmax stays finite, and rows with no
    visible key are zeroed explicitly afterwards (ops/reference.py's rule), so no NaN appears."""
    return torch.finfo(dtype).min


# ---- attention as export-friendly math ------------------------------------------------------
def _attend_standard(q, k, v, allowed):
    """q (B, H, Tq, d), k/v (B, H, Tk, d), allowed (B, 1, Tq, Tk) bool -> (B, H, Tq, d)."""
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = torch.where(allowed, scores, torch.full_like(scores, _neg(scores.dtype)))
    probs = torch.softmax(scores, dim=-1) * allowed.to(scores.dtype)
    return probs @ v


@torch.library.custom_op("calm_fast_export::mha", mutates_args=())
def _mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
         n_heads: int) -> torch.Tensor:
    """Export-only op: q (B, Tq, D) packed heads, k/v (B, H, Tk, d), bias (B, 1, Tq, Tk)
    additive. Becomes com.microsoft::MultiHeadAttention in the ONNX graph."""
    b, tq, d_model = q.shape
    qh = q.view(b, tq, n_heads, d_model // n_heads).transpose(1, 2)
    scores = (qh @ k.transpose(-1, -2)) * (1.0 / math.sqrt(qh.shape[-1])) + bias
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(b, tq, d_model)


@_mha.register_fake
def _(q, k, v, bias, n_heads):
    return torch.empty_like(q)


def _mha_schema():
    """The onnx OpSchema of com.microsoft::MultiHeadAttention (its first six inputs, the ones
    used here). onnx registers no schemas for ONNX Runtime's contrib ops, so onnxscript cannot
    resolve `Opset("com.microsoft", 1).MultiHeadAttention` by name; an Op given this schema can."""
    from onnx.defs import OpSchema
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    return OpSchema(
        "MultiHeadAttention", "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T", param_option=optional),
                param("value", "T", param_option=optional), param("bias", "T", param_option=optional),
                param("key_padding_mask", "M", param_option=optional),
                param("attention_bias", "T", param_option=optional)],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors"),
                          ("M", ["tensor(int32)"], "key padding mask")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "number of heads")])


def _mha_translation():
    """onnxscript translation of calm_fast_export::mha (imported lazily: export-time only)."""
    import onnxscript
    op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention",
                              _mha_schema())

    def mha(q, k, v, bias, n_heads: int):
        return op(q, k, v, None, None, bias, num_heads=n_heads)
    return mha


def _attend(q, k, v, allowed, impl: str):
    """Multi-head attention with ops/reference.py semantics, heads split (B, H, T, d) in and
    merged (B, Tq, D) out."""
    # Keys no row may see (padding) become zeros: their weight is 0, but 0 * inf/NaN is NaN, and
    # another stack's hidden states at its padded positions may hold anything.
    seen = allowed.any(dim=2).unsqueeze(-1)  # (B, 1, Tk, 1)
    zero = torch.zeros((), dtype=k.dtype)
    k, v = torch.where(seen, k, zero), torch.where(seen, v, zero)
    if impl == "standard":
        out = _attend_standard(q, k, v, allowed)
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)
    b, h, tq, d = q.shape
    bias = torch.where(allowed, torch.zeros((), dtype=q.dtype), torch.full((), _neg(q.dtype), dtype=q.dtype))
    out = _mha(q.transpose(1, 2).reshape(b, tq, h * d), k, v, bias, h)
    # MHA averages V over a fully masked row; the reference defines that row as 0.
    visible = allowed.any(dim=-1).transpose(1, 2).to(q.dtype)  # (B, Tq, 1)
    return out * visible


def _allowed(tq, tk, aligned: bool, key_mask):
    """(B, 1, Tq, Tk) bool. key_mask (B, Tk) bool."""
    allowed = key_mask[:, None, None, :]
    if aligned:
        i = torch.arange(tq, device=key_mask.device)[:, None]
        j = torch.arange(tk, device=key_mask.device)[None, :]
        allowed = allowed & (j <= i + (tk - tq))[None, None]
    return allowed.expand(key_mask.shape[0], 1, tq, tk)


class _BridgeStep(nn.Module):
    """A bridge at inference: folded projection (one GEMM for K and V), K/V cache by concat."""

    def __init__(self, bridge, dtype):
        super().__init__()
        w_kv, b_kv = bridge.folded_kv()
        self.register_buffer("w_kv", w_kv.detach().to(dtype).clone())
        self.register_buffer("b_kv", b_kv.detach().to(dtype).clone())
        self.register_buffer("w_q", bridge.wq.weight.detach().to(dtype).clone())
        self.register_buffer("w_o", bridge.wo.weight.detach().to(dtype).clone())
        self.n_heads = bridge.n_heads
        self.d_b = bridge.wq.weight.shape[0]

    def kv(self, h_a):
        """(B, T, D_A) -> K, V (B, H, T, d)."""
        b, t, _ = h_a.shape
        kv = torch.nn.functional.linear(h_a, self.w_kv, self.b_kv)
        kv = kv.view(b, t, 2, self.n_heads, self.d_b // self.n_heads).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def attend(self, h_b, k, v, allowed, impl):
        b, t, _ = h_b.shape
        q = torch.nn.functional.linear(h_b, self.w_q)
        q = q.view(b, t, self.n_heads, self.d_b // self.n_heads).transpose(1, 2)
        return torch.nn.functional.linear(_attend(q, k, v, allowed, impl), self.w_o)


class _Step(nn.Module):
    """The merged prefill/decode graph: (input_ids, attention_mask, *caches) ->
    (logits, *present caches). A Decoder is a CALM with no augments."""

    def __init__(self, anchor: Decoder, calm: CALM | None, impl: str, dtype):
        super().__init__()
        self.anchor, self.calm, self.impl = anchor, calm, impl
        self.aligned = calm is not None and calm.mode == "aligned"
        self.n_aug_layers, self.table = [], {}
        self.bridges = nn.ModuleList()
        if calm is not None:
            self.n_aug_layers = [calm._taps(a)[-1] + 1 for a in range(len(calm.augments))] \
                if self.aligned else []
            self.table = calm._by_anchor_layer()
            self.bridges = nn.ModuleList(nn.ModuleList(_BridgeStep(b, dtype) for b in bs)
                                         for bs in calm.bridges)

    def forward(self, *inputs):
        input_ids, attention_mask, caches = inputs[0], inputs[1], list(inputs[2:])
        mask = attention_mask != 0
        t = input_ids.shape[1]
        n_anchor = self.anchor.cfg.n_layers
        anchor_cache = ConcatKVCache(caches[0:2 * n_anchor:2], caches[1:2 * n_anchor:2])
        rest = caches[2 * n_anchor:]
        pos = anchor_cache.past_k[0].shape[2]
        presents_aug, presents_bridge, states = [], [], []
        if self.aligned:
            for a, aug in enumerate(self.calm.augments):
                n = self.n_aug_layers[a]
                cache = ConcatKVCache(rest[0:2 * n:2], rest[1:2 * n:2])
                rest = rest[2 * n:]
                taps = self.calm._taps(a)
                _, tapped = aug(input_ids, mask, cache=cache, pos=pos, taps=set(taps),
                                stop_after=taps[-1], validate=False)
                states.append(tapped)
                for i in range(n):
                    presents_aug += [cache.present_k[i], cache.present_v[i]]
            # Aligned bridge K/V: past rows + this step's rows; masks cover past + new.
            bridge_kv = {}
            for a, m in enumerate(self.calm.mappings):
                for k, (aug_layer, _) in enumerate(m):
                    nk, nv = self.bridges[a][k].kv(states[a][aug_layer])
                    pk, pv = rest[0], rest[1]
                    rest = rest[2:]
                    bridge_kv[a, k] = (torch.cat([pk, nk], dim=2), torch.cat([pv, nv], dim=2))
                    presents_bridge += list(bridge_kv[a, k])
            allowed = _allowed(t, pos + t, True, mask)
        elif self.calm is not None:
            context_mask = rest[0] != 0
            rest = rest[1:]
            bridge_kv = {}
            for a, m in enumerate(self.calm.mappings):
                for k in range(len(m)):
                    bridge_kv[a, k] = (rest[0], rest[1])
                    rest = rest[2:]
            allowed = _allowed(t, context_mask.shape[1], False, context_mask)

        def inject(entries):
            def f(h):
                out = h
                for a, k, _ in entries:
                    out = out + self.bridges[a][k].attend(h, *bridge_kv[a, k], allowed, self.impl)
                return out
            return f

        after = {layer: inject(e) for layer, e in self.table.items()}
        logits = self.anchor(input_ids, mask, cache=anchor_cache, pos=pos, after_block=after,
                             validate=False)
        presents = []
        for i in range(n_anchor):
            presents += [anchor_cache.present_k[i], anchor_cache.present_v[i]]
        return (logits, *presents, *presents_aug, *presents_bridge)


class _ContextEncoder(nn.Module):
    """Context mode: context ids + mask -> every bridge's K/V (B, H, Tc, d), computed once."""

    def __init__(self, calm: CALM, bridges: nn.ModuleList):
        super().__init__()
        self.calm, self.bridges = calm, bridges

    def forward(self, context_ids, context_mask):
        mask = context_mask != 0
        outs = []
        for a, aug in enumerate(self.calm.augments):
            taps = self.calm._taps(a)
            _, tapped = aug(context_ids, mask, taps=set(taps), stop_after=taps[-1], validate=False)
            for k, (aug_layer, _) in enumerate(self.calm.mappings[a]):
                outs += list(self.bridges[a][k].kv(tapped[aug_layer]))
        return tuple(outs)


class _BridgeOnly(nn.Module):
    """One bridge with its K/V cache, for insertion into another stack."""

    def __init__(self, bridge, mode: str, impl: str, dtype):
        super().__init__()
        self.step, self.aligned, self.impl = _BridgeStep(bridge, dtype), mode == "aligned", impl

    def forward(self, hidden_anchor, hidden_augment, key_mask, past_key, past_value):
        nk, nv = self.step.kv(hidden_augment)
        k, v = torch.cat([past_key, nk], dim=2), torch.cat([past_value, nv], dim=2)
        allowed = _allowed(hidden_anchor.shape[1], k.shape[2], self.aligned, key_mask != 0)
        return hidden_anchor + self.step.attend(hidden_anchor, k, v, allowed, self.impl), k, v


# ---- I/O description --------------------------------------------------------------------------
def _tensor(name, dtype, shape, role, **extra):
    return {"name": name, "dtype": dtype, "shape": shape, "role": role, **extra}


def _io_spec(anchor: Decoder, calm: CALM | None, dtype_name: str):
    """(inputs, outputs) of model.onnx, plus context.onnx's when in context mode. Shapes use
    symbolic names: batch, seq (new tokens), past (cached positions), total = past + seq,
    context (context tokens)."""
    acfg = anchor.cfg
    inputs = [_tensor("input_ids", "int64", ["batch", "seq"], "input_ids"),
              _tensor("attention_mask", "int64", ["batch", "total"], "attention_mask")]
    outputs = [_tensor("logits", dtype_name, ["batch", "seq", acfg.vocab_size], "logits")]
    ctx = None

    def cache(past, present, heads, head_dim, kind):
        for kv in ("key", "value"):
            inputs.append(_tensor(past.format(kv=kv), dtype_name, ["batch", heads, "past", head_dim],
                                  "past", kind=kind, present=present.format(kv=kv)))
            outputs.append(_tensor(present.format(kv=kv), dtype_name,
                                   ["batch", heads, "total", head_dim], "present", kind=kind,
                                   past=past.format(kv=kv)))

    for i in range(acfg.n_layers):
        cache(f"past_key_values.{i}.{{kv}}", f"present.{i}.{{kv}}", acfg.n_kv_heads, acfg.head_dim,
              "anchor")
    if calm is None:
        return inputs, outputs, ctx
    d = acfg.dim // acfg.n_heads
    if calm.mode == "aligned":
        for a, aug in enumerate(calm.augments):
            for i in range(calm._taps(a)[-1] + 1):
                cache(f"augment.{a}.past_key_values.{i}.{{kv}}", f"augment.{a}.present.{i}.{{kv}}",
                      aug.cfg.n_kv_heads, aug.cfg.head_dim, "augment")
        for a, m in enumerate(calm.mappings):
            for k in range(len(m)):
                cache(f"bridge.{a}.{k}.past_key_values.{{kv}}", f"bridge.{a}.{k}.present.{{kv}}",
                      acfg.n_heads, d, "bridge")
    else:
        inputs.append(_tensor("context_mask", "int64", ["batch", "context"], "context_mask"))
        ctx = {"inputs": [_tensor("context_ids", "int64", ["batch", "context"], "context_ids"),
                          _tensor("context_mask", "int64", ["batch", "context"], "context_mask")],
               "outputs": []}
        for a, m in enumerate(calm.mappings):
            for k in range(len(m)):
                for kv in ("key", "value"):
                    spec = _tensor(f"bridge.{a}.{k}.{kv}", dtype_name,
                                   ["batch", acfg.n_heads, "context", d], "bridge_static",
                                   kind="bridge")
                    inputs.append(spec)
                    ctx["outputs"].append(spec)
    return inputs, outputs, ctx


_NP_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _example(spec, sizes, vocab, dtype):
    shape = [sizes.get(s, s) if isinstance(s, str) else s for s in spec["shape"]]
    if spec["dtype"] != "int64":
        return torch.randn(shape, dtype=dtype) * 0.1
    if spec["role"] in ("input_ids", "context_ids"):
        return torch.randint(0, vocab, shape)
    m = torch.ones(shape, dtype=torch.long)  # masks
    m[0, 0] = 0  # a padded example so no mask branch is traced away
    return m


def _dynamic(specs):
    """dynamo exporter: every symbolic axis dynamic; torch.export infers total = past + seq."""
    return tuple({i: torch.export.Dim.DYNAMIC for i, s in enumerate(spec["shape"]) if isinstance(s, str)}
                 for spec in specs)


def _symbolic_mha(g, q, k, v, bias, n_heads):
    """TorchScript-exporter translation of calm_fast_export::mha (omitted optional inputs,
    bias and key_padding_mask, are empty names)."""
    from torch.onnx import symbolic_helper
    heads = symbolic_helper._get_const(n_heads, "i", "n_heads")
    none = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
    out = g.op("com.microsoft::MultiHeadAttention", q, k, v, none, none, bias, num_heads_i=heads)
    out.setType(q.type())  # same shape and dtype as the packed query
    return out


_SYMBOLIC_OPSETS: set[int] = set()


def _export_graph(module, inputs, outputs, path: Path, sizes, vocab, dtype, opset, impl, exporter,
                  export_id: str) -> list[str]:
    """Trace `module` into `path`, name its axes as in the specs, stamp `export_id` into its
    metadata, check it. `path` must be in a staging directory of the caller's (the graph is
    renamed into its final place only once everything is written and checked). Returns the file
    names written: the graph, and its external data file if the weights needed one."""
    import onnx
    args = tuple(_example(s, sizes, vocab, dtype) for s in inputs)
    names_in, names_out = [s["name"] for s in inputs], [s["name"] for s in outputs]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # both exporters are chatty about tracing details
            if exporter == "torchscript":
                if impl == "mha" and opset not in _SYMBOLIC_OPSETS:
                    torch.onnx.register_custom_op_symbolic("calm_fast_export::mha", _symbolic_mha, opset)
                    _SYMBOLIC_OPSETS.add(opset)
                axes = {s["name"]: {i: d for i, d in enumerate(s["shape"]) if isinstance(d, str)}
                        for s in inputs + outputs}
                torch.onnx.export(module, args, str(tmp), dynamo=False, opset_version=opset,
                                  input_names=names_in, output_names=names_out, dynamic_axes=axes,
                                  do_constant_folding=True)
            else:
                dynamic = _dynamic(inputs)
                if isinstance(module, _Step):
                    dynamic = (dynamic,)  # forward(*inputs): torch.export sees one tuple argument
                table = {torch.ops.calm_fast_export.mha.default: _mha_translation()} \
                    if impl == "mha" else None
                program = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                            input_names=names_in, output_names=names_out,
                                            dynamic_shapes=dynamic, custom_translation_table=table,
                                            optimize=True, verbose=False)
                program.save(str(tmp))
        model = onnx.load(str(tmp))  # pulls in any external data the exporter wrote beside it
    _name_axes(model, inputs, outputs)
    entry = model.metadata_props.add()  # a freshly traced graph: no id of ours yet
    entry.key, entry.value = EXPORT_ID_KEY, export_id
    files = _save(model, path)
    check_model(path)
    return files


def _save(model, path: Path) -> list[str]:
    """Save into a fresh staging directory. Weights past protobuf's 2 GiB ceiling go to one
    `<name>.data` file beside the graph (onnx appends to an existing data file, so the directory
    must not hold one: the staging directory is new for each export)."""
    import onnx
    data = path.with_name(path.name + _DATA_SUFFIX)
    if path.exists() or data.exists():
        raise FileExistsError(f"{path}: staging file already exists")
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    if weights > _EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        return [path.name, data.name]
    onnx.save_model(model, str(path))
    return [path.name]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_STAGING_PREFIX = ".calm_onnx_staging."  # hidden folders in out_dir, one per export in progress


def _install(staging: Path, out_dir: Path, files: list[str], graphs: list[str]) -> None:
    """Rename staged files into out_dir (data files before their graphs); a graph staged without
    external data loses any stale `<graph>.data` beside its final name."""
    for name in sorted(files, key=lambda n: not n.endswith(_DATA_SUFFIX)):
        os.replace(staging / name, out_dir / name)
    for name in graphs:
        if name + _DATA_SUFFIX not in files:
            (out_dir / (name + _DATA_SUFFIX)).unlink(missing_ok=True)
    _fsync_dir(out_dir)


def _name_axes(model, inputs, outputs) -> None:
    """Graph inputs/outputs get the manifest's axis names (the exporters invent their own)."""
    specs = {s["name"]: s for s in inputs + outputs}
    for vi in list(model.graph.input) + list(model.graph.output):
        spec = specs.get(vi.name)
        if spec is None:
            raise ValueError(f"exported graph has an unexpected input/output {vi.name!r}")
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(spec["shape"]):
            raise ValueError(f"exported {vi.name} has rank {len(dims)}, expected {len(spec['shape'])}")
        for dim, want in zip(dims, spec["shape"]):
            if isinstance(want, str):
                dim.dim_param = want
            else:
                dim.dim_value = want


def check_model(path) -> None:
    """onnx.checker (full) and strict shape inference; raises ValueError naming the file."""
    import onnx
    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # checker raises several exception types; one clear error
        raise ValueError(f"{path}: exported graph fails onnx checks: {e}") from None


def max_opset() -> int:
    """The newest opset accepted: torch.onnx's ONNX_MAX_OPSET (23 in torch 2.13), the most the
    TorchScript exporter takes (above it, it fails only after tracing, with a long dump). The
    dynamo exporter is held to the same limit: above it, 24 exported here but 28 failed the
    checker."""
    try:
        from torch.onnx import _constants
        return int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):  # a torch that moved it: the value of torch 2.13
        return 23


def _check_options(opset, attention, dtype, exporter):
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ValueError(f"opset must be an int in [{MIN_OPSET}, {top}] (the newest this torch's "
                         f"ONNX exporter supports), got {opset!r}")
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
    if dtype != torch.float32:
        # fp16: the TorchScript exporter emits LayerNormalization with mixed fp16/fp32 types
        # that fail the checker; fp32 only until that is fixed (see docs/onnx.md).
        raise ValueError(f"dtype must be torch.float32 (fp16 export is not supported yet), got {dtype}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")


def _out_path(value, what: str) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")
    if not str(os.fspath(value)).strip():
        raise ValueError(f"{what} is empty (give a directory; '.' for the current one)"
                         if what == "out_dir" else f"{what} is empty")
    return Path(value)


def _old_files(out_dir: Path) -> set[str]:
    """Graph (and data) files the export already in out_dir lists in its manifest."""
    import json
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
        specs = list(manifest["graphs"].values()) + list(manifest.get("bridges", []))
        names = {spec["file"] for spec in specs}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return set()  # no manifest, or not one of ours: delete nothing
    return {n for n in names if isinstance(n, str) and Path(n).name == n and n.endswith(".onnx")}


def export_onnx(model, out_dir, *, opset: int = 18, attention: str = "standard",
                dtype: torch.dtype = torch.float32, export_bridges: bool = False,
                exporter: str = "torchscript") -> dict:
    """Write the ONNX export of `model` (a CALM or a Decoder) into `out_dir`; returns the
    manifest (also written to out_dir/calm_onnx.json).

    attention: "standard" (plain ONNX ops, any runtime) or "mha" (the bridges use ORT's
      com.microsoft MultiHeadAttention: fused kernels, ONNX Runtime only).
    export_bridges: also write each bridge on its own (see `export_bridge`; a CALM only).
    exporter: "torchscript" (default: ~30x faster to trace than "dynamo" here, same graph
      semantics, tested) or "dynamo" (torch.export + onnxscript).
    dtype: torch.float32 only for now (fp16 export: see docs/onnx.md).
    """
    if not isinstance(model, (CALM, Decoder)):
        raise TypeError(f"export_onnx needs a CALM or a Decoder, got {type(model).__name__}")
    _check_options(opset, attention, dtype, exporter)
    if not isinstance(export_bridges, bool):
        raise TypeError(f"export_bridges must be a bool, got {export_bridges!r}")
    if export_bridges and not isinstance(model, CALM):
        raise ValueError("export_bridges=True needs a CALM: a plain Decoder has no bridges")
    out_dir = _out_path(out_dir, "out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(f"{_STAGING_PREFIX}*"):  # left by an export killed while staging
        shutil.rmtree(stale, ignore_errors=True)
    was_training = model.training
    first = next(model.parameters())
    if first.device.type != "cpu" or first.dtype != dtype:
        # Trace a CPU copy in the export dtype: the caller's model is left as it was.
        model = copy.deepcopy(model).to(device="cpu", dtype=dtype)
    calm = model if isinstance(model, CALM) else None
    anchor = model.anchor if calm is not None else model
    export_id = uuid.uuid4().hex
    model.eval()
    try:
        # Everything is written and checked in `staging` first: interrupted there, out_dir still
        # holds the previous export, untouched.
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=_STAGING_PREFIX) as staging:
            staging = Path(staging)
            base = _Step(anchor, calm, attention, dtype).eval()
            dtype_name = _NP_DTYPES[dtype]
            inputs, outputs, ctx = _io_spec(anchor, calm, dtype_name)
            vocab = anchor.cfg.vocab_size
            sizes = {"batch": 2, "seq": 3, "past": 4, "total": 7, "context": 5}
            graphs = [MODEL_FILE]
            files = _export_graph(base, inputs, outputs, staging / MODEL_FILE, sizes, vocab, dtype,
                                  opset, attention, exporter, export_id)
            manifest = {
                "format": FORMAT, "opset": opset, "attention": attention, "dtype": dtype_name,
                "exporter": exporter, "export_id": export_id,
                "vocab_size": vocab, "kind": "calm" if calm is not None else "decoder",
                "mode": calm.mode if calm is not None else None,
                # Aligned augments read the same tokens: the shortest limit (learned positions) wins.
                "max_seq_len": min([anchor.cfg.max_seq_len] + [a.cfg.max_seq_len for a in calm.augments]
                                   if calm is not None and calm.mode == "aligned"
                                   else [anchor.cfg.max_seq_len]),
                "graphs": {"model": {"file": MODEL_FILE, "inputs": inputs, "outputs": outputs}},
                "symbols": {"batch": "sequences in the batch", "seq": "new tokens this call",
                            "past": "positions already cached (0 at prefill)",
                            "total": "past + seq", "context": "context tokens (context mode)"},
            }
            if ctx is not None:
                files += _export_graph(_ContextEncoder(calm, base.bridges).eval(), ctx["inputs"],
                                       ctx["outputs"], staging / CONTEXT_FILE, sizes, vocab, dtype, opset,
                                       attention, exporter, export_id)
                graphs.append(CONTEXT_FILE)
                manifest["graphs"]["context"] = {"file": CONTEXT_FILE, **ctx}
                manifest["max_context_len"] = min(a.cfg.max_seq_len for a in calm.augments)
            if export_bridges:
                manifest["bridges"] = []
                for a, bs in enumerate(calm.bridges):
                    for k, bridge in enumerate(bs):
                        name = f"bridge_{a}_{k}.onnx"
                        spec, written = _bridge_graph(bridge, staging / name, calm.mode, opset, attention,
                                                      dtype, exporter, export_id)
                        files += written
                        graphs.append(name)
                        manifest["bridges"].append({"augment": a, "index": k,
                                                    "augment_layer": calm.mappings[a][k][0],
                                                    "anchor_layer": calm.mappings[a][k][1], **spec})
            # Install: from here on the directory has no manifest until it names the new graphs
            # (an interruption leaves one the loader refuses, never a mix of two exports).
            stale = _old_files(out_dir) - set(graphs)
            (out_dir / MANIFEST).unlink(missing_ok=True)
            _fsync_dir(out_dir)
            _install(staging, out_dir, files, graphs)
            for name in stale:  # graphs of the previous export that this one does not have
                for f in (name, name + _DATA_SUFFIX):
                    (out_dir / f).unlink(missing_ok=True)
            save_json(out_dir / MANIFEST, manifest)
        return manifest
    finally:
        model.train(was_training)


def export_bridge(bridge, path, *, mode: str = "aligned", opset: int = 18, attention: str = "standard",
                  dtype: torch.dtype = torch.float32, exporter: str = "torchscript") -> dict:
    """Export one bridge (folded projection + cross-attention + residual) as its own graph.

    Inputs:  hidden_anchor (batch, seq, D_B): the anchor block's output (the residual stream);
             hidden_augment (batch, new, D_A): the augment block's output rows not yet cached
               (aligned mode: the same new tokens as hidden_anchor; context mode: the context,
               once, with past 0);
             key_mask (batch, past + new) int64, 1 = real key;
             past_key, past_value (batch, H, past, D_B / H): this bridge's K/V so far.
    Outputs: hidden (batch, seq, D_B) = hidden_anchor + W_o Attn(...);
             present_key, present_value (batch, H, past + new, D_B / H).
    Aligned mode: anchor query i (the last `seq` positions) sees key j iff j <= i + (Tk - seq).
    Written in a staging directory beside `path`, checked, then renamed into place (with its
    `.data` file first, when the weights need one). Returns the graph description (file, mode,
    inputs, outputs, export_id: also in the graph's metadata_props under EXPORT_ID_KEY)."""
    from .bridge import Bridge
    if not isinstance(bridge, Bridge):
        raise TypeError(f"export_bridge needs a Bridge, got {type(bridge).__name__}")
    if mode not in ("aligned", "context"):
        raise ValueError(f"mode must be 'aligned' or 'context', got {mode!r}")
    _check_options(opset, attention, dtype, exporter)
    path = _out_path(path, "path")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; export_bridge needs a file path, e.g. {path / 'bridge.onnx'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    export_id = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.staging.") as staging:
        staged = Path(staging) / path.name
        spec, files = _bridge_graph(bridge, staged, mode, opset, attention, dtype, exporter, export_id)
        _install(Path(staging), path.parent, files, [path.name])
    return dict(spec, export_id=export_id)


def _bridge_graph(bridge, path: Path, mode, opset, attention, dtype, exporter, export_id):
    """export_bridge's graph into a staging path: (description, files written)."""
    d_b, d_a = bridge.wq.weight.shape[0], bridge.proj.weight.shape[1]
    h, dn = bridge.n_heads, _NP_DTYPES[dtype]
    d = d_b // h
    inputs = [_tensor("hidden_anchor", dn, ["batch", "seq", d_b], "hidden_anchor"),
              _tensor("hidden_augment", dn, ["batch", "new", d_a], "hidden_augment"),
              _tensor("key_mask", "int64", ["batch", "total"], "key_mask"),
              _tensor("past_key", dn, ["batch", h, "past", d], "past", present="present_key"),
              _tensor("past_value", dn, ["batch", h, "past", d], "past", present="present_value")]
    outputs = [_tensor("hidden", dn, ["batch", "seq", d_b], "hidden"),
               _tensor("present_key", dn, ["batch", h, "total", d], "present", past="past_key"),
               _tensor("present_value", dn, ["batch", h, "total", d], "present", past="past_value")]
    module = _BridgeOnly(bridge, mode, attention, dtype).cpu().eval()  # holds copies, not the bridge
    sizes = {"batch": 2, "seq": 3, "new": 2, "past": 4, "total": 6}
    files = _export_graph(module, inputs, outputs, path, sizes, 2, dtype, opset, attention, exporter,
                          export_id)
    return {"file": path.name, "mode": mode, "inputs": inputs, "outputs": outputs}, files


__all__ = ["EXPORT_ID_KEY", "MANIFEST", "check_model", "export_bridge", "export_onnx", "max_opset"]
