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

from collections.abc import Iterable
from functools import cache

import onnx
import onnx.inliner
from onnx import helper

from paged_rewrite.custom_ops.paged_ops import (
    PAGED_DOMAIN,
    PagedBlockAddress,
    PagedCtxGather,
    PagedCtxGatherPositions,
    PagedCtxScatter,
    PagedLogicalShape,
    PagedRowIndex,
    PagedWindowShape,
)
from paged_rewrite.custom_ops.vocabulary import op_vocabulary

# Every onnxscript function: the ops the rewrite calls, and the helpers they are written with.
SOURCES = (
    PagedBlockAddress,
    PagedRowIndex,
    PagedCtxScatter,
    PagedCtxGatherPositions,
    PagedCtxGather,
    PagedLogicalShape,
    PagedWindowShape,
)
# The ops a rewritten model may call, in the order they are emitted.
EMITTED_OPS = (
    "PagedCtxScatter",
    "PagedCtxGather",
    "PagedCtxGatherPositions",
    "PagedLogicalShape",
    "PagedWindowShape",
)
# QEfficient's compile/mdp_generator.py: the compiler inlines a local function below this size.
MAX_BODY_NODES = 100


def paged_function_protos(
    names: Iterable[str] = EMITTED_OPS, cache_type: int = onnx.TensorProto.FLOAT
) -> list[onnx.FunctionProto]:
    """The flat bodies of the named ops, for caches of element type ``cache_type`` (fresh copies,
    in ``EMITTED_OPS`` order)."""
    wanted = set(names)
    unknown = wanted - set(EMITTED_OPS)
    if unknown:
        raise ValueError(f"not an emitted paged op: {', '.join(sorted(unknown))}")
    protos = []
    for name, data in _flat_bodies():
        if name in wanted:
            proto = onnx.FunctionProto.FromString(data)
            _type_cast_like(proto, cache_type)
            protos.append(proto)
    return protos


def compiler_problems(function: onnx.FunctionProto) -> list[str]:
    """What keeps ``function`` from being a body the QAIC compiler is known to take, if anything."""
    problems = []
    if len(function.node) >= MAX_BODY_NODES:
        problems.append(f"{len(function.node)} nodes (the compiler inlines fewer than {MAX_BODY_NODES})")
    vocabulary = op_vocabulary()
    for node in function.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"calls {node.domain}::{node.op_type}")
        elif ("ai.onnx", node.op_type) not in vocabulary:
            problems.append(f"uses {node.op_type}, which no QEfficient export of the corpus uses")
    return problems


@cache
def _flat_bodies() -> tuple[tuple[str, bytes], ...]:
    # Translating the onnxscript functions and expanding them is the slow part: once per process.
    library = [source.to_function_proto() for source in SOURCES]
    by_name = {proto.name: proto for proto in library}
    bodies = []
    for name in EMITTED_OPS:
        data = _flatten(by_name[name], library).SerializeToString()
        typed = onnx.FunctionProto.FromString(data)
        _type_cast_like(typed, onnx.TensorProto.FLOAT)
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
        key = (node.domain, node.op_type, tuple(inputs), attributes)
        if key in first and not outputs & set(node.output):
            renamed.update(zip(node.output, first[key], strict=True))
            continue
        first.setdefault(key, list(node.output))
        kept.append(node)
    return kept


def _drop_unused(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop nodes whose results nothing reads (a helper output the caller ignores)."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if needed & set(node.output):
            needed.update(node.input)
            kept.append(node)
    return kept[::-1]


def _type_cast_like(function: onnx.FunctionProto, cache_type: int) -> None:
    """``CastLike(x, pool)`` -> ``Cast(x, to=cache_type)``: the sources take zeros of the pool's
    type; QEfficient's op vocabulary has ``Cast`` only, and every cache of a model has one type."""
    for node in function.node:
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx"):
            assert node.input[1] == function.input[0], f"{function.name}: CastLike must follow the pool"
            node.op_type = "Cast"
            del node.input[1:]
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("to", cache_type))
