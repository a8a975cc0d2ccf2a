"""Deterministic builder of a QEfficient-style contiguous-KV causal-LM ONNX export.

The graph is a tiny random-weight Llama-like decoder that follows the conventions of the
QEfficient exports (``CtxScatter`` / ``CtxGather`` / ``CustomRMSNorm`` model-local functions,
``past_key.{i}`` / ``past_key.{i}_RetainedState`` I/O, position ``-1`` for padding, logits only
for the token at ``argmax(position_ids)`` of each row, the INT32_MAX read-side sentinel).

Layout of the main graph (node names follow the torch exporter style ``{scope}/{Op}_{k}``, the
output of a node is ``{node name}_output_0``):

* ``/model/...``                       embeddings, rope cos/sin, causal mask (computed once);
* ``/model/layers.{i}/self_attn/...``  attention of layer ``i``;
* ``/model/layers.{i}/mlp/...``        SiLU-gated MLP of layer ``i``;
* ``/model/norm/CustomRMSNorm``, ``/...`` (row selection), ``/lm_head/MatMul`` -> ``logits``.

Projection weights are stored as ``[in_features, out_features]`` (right operand of ``MatMul``).
Everything is emitted in a fixed order, so the same spec always serializes to the same bytes.
Build time is linear in ``num_layers``.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import AttributeProto, NodeProto, TensorProto, helper, numpy_helper

from paged_rewrite.builder.graph_builder import GraphBuilder as _Graph

QAIC_DOMAIN = "com.qualcomm.cloud"
"""Domain of ``CtxScatter`` / ``CtxGather``."""
QTI_DOMAIN = "com.qti.aisw.onnx"
"""Domain of ``CustomRMSNorm``."""
INT32_MAX_SENTINEL = 2147483647
"""Value of the scalar int64 ``Constant`` that marks invalid ``CtxGather`` indices."""

_ROPE_THETA = 10000.0
_OPSET = 17
_IR_VERSION = 8


@dataclass(frozen=True)
class ExportSpec:
    """Architecture and seed of the generated model (all sizes must be positive)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    vocab_size: int = 256
    max_position: int = 4096
    rms_eps: float = 1e-6
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` if any field is out of range or inconsistent."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "rms_eps":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"ExportSpec.rms_eps must be a float, got {value!r}")
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"ExportSpec.rms_eps must be finite and > 0, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ExportSpec.{f.name} must be an int, got {value!r}")
            minimum = 0 if f.name == "seed" else 1
            if value < minimum:
                raise ValueError(f"ExportSpec.{f.name} must be >= {minimum}, got {value}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ExportSpec.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"ExportSpec.head_dim must be even for rotate_half rope, got {self.head_dim}")


def _fnode(op_type: str, inputs: list[str], output: str, **attrs: Any) -> NodeProto:
    return helper.make_node(op_type, inputs, [output], **attrs)


def _fconst(output: str, value: npt.NDArray[Any]) -> NodeProto:
    return _fnode("Constant", [], output, value=numpy_helper.from_array(value))


def _function(domain: str, name: str, inputs: list[str], nodes: list[NodeProto]) -> onnx.FunctionProto:
    """A function with one output ``return_val`` whose body imports only ai.onnx opset 17."""
    std = [helper.make_opsetid("", _OPSET)]
    attrs = ["epsilon"] if name == "CustomRMSNorm" else None
    return helper.make_function(domain, name, inputs, ["return_val"], nodes, std, attributes=attrs)


def _local_functions() -> list[onnx.FunctionProto]:
    """``CustomRMSNorm``, ``CtxScatter`` and ``CtxGather`` as model-local functions."""
    i64 = np.int64
    eps_node = helper.make_node("Constant", [], ["eps"])
    eps_node.attribute.append(
        AttributeProto(name="value_float", type=AttributeProto.FLOAT, ref_attr_name="epsilon")
    )
    rms_body = [
        _fnode("Mul", ["hidden_states", "hidden_states"], "sq"),
        _fnode("ReduceMean", ["sq"], "variance", axes=[-1], keepdims=1),
        eps_node,
        _fnode("Add", ["variance", "eps"], "var_eps"),
        _fnode("Sqrt", ["var_eps"], "rms"),
        _fnode("Div", ["hidden_states", "rms"], "normed"),
        _fnode("Mul", ["normed", "weight"], "return_val"),
    ]
    # indices [B, H, S, 3] = (b, h, position_ids[b, s]); ScatterND wraps position -1 to slot L-1.
    scatter_body = [
        _fnode("Shape", ["data"], "bh_1d", start=0, end=2),
        _fnode("Shape", ["position_ids"], "s_1d", start=1, end=2),
        _fconst("one_1d", np.array([1], i64)),
        _fnode("Concat", ["bh_1d", "s_1d", "one_1d"], "exp_shape", axis=0),
        _fconst("zero", np.array(0, i64)),
        _fconst("one", np.array(1, i64)),
    ]
    for t, dim, axes in (("b", 0, [1, 2, 3]), ("h", 1, [0, 2, 3])):
        scatter_body += [
            _fnode("Shape", ["data"], f"{t}_1d", start=dim, end=dim + 1),
            _fnode("Squeeze", [f"{t}_1d"], f"{t}_len"),
            _fnode("Range", ["zero", f"{t}_len", "one"], f"{t}_range"),
            _fconst(f"{t}_axes", np.array(axes, i64)),
            _fnode("Unsqueeze", [f"{t}_range", f"{t}_axes"], f"{t}_col"),
            _fnode("Expand", [f"{t}_col", "exp_shape"], f"{t}_idx"),
        ]
    scatter_body += [
        _fconst("p_axes", np.array([1, 3], i64)),
        _fnode("Unsqueeze", ["position_ids", "p_axes"], "p_col"),
        _fnode("Expand", ["p_col", "exp_shape"], "p_idx"),
        _fnode("Concat", ["b_idx", "h_idx", "p_idx"], "indices", axis=3),
        _fnode("ScatterND", ["data", "indices", "updates"], "return_val"),
    ]
    gather_body = [
        _fnode("Shape", ["data"], "bh_1d", start=0, end=2),
        _fconst("one_1d", np.array([1], i64)),
        _fnode("Reshape", ["comp_ctx_len", "one_1d"], "c_1d"),
        _fnode("Concat", ["bh_1d", "c_1d"], "exp_shape", axis=0),
        _fnode("Expand", ["ctx_indices", "exp_shape"], "idx_bhc"),
        _fconst("minus_one_1d", np.array([-1], i64)),
        _fnode("Unsqueeze", ["idx_bhc", "minus_one_1d"], "idx"),
        _fnode("GatherND", ["data", "idx"], "return_val", batch_dims=2),
    ]
    return [
        _function(QTI_DOMAIN, "CustomRMSNorm", ["hidden_states", "weight"], rms_body),
        _function(QAIC_DOMAIN, "CtxScatter", ["data", "position_ids", "updates"], scatter_body),
        _function(QAIC_DOMAIN, "CtxGather", ["data", "ctx_indices", "comp_ctx_len"], gather_body),
    ]


def _rope_tables(spec: ExportSpec) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """cos/sin tables ``[max_position, head_dim]`` (theta 10000, rotate_half layout)."""
    inv_freq = 1.0 / (_ROPE_THETA ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim))
    freqs = np.outer(np.arange(spec.max_position, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


@dataclass(frozen=True)
class _Prefix:
    hidden: str
    cos: str
    sin: str
    mask: str


def _embeddings_and_rope(g: _Graph, spec: ExportSpec, rng: np.random.Generator) -> _Prefix:
    """Token embeddings, rope cos/sin gathered by position, and the causal mask [B,1,S,ctx]."""
    emb = g.normal("model.embed_tokens.weight", spec.vocab_size, spec.hidden_size)
    hidden = g.op("Gather", [emb, "input_ids"], "/model/embed_tokens")
    cos_t, sin_t = _rope_tables(spec)
    cos_w = g.weight("model.cos_cached", cos_t)
    sin_w = g.weight("model.sin_cached", sin_t)

    s = "/model"
    ctx = g.op("Gather", [g.op("Shape", ["past_key.0"], s), g.const(s, np.array(2, np.int64))], s, axis=0)
    slots = g.op("Range", [g.const(s, np.array(0, np.int64)), ctx, g.const(s, np.array(1, np.int64))], s)
    slots = g.op("Reshape", [slots, g.ints(s, 1, 1, -1)], s)
    query_pos = g.op("Unsqueeze", ["position_ids", g.ints(s, -1)], s)
    mask = g.op("Greater", [slots, query_pos], s)
    mask = g.op("Unsqueeze", [mask, g.ints(s, 1)], s)
    cos = g.op("Unsqueeze", [g.op("Gather", [cos_w, "position_ids"], s, axis=0), g.ints(s, 1)], s)
    sin = g.op("Unsqueeze", [g.op("Gather", [sin_w, "position_ids"], s, axis=0), g.ints(s, 1)], s)
    return _Prefix(hidden=hidden, cos=cos, sin=sin, mask=mask)


def _rms_norm(g: _Graph, spec: ExportSpec, x: str, scope: str) -> str:
    """``CustomRMSNorm``; ones weight named after ``scope`` (``/model/norm`` -> ``model.norm.weight``)."""
    w = g.ones(scope[1:].replace("/", ".") + ".weight", spec.hidden_size)
    return g.op("CustomRMSNorm", [x, w], scope, domain=QTI_DOMAIN, epsilon=float(spec.rms_eps))


def _apply_rope(g: _Graph, spec: ExportSpec, x: str, pre: _Prefix, scope: str) -> str:
    """``x * cos + rotate_half(x) * sin`` for ``x`` in ``[B, heads, S, D]``."""
    half = spec.head_dim // 2
    axis = g.ints(scope, 3)
    x1 = g.op("Slice", [x, g.ints(scope, 0), g.ints(scope, half), axis], scope)
    x2 = g.op("Slice", [x, g.ints(scope, half), g.ints(scope, spec.head_dim), axis], scope)
    rotated = g.op("Concat", [g.op("Neg", [x2], scope), x1], scope, axis=-1)
    return g.op("Add", [g.op("Mul", [x, pre.cos], scope), g.op("Mul", [rotated, pre.sin], scope)], scope)


def _repeat_kv(g: _Graph, spec: ExportSpec, x: str, scope: str) -> str:
    """``[B, kv_heads, C, D]`` -> ``[B, heads, C, D]`` (each KV head repeated consecutively)."""
    n_rep = spec.num_heads // spec.num_kv_heads
    if n_rep == 1:
        return x
    x = g.op("Unsqueeze", [x, g.ints(scope, 2)], scope)
    x = g.op("Expand", [x, g.ints(scope, 1, 1, n_rep, 1, 1)], scope)
    return g.op("Reshape", [x, g.ints(scope, 0, spec.num_heads, -1, spec.head_dim)], scope)


def _attention(
    g: _Graph, spec: ExportSpec, rng: np.random.Generator, layer: int, x: str, pre: _Prefix
) -> str:
    """Self-attention of one layer over the contiguous KV cache; returns the o_proj output."""
    s = f"/model/layers.{layer}/self_attn"
    w = f"model.layers.{layer}.self_attn"
    h, kvh, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    wq = g.normal(f"{w}.q_proj.weight", spec.hidden_size, h * d)
    wk = g.normal(f"{w}.k_proj.weight", spec.hidden_size, kvh * d)
    wv = g.normal(f"{w}.v_proj.weight", spec.hidden_size, kvh * d)
    wo = g.normal(f"{w}.o_proj.weight", h * d, spec.hidden_size)

    def heads(proj: str, weight: str, n: int) -> str:
        y = g.op("MatMul", [x, weight], f"{s}/{proj}")
        y = g.op("Reshape", [y, g.ints(s, 0, 0, n, d)], s)
        return g.op("Transpose", [y], s, perm=[0, 2, 1, 3])

    q = _apply_rope(g, spec, heads("q_proj", wq, h), pre, s)
    k = _apply_rope(g, spec, heads("k_proj", wk, kvh), pre, s)
    v = heads("v_proj", wv, kvh)

    def scatter(past: str, new: str) -> str:
        out = f"{past}.{layer}_RetainedState"
        return g.op("CtxScatter", [f"{past}.{layer}", "position_ids", new], s, domain=QAIC_DOMAIN, output=out)

    k_cache, v_cache = scatter("past_key", k), scatter("past_value", v)

    ctx_len = g.op("Gather", [g.op("Shape", [k_cache], s), g.const(s, np.array(2, np.int64))], s, axis=0)
    slots = g.op("Range", [g.const(s, np.array(0, np.int64)), ctx_len, g.const(s, np.array(1, np.int64))], s)
    slots = g.op("Reshape", [slots, g.ints(s, 1, 1, -1)], s)
    max_pos = g.op("ReduceMax", ["position_ids"], s, axes=[1], keepdims=1)
    max_pos = g.op("Unsqueeze", [max_pos, g.ints(s, 2)], s)
    invalid = g.op("Greater", [slots, max_pos], s)
    sentinel = g.const(s, np.array(INT32_MAX_SENTINEL, np.int64))
    ctx_indices = g.op("Where", [invalid, sentinel, slots], s)
    k_all = g.op("CtxGather", [k_cache, ctx_indices, ctx_len], s, domain=QAIC_DOMAIN)
    v_all = g.op("CtxGather", [v_cache, ctx_indices, ctx_len], s, domain=QAIC_DOMAIN)
    invalid_v = g.op("Unsqueeze", [invalid, g.ints(s, -1)], s)
    v_all = g.op("Where", [invalid_v, g.const(s, np.array(0.0, np.float32)), v_all], s)

    k_all = _repeat_kv(g, spec, k_all, s)
    v_all = _repeat_kv(g, spec, v_all, s)
    scores = g.op("MatMul", [q, g.op("Transpose", [k_all], s, perm=[0, 1, 3, 2])], s)
    scores = g.op("Mul", [scores, g.const(s, np.array(1.0 / math.sqrt(d), np.float32))], s)
    scores = g.op("Where", [pre.mask, g.const(s, np.array(-np.inf, np.float32)), scores], s)
    probs = g.op("Softmax", [scores], s, axis=-1)
    out = g.op("Transpose", [g.op("MatMul", [probs, v_all], s)], s, perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, g.ints(s, 0, 0, h * d)], s)
    return g.op("MatMul", [out, wo], f"{s}/o_proj")


def _mlp(g: _Graph, spec: ExportSpec, rng: np.random.Generator, layer: int, x: str) -> str:
    """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))``."""
    s = f"/model/layers.{layer}/mlp"
    w = f"model.layers.{layer}.mlp"
    wg = g.normal(f"{w}.gate_proj.weight", spec.hidden_size, spec.intermediate_size)
    wu = g.normal(f"{w}.up_proj.weight", spec.hidden_size, spec.intermediate_size)
    wd = g.normal(f"{w}.down_proj.weight", spec.intermediate_size, spec.hidden_size)
    gate = g.op("MatMul", [x, wg], f"{s}/gate_proj")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{s}/act_fn")], f"{s}/act_fn")
    up = g.op("MatMul", [x, wu], f"{s}/up_proj")
    return g.op("MatMul", [g.op("Mul", [act, up], s), wd], f"{s}/down_proj")


def _decoder_layer(
    g: _Graph, spec: ExportSpec, rng: np.random.Generator, layer: int, x: str, pre: _Prefix
) -> str:
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""
    s = f"/model/layers.{layer}"
    normed = _rms_norm(g, spec, x, f"{s}/input_layernorm")
    x = g.op("Add", [x, _attention(g, spec, rng, layer, normed, pre)], s)
    normed = _rms_norm(g, spec, x, f"{s}/post_attention_layernorm")
    return g.op("Add", [x, _mlp(g, spec, rng, layer, normed)], s)


def _final_norm_and_head(g: _Graph, spec: ExportSpec, rng: np.random.Generator, x: str) -> str:
    """Final norm, pick the hidden state at ``argmax(position_ids)`` per row, lm_head -> ``logits``."""
    x = _rms_norm(g, spec, x, "/model/norm")
    lm_head = g.normal("lm_head.weight", spec.hidden_size, spec.vocab_size)
    s = ""
    last = g.op("ArgMax", ["position_ids"], s, axis=1, keepdims=1)
    last = g.op("Unsqueeze", [last, g.ints(s, -1)], s)
    x = g.op("GatherND", [x, last], s, batch_dims=1)
    return g.op("MatMul", [x, lm_head], "/lm_head", output="logits")


def build_qeff_export(spec: ExportSpec = ExportSpec(), sparse_data: str | None = None) -> onnx.ModelProto:
    """Build the QEfficient-style contiguous-KV export described by ``spec``.

    Raises ``ValueError`` if ``spec`` is invalid. The result passes
    ``onnx.checker.check_model(model, full_check=True)``; to run it in onnxruntime, override the
    output of every scalar int64 ``Constant`` equal to :data:`INT32_MAX_SENTINEL` (one per layer,
    the ``Where`` feeding ``CtxGather`` input 1) with ``0`` via ``SessionOptions.add_initializer``.
    """
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    g = _Graph(rng, sparse_data)
    pre = _embeddings_and_rope(g, spec, rng)
    x = pre.hidden
    for layer in range(spec.num_layers):
        x = _decoder_layer(g, spec, rng, layer, x, pre)
    _final_norm_and_head(g, spec, rng, x)

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    kv_shape: list[str | int] = ["batch_size", spec.num_kv_heads, "ctx_len", spec.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "seq_len"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch_size", "seq_len"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", 1, spec.vocab_size])]
    for layer in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{layer}", f32, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"past_{kind}.{layer}_RetainedState", f32, kv_shape))

    graph = helper.make_graph(g.nodes, "qeff_causal_lm", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid(d, v) for d, v in (("", _OPSET), (QAIC_DOMAIN, 1), (QTI_DOMAIN, 1))
        ],
        functions=_local_functions(),
        producer_name="paged_rewrite.builder",
        producer_version="1",
    )
    model.ir_version = _IR_VERSION
    if sparse_data is not None:
        model.metadata_props.add(key="paged_rewrite.builder.external_bytes", value=str(g.external_bytes))
    return model


def write_qeff_export(
    path: str | os.PathLike[str], spec: ExportSpec = ExportSpec(), sparse_weights: bool = False
) -> pathlib.Path:
    """Build the export for ``spec`` and save it; return the ``.onnx`` path.

    Parent directories are created. By default weights are embedded (one file, below the 2 GiB
    protobuf limit). With ``sparse_weights`` the weights live in ``<name>.data`` beside the model,
    written as a sparse file: a 70B-shaped export costs almost no disk and no time to write.
    """
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    data_name = out.with_suffix(".data").name if sparse_weights else None
    model = build_qeff_export(spec, sparse_data=data_name)
    if data_name is not None:
        with open(out.parent / data_name, "wb") as data:
            data.truncate(int(model.metadata_props[-1].value))
    out.write_bytes(model.SerializeToString())
    return out
