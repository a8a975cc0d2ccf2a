"""The one place tests build models: QEfficient-style exports through the project's builder,
and the malformed variants the refusal tests need, each derived from a real export."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from paged_rewrite.builder import ExportSpec, build_qeff_export


def qeff_export(path: Path, **spec: int) -> Path:
    """A QEfficient-style contiguous export with the given ``ExportSpec`` fields."""
    onnx.save(build_qeff_export(ExportSpec(**spec)), path)
    return path


def no_cache_model(path: Path) -> Path:
    """A valid ONNX model with no KV cache at all."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "no_cache", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def with_renamed_op(source: Path, path: Path, old: str, new: str) -> Path:
    """``source`` with op ``old`` renamed ``new``, calls and definition (e.g. an unknown Ctx
    variant, as a new exporter release would ship it: with its model-local function)."""
    model = onnx.load(source)
    for node in model.graph.node:
        if node.op_type == old:
            node.op_type = new
    for function in model.functions:
        if function.name == old:
            function.name = new
    onnx.save(model, path)
    return path


def with_input_dim(source: Path, path: Path, name: str, axis: int, value: int | str) -> Path:
    """``source`` with one dim of graph input ``name`` changed (e.g. caches that disagree)."""
    model = onnx.load(source)
    dim = next(i for i in model.graph.input if i.name == name).type.tensor_type.shape.dim[axis]
    if isinstance(value, int):
        dim.dim_value = value
    else:
        dim.dim_param = value
    onnx.save(model, path)
    return path


def concat_cache_model(path: Path) -> Path:
    """A dynamic-cache decoder step: ``present = Concat(past, new, axis=2)`` (no static cache)."""
    past = helper.make_tensor_value_info("past_key.0", TensorProto.FLOAT, ["batch", 2, "past_len", 16])
    new = helper.make_tensor_value_info("key", TensorProto.FLOAT, ["batch", 2, "seq_len", 16])
    present = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 2, "total", 16])
    node = helper.make_node(
        "Concat", ["past_key.0", "key"], ["present.0.key"], axis=2, name="/layers.0/Concat"
    )
    graph = helper.make_graph([node], "dynamic_cache", [past, new], [present])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path
