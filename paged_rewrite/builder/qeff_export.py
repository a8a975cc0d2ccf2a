"""Deterministic builder of QEfficient-style KV-cache causal-LM ONNX exports.

The graph is a tiny random-weight Llama-like decoder that follows the conventions of the
QEfficient exports (``Ctx*`` / ``CustomRMSNorm`` model-local functions, ``past_key.{i}`` /
``past_key.{i}_RetainedState`` I/O, position ``-1`` for padding, logits only for the token at
``argmax(position_ids)`` of each row, the INT32_MAX sentinel). ``ExportSpec`` picks the kind of
export, as QEfficient's flags do:

* default: the decode graph (``CtxScatter`` + ``CtxGather``), which also prefills in chunks;
* ``prefill_only``: the prefill graph of disaggregated serving (``CtxScatter`` only, attention
  within the chunk); with the same seed it holds the same weights as the decode graph;
* ``continuous_batching``: caches ``[full_batch_size, ...]`` shared by the requests, an input
  ``batch_index`` ``[batch_size, 1]`` naming each request row's cache row, ``*CB`` ops;
* ``blocked_kv_num_blocks = n``: the context read in ``n`` blocks (``CtxGatherBlockedKV`` or,
  with continuous batching, ``CtxGatherBlockedKVCB``);
* ``subfunctions``: each decoder layer is a call of one shared model-local function
  (``QEffLlamaDecoderLayer``) holding its cache ops, as ``use_onnx_subfunctions`` exports;
* ``sliding_window = W``: layer 0 is a sliding-window layer whose cache is a ring buffer of
  symbolic length ``sliding_window`` (as gpt-oss exports it), ``W`` being the value to bind;
* ``ccl``: compute-context-length, an input ``comp_ctx_lengths`` ``[comp_ctx_lengths]`` whose
  length ``L`` bounds every full-context read to slots ``[0, L)`` (``attention.py``);
* ``num_logits_to_keep``: the speculative-decoding target model (TLM), an input
  ``num_logits_to_keep`` ``[n, 1]``; logits ``[batch, n, vocab]`` of each row's last ``n``
  positions (``layers.final_norm_and_head``).

The kinds combine freely, except ``prefill_only`` with BlockedKV or CCL (there is no read to
block or bound), and CCL with BlockedKV.

Layout of the main graph (node names follow the torch exporter style ``{scope}/{Op}_{k}``, the
output of a node is ``{node name}_output_0``):

* ``/model/...``                       embeddings, rope cos/sin, attention masks (computed once);
* ``/model/layers.{i}/self_attn/...``  attention of layer ``i`` (``attention.py``);
* ``/model/layers.{i}/mlp/...``        SiLU-gated MLP of layer ``i``;
* ``/model/norm/CustomRMSNorm``, ``/...`` (row selection), ``/lm_head/MatMul`` -> ``logits``.

With ``subfunctions`` the layers' nodes live in the layer functions instead, and the main graph
calls them as ``/model/layers.{i}/QEffLlamaDecoderLayer``.

Projection weights are stored as ``[in_features, out_features]`` (right operand of ``MatMul``).
Everything is emitted in a fixed order, so the same spec always serializes to the same bytes.
Build time is linear in ``num_layers``.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass, fields

import numpy as np
import onnx
from onnx import TensorProto, helper

from paged_rewrite.builder import layers
from paged_rewrite.builder.attention import INT32_MAX_SENTINEL, attention
from paged_rewrite.builder.functions import OPSET, QAIC_DOMAIN, QTI_DOMAIN, local_functions
from paged_rewrite.builder.graph_builder import GraphBuilder
from paged_rewrite.builder.ring import RING_LAYER
from paged_rewrite.builder.subfunctions import LAYER_DOMAIN, layers_as_functions

__all__ = [
    "INT32_MAX_SENTINEL",
    "QAIC_DOMAIN",
    "QTI_DOMAIN",
    "ExportSpec",
    "build_qeff_export",
    "write_qeff_export",
]

_IR_VERSION = 8
_FLAGS = ("prefill_only", "continuous_batching", "subfunctions", "ccl", "num_logits_to_keep")
_MAY_BE_ZERO = ("seed", "blocked_kv_num_blocks", "sliding_window")


@dataclass(frozen=True)
class ExportSpec:
    """Architecture, seed and export kind of the generated model (all sizes must be positive).

    ``prefill_only``: the prefill graph of disaggregated serving, QEfficient's
    ``export(prefill_only=True)``: K/V written with ``CtxScatter``, never read back; each chunk
    attends only to itself, so a prompt is prefilled in one chunk.
    ``continuous_batching``: QEfficient's ``continuous_batching=True``.
    ``blocked_kv_num_blocks``: QEfficient's ``qaic_config={"num_kv_blocks": n}`` (BlockedKV):
    the context is read in ``n`` blocks of ``ceil(ctx_len / n)`` positions; 0 reads it whole.
    ``subfunctions``: QEfficient's ``use_onnx_subfunctions=True`` (``subfunctions.py``).
    ``sliding_window``: 0, or the window ``W`` of layer 0, a ring buffer ``[rows, kv_heads,
    sliding_window, head_dim]`` (``ring.py``). The graph takes the window from the buffer's
    length, so ``W`` appears only in the metadata (``paged_rewrite.builder.sliding_window``): run
    and rewrite the model with the dim ``sliding_window = W``. Needs a full-context layer too.
    ``ccl``: QEfficient's ``qaic_config={"ccl_enabled": True}``: input ``comp_ctx_lengths``
    int64 ``[comp_ctx_lengths]``, of which only the length ``L`` is read. Each full-context
    layer slices the attention mask to its first ``L`` slots and reads those slots only
    (``comp_ctx_len``, the last operand of ``CtxGather`` / ``CtxGatherCB``, is ``L`` clamped
    to the cache length); writes still address the whole cache. A ring layer reads its whole
    ring. Needs a whole-context read: not with ``prefill_only`` or BlockedKV.
    ``num_logits_to_keep``: QEfficient's ``qaic_config={"speculative_model_type": "target"}``:
    input ``num_logits_to_keep`` int64 ``[n, 1]`` (only ``n`` is read), logits
    ``[batch_size, n, vocab]`` of positions ``max(0, last - n + 1) ..`` of each row, ``last``
    being the row's ``argmax(position_ids)``.
    Models of one seed hold the same weights whatever their kind.
    """

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
    prefill_only: bool = False
    continuous_batching: bool = False
    blocked_kv_num_blocks: int = 0
    subfunctions: bool = False
    sliding_window: int = 0
    ccl: bool = False
    num_logits_to_keep: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` if any field is out of range or inconsistent."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _FLAGS:
                if not isinstance(value, bool):
                    raise ValueError(f"ExportSpec.{f.name} must be a bool, got {value!r}")
                continue
            if f.name == "rms_eps":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"ExportSpec.rms_eps must be a float, got {value!r}")
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(f"ExportSpec.rms_eps must be finite and > 0, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ExportSpec.{f.name} must be an int, got {value!r}")
            minimum = 0 if f.name in _MAY_BE_ZERO else 1
            if value < minimum:
                raise ValueError(f"ExportSpec.{f.name} must be >= {minimum}, got {value}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ExportSpec.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"ExportSpec.head_dim must be even for rotate_half rope, got {self.head_dim}")
        if self.prefill_only and self.blocked_kv_num_blocks:
            raise ValueError(
                "ExportSpec.blocked_kv_num_blocks needs a cache read; a prefill_only graph has none"
            )
        if self.ccl and (self.prefill_only or self.blocked_kv_num_blocks):
            other = "prefill_only" if self.prefill_only else "blocked_kv_num_blocks"
            raise ValueError(f"ExportSpec.ccl bounds a whole-context read; it does not combine with {other}")
        if self.sliding_window and self.num_layers < 2:
            raise ValueError(
                "ExportSpec.sliding_window makes layer 0 a ring buffer; it needs num_layers >= 2 "
                f"(a full-context layer beside it), got {self.num_layers}"
            )


def _decoder_layer(g: GraphBuilder, spec: ExportSpec, layer: int, x: str, pre: layers.Prefix) -> str:
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""
    s = f"/model/layers.{layer}"
    normed = layers.rms_norm(g, spec, x, f"{s}/input_layernorm")
    x = g.op("Add", [x, attention(g, spec, layer, normed, pre)], s)
    normed = layers.rms_norm(g, spec, x, f"{s}/post_attention_layernorm")
    return g.op("Add", [x, layers.mlp(g, spec, layer, normed)], s)


def _graph_io(spec: ExportSpec) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Inputs and outputs in QEfficient's order (``batch_index``, ``comp_ctx_lengths``,
    ``num_logits_to_keep`` after the caches)."""
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    cache_rows = "full_batch_size" if spec.continuous_batching else "batch_size"
    inputs = [
        helper.make_tensor_value_info("input_ids", i64, ["batch_size", "seq_len"]),
        helper.make_tensor_value_info("position_ids", i64, ["batch_size", "seq_len"]),
    ]
    kept: str | int = "num_logits_to_keep" if spec.num_logits_to_keep else 1
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", kept, spec.vocab_size])]
    for layer in range(spec.num_layers):
        length = "sliding_window" if spec.sliding_window and layer == RING_LAYER else "ctx_len"
        kv_shape: list[str | int] = [cache_rows, spec.num_kv_heads, length, spec.head_dim]
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}.{layer}", f32, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"past_{kind}.{layer}_RetainedState", f32, kv_shape))
    if spec.continuous_batching:
        inputs.append(helper.make_tensor_value_info("batch_index", i64, ["batch_size", 1]))
    if spec.ccl:
        inputs.append(helper.make_tensor_value_info("comp_ctx_lengths", i64, ["comp_ctx_lengths"]))
    if spec.num_logits_to_keep:
        inputs.append(helper.make_tensor_value_info("num_logits_to_keep", i64, ["num_logits_to_keep", 1]))
    return inputs, outputs


def build_qeff_export(spec: ExportSpec = ExportSpec(), sparse_data: str | None = None) -> onnx.ModelProto:
    """Build the QEfficient-style export described by ``spec``.

    Raises ``ValueError`` if ``spec`` is invalid. The result passes
    ``onnx.checker.check_model(model, full_check=True)``. To run it in onnxruntime, override the
    output of every scalar int64 ``Constant`` equal to :data:`INT32_MAX_SENTINEL` via
    ``SessionOptions.add_initializer`` (``paged_rewrite.runtime.sessions.sentinel_overrides``
    finds them): ``0`` where it feeds a read's indices, ``-1`` where it feeds a
    continuous-batching write's positions (one of each per layer).
    """
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    g = GraphBuilder(rng, sparse_data)
    pre = layers.embeddings_and_rope(g, spec)
    x = pre.hidden
    layer_functions: list[onnx.FunctionProto] = []
    if spec.subfunctions:
        x, layer_functions = layers_as_functions(g, spec, pre, _decoder_layer)
    else:
        for layer in range(spec.num_layers):
            x = _decoder_layer(g, spec, layer, x, pre)
    layers.final_norm_and_head(g, spec, x)

    inputs, outputs = _graph_io(spec)
    graph = helper.make_graph(g.nodes, "qeff_causal_lm", inputs, outputs, initializer=g.initializers)
    functions = local_functions(
        spec.continuous_batching, spec.prefill_only, spec.blocked_kv_num_blocks > 0, spec.sliding_window > 0
    )
    domains = [("", OPSET), (QAIC_DOMAIN, 1), (QTI_DOMAIN, 1)]
    if spec.subfunctions:
        domains.insert(1, (LAYER_DOMAIN, 1))
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(d, v) for d, v in domains],
        functions=layer_functions + functions,
        producer_name="paged_rewrite.builder",
        producer_version="1",
    )
    model.ir_version = _IR_VERSION
    if spec.sliding_window:
        model.metadata_props.add(key="paged_rewrite.builder.sliding_window", value=str(spec.sliding_window))
    if sparse_data is not None:  # last: write_qeff_export reads it there
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
