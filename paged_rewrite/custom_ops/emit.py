"""Turn the onnxscript sources of the paged ops into the function bodies a model ships.

The sources stay factored for reading (``PagedBlockAddress`` is written once); the QAIC
compiler, though, lowers a model-local function op by op from its body, so what is emitted is
what a compiler team would write by hand:

- **flat**: every helper call is expanded into the calling body (``onnx.inliner`` on a scratch
  model), then identical nodes are merged and unused ones dropped, so a body that calls
  ``PagedBlockAddress`` and ``PagedRowIndex`` reads ``Shape(pool)`` once, not three times;
- **typed**: ``CastLike(x, pool)`` becomes ``Cast(x, to=<the caches' type>)``, since QEfficient's
  exports never use ``CastLike``;
- **checked**: no body may call a function, reach ``MAX_BODY_NODES`` nodes, or use an op
  outside QEfficient's own op vocabulary (``vocabulary.py``).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import onnx
import onnx.inliner
from onnx import helper

from paged_rewrite.custom_ops.library import EMITTED_OPS, PAGED_DOMAIN, compiler_problems, type_cast_like
from paged_rewrite.custom_ops.paged_ops import (
    PagedBlockAddress,
    PagedCtxGather,
    PagedCtxScatter,
    PagedLogicalShape,
    PagedReadIndex,
    PagedReadIndexCCL,
    PagedRowIndex,
    PagedWindowShape,
    PagedWriteIndex,
)

# Every onnxscript function: the ops the rewrite calls, and the helpers they are written with.
SOURCES = (
    PagedBlockAddress,
    PagedRowIndex,
    PagedWriteIndex,
    PagedCtxScatter,
    PagedReadIndex,
    PagedReadIndexCCL,
    PagedCtxGather,
    PagedLogicalShape,
    PagedWindowShape,
)


def build_library() -> bytes:
    """The shipped library (``library.LIBRARY_FILE``) as built from the sources: a ModelProto
    holding only the flat bodies, in ``EMITTED_OPS`` order. ``scripts/build_paged_ops.py`` writes
    it; a test builds it again and compares bytes, so the sources stay the spec."""
    holder = onnx.ModelProto()
    holder.functions.extend(onnx.FunctionProto.FromString(data) for _, data in _flat_bodies())
    data: bytes = holder.SerializeToString(deterministic=True)
    return data


@cache
def _flat_bodies() -> tuple[tuple[str, bytes], ...]:
    # Translating the onnxscript functions and expanding them is the slow part: once per process.
    library = [source.to_function_proto() for source in SOURCES]
    by_name = {proto.name: proto for proto in library}
    bodies = []
    for name in EMITTED_OPS:
        data = _flatten(by_name[name], library).SerializeToString()
        typed = onnx.FunctionProto.FromString(data)
        type_cast_like(typed, onnx.TensorProto.FLOAT)
        problems = compiler_problems(typed)
        if problems:  # a bug of ours in paged_ops.py: no model may ship it
            raise AssertionError(f"{name}: {'; '.join(problems)}")
        bodies.append((name, data))
    return tuple(bodies)


def _flatten(function: onnx.FunctionProto, library: list[onnx.FunctionProto]) -> onnx.FunctionProto:
    """``function`` with every call of a library function expanded in place."""
    untyped = [helper.make_value_info(name, onnx.TypeProto()) for name in function.input]
    results = [helper.make_value_info(name, onnx.TypeProto()) for name in function.output]
    call = helper.make_node(
        function.name, list(function.input), list(function.output), domain=function.domain
    )
    scratch = helper.make_model(
        helper.make_graph([call], "scratch", untyped, results),
        opset_imports=[*function.opset_import],
        functions=library,
    )
    nodes = onnx.inliner.inline_local_functions(scratch).graph.node
    flat = onnx.FunctionProto()
    flat.CopyFrom(function)
    del flat.node[:]
    flat.node.extend(_drop_unused(_merge_duplicates(list(nodes), set(function.output)), set(function.output)))
    kept = [entry for entry in function.opset_import if entry.domain != PAGED_DOMAIN]
    del flat.opset_import[:]
    flat.opset_import.extend(kept)
    return flat


def _merge_duplicates(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Keep the first of identical nodes (same op, inputs and attributes): expanded helpers each
    recompute ``Shape(pool)``, the same constants and the same range checks."""
    first: dict[tuple[str, str, tuple[str, ...], bytes], list[str]] = {}
    renamed: dict[str, str] = {}
    kept = []
    for node in nodes:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                attribute.t.ClearField("name")  # a constant's tensor name says nothing about its value
        inputs = [renamed.get(name, name) for name in node.input]
        del node.input[:]
        node.input.extend(inputs)
        attributes = b"".join(a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name))
        if node.op_type == "Constant" and not node.domain:  # by value: value_int=1 is value=int64 1
            attributes = _constant_value(node) or attributes
        key = (node.domain, node.op_type, tuple(inputs), attributes)
        if key in first and not outputs & set(node.output):
            renamed.update(zip(node.output, first[key], strict=True))
            continue
        first.setdefault(key, list(node.output))
        kept.append(node)
    return kept


def _constant_value(node: onnx.NodeProto) -> bytes | None:
    """A ``Constant``'s value as ONNX type, shape and bytes, whichever attribute holds it; None for
    the forms not compared by value (strings, sparse tensors, types numpy cannot tell apart)."""
    (attribute,) = node.attribute
    scalar_kinds = {
        "value_int": onnx.TensorProto.INT64,
        "value_ints": onnx.TensorProto.INT64,
        "value_float": onnx.TensorProto.FLOAT,
        "value_floats": onnx.TensorProto.FLOAT,
    }
    if attribute.name == "value" and attribute.t.data_type in _BY_VALUE:
        data_type, value = attribute.t.data_type, onnx.numpy_helper.to_array(attribute.t)
    elif attribute.name in scalar_kinds:
        data_type = scalar_kinds[attribute.name]
        value = np.asarray(
            helper.get_attribute_value(attribute), dtype=helper.tensor_dtype_to_np_dtype(data_type)
        )
    else:
        return None
    return f"{data_type}{value.shape}".encode() + value.tobytes()


# Element types whose numpy array holds the value itself, one array type per ONNX type.
_BY_VALUE = {
    onnx.TensorProto.INT64,
    onnx.TensorProto.INT32,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.BOOL,
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
}


def _drop_unused(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop nodes whose results nothing reads (a helper output the caller ignores)."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if needed & set(node.output):
            needed.update(node.input)
            kept.append(node)
    return kept[::-1]
