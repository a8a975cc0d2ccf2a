"""The model-local functions of a QEfficient-style export: ``CustomRMSNorm`` and the ``Ctx*`` cache ops.

QEfficient exports its custom ops as functions whose bodies use only ai.onnx opset 17, so the
graph runs anywhere ONNX does. The bodies here follow the structure of QEfficient's (index tuples
``(batch, head, position)`` built with ``Expand`` and fed to one ``ScatterND`` / ``GatherND``),
which is what the rewrite checks a cache op's body against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import AttributeProto, NodeProto, helper, numpy_helper

from paged_rewrite.domain import QEFF_DOMAIN

QAIC_DOMAIN = QEFF_DOMAIN
"""Domain of the ``Ctx*`` cache ops."""
QTI_DOMAIN = "com.qti.aisw.onnx"
"""Domain of ``CustomRMSNorm``."""
OPSET = 17


def _node(op_type: str, inputs: list[str], output: str, **attrs: Any) -> NodeProto:
    return helper.make_node(op_type, inputs, [output], **attrs)


def _const(output: str, value: npt.NDArray[Any]) -> NodeProto:
    return _node("Constant", [], output, value=numpy_helper.from_array(value))


def _ints(output: str, *values: int) -> NodeProto:
    return _const(output, np.array(values, np.int64))


def _function(domain: str, name: str, inputs: list[str], nodes: list[NodeProto]) -> onnx.FunctionProto:
    """A function with one output ``return_val`` whose body imports only ai.onnx opset 17."""
    std = [helper.make_opsetid("", OPSET)]
    attrs = ["epsilon"] if name == "CustomRMSNorm" else None
    return helper.make_function(domain, name, inputs, ["return_val"], nodes, std, attributes=attrs)


def custom_rms_norm() -> onnx.FunctionProto:
    """``hidden_states / sqrt(mean(hidden_states^2) + epsilon) * weight`` over the last axis."""
    eps_node = helper.make_node("Constant", [], ["eps"])
    eps_node.attribute.append(
        AttributeProto(name="value_float", type=AttributeProto.FLOAT, ref_attr_name="epsilon")
    )
    body = [
        _node("Mul", ["hidden_states", "hidden_states"], "sq"),
        _node("ReduceMean", ["sq"], "variance", axes=[-1], keepdims=1),
        eps_node,
        _node("Add", ["variance", "eps"], "var_eps"),
        _node("Sqrt", ["var_eps"], "rms"),
        _node("Div", ["hidden_states", "rms"], "normed"),
        _node("Mul", ["normed", "weight"], "return_val"),
    ]
    return _function(QTI_DOMAIN, "CustomRMSNorm", ["hidden_states", "weight"], body)


def ctx_scatter() -> onnx.FunctionProto:
    """``CtxScatter(data, position_ids, updates)``: ``data[b, h, position_ids[b, s]] = updates[b, h, s]``.

    Index tuples ``[B, H, S, 3]`` = ``(b, h, position_ids[b, s])``; ScatterND wraps position -1
    (padding) to the last slot.
    """
    body = [
        _node("Shape", ["data"], "bh_1d", start=0, end=2),
        _node("Shape", ["position_ids"], "s_1d", start=1, end=2),
        _ints("one_1d", 1),
        _node("Concat", ["bh_1d", "s_1d", "one_1d"], "exp_shape", axis=0),
        _const("zero", np.array(0, np.int64)),
        _const("one", np.array(1, np.int64)),
    ]
    for t, dim, axes in (("b", 0, [1, 2, 3]), ("h", 1, [0, 2, 3])):
        body += [
            _node("Shape", ["data"], f"{t}_1d", start=dim, end=dim + 1),
            _node("Squeeze", [f"{t}_1d"], f"{t}_len"),
            _node("Range", ["zero", f"{t}_len", "one"], f"{t}_range"),
            _const(f"{t}_axes", np.array(axes, np.int64)),
            _node("Unsqueeze", [f"{t}_range", f"{t}_axes"], f"{t}_col"),
            _node("Expand", [f"{t}_col", "exp_shape"], f"{t}_idx"),
        ]
    body += [
        _const("p_axes", np.array([1, 3], np.int64)),
        _node("Unsqueeze", ["position_ids", "p_axes"], "p_col"),
        _node("Expand", ["p_col", "exp_shape"], "p_idx"),
        _node("Concat", ["b_idx", "h_idx", "p_idx"], "indices", axis=3),
        _node("ScatterND", ["data", "indices", "updates"], "return_val"),
    ]
    return _function(QAIC_DOMAIN, "CtxScatter", ["data", "position_ids", "updates"], body)


def ctx_gather() -> onnx.FunctionProto:
    """``CtxGather(data, ctx_indices, comp_ctx_len)``: ``out[b, h, k] = data[b, h, ctx_indices[b, ., k]]``
    for the first ``comp_ctx_len`` entries (``ctx_indices`` ``[B, 1 or H, C]`` is broadcast)."""
    body = [
        _node("Shape", ["data"], "bh_1d", start=0, end=2),
        _ints("one_1d", 1),
        _node("Reshape", ["comp_ctx_len", "one_1d"], "c_1d"),
        _node("Concat", ["bh_1d", "c_1d"], "exp_shape", axis=0),
        _node("Expand", ["ctx_indices", "exp_shape"], "idx_bhc"),
        _ints("minus_one_1d", -1),
        _node("Unsqueeze", ["idx_bhc", "minus_one_1d"], "idx"),
        _node("GatherND", ["data", "idx"], "return_val", batch_dims=2),
    ]
    return _function(QAIC_DOMAIN, "CtxGather", ["data", "ctx_indices", "comp_ctx_len"], body)


def ctx_gather_blocked_kv() -> onnx.FunctionProto:
    """``CtxGatherBlockedKV(data, ctx_indices)``: one BlockedKV block, ``ctx_indices`` ``[B, H, L]``
    (already expanded over heads, as ``GatherND`` with ``batch_dims=2`` requires)."""
    body = [
        _ints("minus_one_1d", -1),
        _node("Unsqueeze", ["ctx_indices", "minus_one_1d"], "idx"),
        _node("GatherND", ["data", "idx"], "return_val", batch_dims=2),
    ]
    return _function(QAIC_DOMAIN, "CtxGatherBlockedKV", ["data", "ctx_indices"], body)


def _cb_index_tuples(positions: str, positions_axes: list[int], length: list[NodeProto]) -> list[NodeProto]:
    """Nodes computing ``indices`` ``[B, H, C, 3]`` = ``(batch_index[b], h, positions[b, ., c])``.

    The batch is ``batch_index``'s (the request rows), not the cache's (``full_batch_size``
    slots): each request row addresses the cache row ``batch_index`` names. ``length`` must
    define ``c_1d``, the 1-D length of the position axis.
    """
    return [
        _node("Shape", ["batch_index"], "b_1d", start=0, end=1),
        _node("Shape", ["data"], "h_1d", start=1, end=2),
        *length,
        _ints("one_1d", 1),
        _node("Concat", ["b_1d", "h_1d", "c_1d", "one_1d"], "exp_shape", axis=0),
        _ints("b_axes", 2, 3),
        _node("Unsqueeze", ["batch_index", "b_axes"], "b_col"),
        _node("Expand", ["b_col", "exp_shape"], "b_idx"),
        _const("zero", np.array(0, np.int64)),
        _const("one", np.array(1, np.int64)),
        _node("Squeeze", ["h_1d"], "h_len"),
        _node("Range", ["zero", "h_len", "one"], "h_range"),
        _ints("h_axes", 0, 2, 3),
        _node("Unsqueeze", ["h_range", "h_axes"], "h_col"),
        _node("Expand", ["h_col", "exp_shape"], "h_idx"),
        _ints("p_axes", *positions_axes),
        _node("Unsqueeze", [positions, "p_axes"], "p_col"),
        _node("Expand", ["p_col", "exp_shape"], "p_idx"),
        _node("Concat", ["b_idx", "h_idx", "p_idx"], "indices", axis=3),
    ]


def ctx_scatter_cb() -> onnx.FunctionProto:
    """``CtxScatterCB(data, batch_index, position_ids, updates)``: continuous batching's write,
    ``data[batch_index[b], h, position_ids[b, s]] = updates[b, h, s]``."""
    length = [_node("Shape", ["position_ids"], "c_1d", start=1, end=2)]
    body = [
        *_cb_index_tuples("position_ids", [1, 3], length),
        _node("ScatterND", ["data", "indices", "updates"], "return_val"),
    ]
    return _function(QAIC_DOMAIN, "CtxScatterCB", ["data", "batch_index", "position_ids", "updates"], body)


def ctx_gather_cb() -> onnx.FunctionProto:
    """``CtxGatherCB(data, batch_index, ctx_indices, comp_ctx_len)``: continuous batching's read of
    the cache row ``batch_index[b]``, ``ctx_indices`` ``[B, 1 or H, C]``.

    As in QEfficient's body, the read length is ``ctx_indices``'s own (axis 2); ``comp_ctx_len``
    is part of the signature only.
    """
    length = [_node("Shape", ["ctx_indices"], "c_1d", start=2, end=3)]
    body = [
        *_cb_index_tuples("ctx_indices", [3], length),
        _node("GatherND", ["data", "indices"], "return_val"),
    ]
    inputs = ["data", "batch_index", "ctx_indices", "comp_ctx_len"]
    return _function(QAIC_DOMAIN, "CtxGatherCB", inputs, body)


def ctx_gather_blocked_kv_cb() -> onnx.FunctionProto:
    """``CtxGatherBlockedKVCB(data, batch_index, ctx_indices)``: one BlockedKV block of the cache row
    ``batch_index[b]``, ``ctx_indices`` ``[B, 1 or H, L]``."""
    length = [_node("Shape", ["ctx_indices"], "c_1d", start=2, end=3)]
    body = [
        *_cb_index_tuples("ctx_indices", [3], length),
        _node("GatherND", ["data", "indices"], "return_val"),
    ]
    inputs = ["data", "batch_index", "ctx_indices"]
    return _function(QAIC_DOMAIN, "CtxGatherBlockedKVCB", inputs, body)


def local_functions(
    continuous_batching: bool, prefill_only: bool, blocked_kv: bool, ring: bool = False
) -> list[onnx.FunctionProto]:
    """The functions a model of that kind calls, and no others (as QEfficient emits them). A ring
    layer is read whole even when the other layers use BlockedKV."""
    functions = [custom_rms_norm(), ctx_scatter_cb() if continuous_batching else ctx_scatter()]
    if prefill_only:
        return functions
    if blocked_kv:
        functions.append(ctx_gather_blocked_kv_cb() if continuous_batching else ctx_gather_blocked_kv())
    if ring or not blocked_kv:
        functions.append(ctx_gather_cb() if continuous_batching else ctx_gather())
    return functions
