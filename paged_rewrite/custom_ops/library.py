"""The paged ops as a rewritten model ships them: flat function bodies built from the onnxscript
sources (``emit.py``) and shipped as package data (``paged_ops.onnxlib``), so a rewrite neither
imports onnxscript nor translates a function (``scripts/build_paged_ops.py`` writes the file; a
test rebuilds it from the sources and compares bytes)."""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from pathlib import Path

import onnx
from onnx import helper

from paged_rewrite.custom_ops.vocabulary import op_vocabulary
from paged_rewrite.domain import QEFF_DOMAIN

PAGED_DOMAIN = QEFF_DOMAIN  # the paged ops live beside the ops they replace
LIBRARY_FILE = Path(__file__).with_name("paged_ops.onnxlib")
# The ops a rewritten model may call, in the order they are emitted.
EMITTED_OPS = (
    "PagedWriteIndex",
    "PagedCtxScatter",
    "PagedReadIndex",
    "PagedReadIndexCCL",
    "PagedCtxGather",
    "PagedLogicalShape",
    "PagedWindowShape",
)
# The index ops: one per call for every cache that shares their operands (``passes/shared_index``);
# they read only the shape of the pool they are given.
INDEX_OPS = (
    "PagedWriteIndex",
    "PagedReadIndex",
    "PagedReadIndexCCL",
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
    for name, data in _shipped_bodies():
        if name in wanted:
            proto = onnx.FunctionProto.FromString(data)
            type_cast_like(proto, cache_type)
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
def _shipped_bodies() -> tuple[tuple[str, bytes], ...]:
    holder = onnx.ModelProto.FromString(LIBRARY_FILE.read_bytes())
    return tuple((f.name, f.SerializeToString()) for f in holder.functions)


def type_cast_like(function: onnx.FunctionProto, cache_type: int) -> None:
    """``CastLike(x, pool)`` -> ``Cast(x, to=cache_type)``: the sources take zeros of the pool's
    type; QEfficient's op vocabulary has ``Cast`` only, and every cache of a model has one type."""
    for node in function.node:
        if node.op_type == "CastLike" and node.domain in ("", "ai.onnx"):
            assert node.input[1] == function.input[0], f"{function.name}: CastLike must follow the pool"
            node.op_type = "Cast"
            del node.input[1:]
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("to", cache_type))
