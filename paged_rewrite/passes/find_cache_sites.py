"""Find the KV-cache sites of a QEfficient export: which graph inputs are caches, who writes
them, who reads them, and who looks at their shape.

Matching is by op and structure: a cache is the ``data`` input of a cache-write op
(``com.qualcomm.cloud::CtxScatter``) that is a graph input and whose result is a graph output
(the ``_RetainedState``). Names only order the layers. Everything else that touches a cache
must be a known read op or a ``Shape``; anything unknown is refused, naming the node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx_ir as ir

from paged_rewrite.errors import NoCacheError, UnsupportedPatternError

QEFF_DOMAIN = "com.qualcomm.cloud"
WRITE_OPS = frozenset({"CtxScatter"})
READ_OPS = frozenset({"CtxGather"})
# Ops of the QEfficient domain this tool knows but does not page (yet): refused by name.
KNOWN_UNSUPPORTED = frozenset({"CtxScatterCB", "CtxGatherCB", "CtxGatherBlockedKV"})
PAGED_OPS_PREFIX = "Paged"

Dim = int | str | None


@dataclass
class CacheTensor:
    """One layer's K or V cache: the graph input, its retained output and their users."""

    input: ir.Value
    output: ir.Value
    write: ir.Node
    reads: list[ir.Node] = field(default_factory=list)
    shape_reads: list[ir.Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.input.name)

    @property
    def shape(self) -> tuple[Dim, ...]:
        assert self.input.shape is not None
        return tuple(dim_value(d) for d in self.input.shape)

    @property
    def kv_heads(self) -> int:
        return int(self.shape[1])  # type: ignore[arg-type]

    @property
    def head_dim(self) -> int:
        return int(self.shape[3])  # type: ignore[arg-type]

    @property
    def layer(self) -> int:
        match = re.search(r"(\d+)$", self.name)
        return int(match.group(1)) if match else -1

    @property
    def kind(self) -> str:
        return "value" if "value" in self.name else "key"


@dataclass
class CacheSites:
    """Every cache of the model, in layer order, with the dims they share."""

    graph: ir.Graph
    tensors: list[CacheTensor]
    batch_dim: Dim
    length_dim: Dim


def dim_value(d: object) -> Dim:
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)
    return value if isinstance(value, (int, str)) else None


def _where(node: ir.Node) -> str:
    return f"node {node.name!r} ({node.domain or 'ai.onnx'}::{node.op_type})"


def _is_call_to_function_with_cache_ops(model: ir.Model, node: ir.Node) -> bool:
    function = model.functions.get((node.domain, node.op_type, node.overload))
    if function is None:
        return False
    return any(inner.domain == QEFF_DOMAIN and inner.op_type.startswith("Ctx") for inner in function)


def find_cache_sites(model: ir.Model) -> CacheSites:
    """Return the cache sites of ``model`` or raise a refusal that names the offending node."""
    graph = model.graph
    graph_inputs = set(graph.inputs)
    graph_outputs = set(graph.outputs)
    tensors: list[CacheTensor] = []
    for node in graph:
        if node.domain == QEFF_DOMAIN and node.op_type.startswith(PAGED_OPS_PREFIX):
            raise UnsupportedPatternError(f"{_where(node)}: the model is already paged")
        if node.domain == QEFF_DOMAIN and node.op_type in KNOWN_UNSUPPORTED:
            raise UnsupportedPatternError(f"{_where(node)}: this cache op variant is not supported yet")
        if (
            node.domain == QEFF_DOMAIN
            and node.op_type.startswith("Ctx")
            and not (node.op_type in WRITE_OPS or node.op_type in READ_OPS)
        ):
            raise UnsupportedPatternError(f"{_where(node)}: unknown cache op")
        if _is_call_to_function_with_cache_ops(model, node):
            raise UnsupportedPatternError(
                f"{_where(node)}: cache ops inside a local function are not supported yet"
            )
        if node.domain == QEFF_DOMAIN and node.op_type in WRITE_OPS:
            data, out = node.inputs[0], node.outputs[0]
            if data not in graph_inputs or out not in graph_outputs:
                raise UnsupportedPatternError(
                    f"{_where(node)}: the cache it writes is not a graph input returned as a graph output"
                )
            tensors.append(CacheTensor(input=data, output=out, write=node))
    if not tensors:
        raise NoCacheError("no KV cache found (no com.qualcomm.cloud::CtxScatter writes a graph input)")
    for tensor in tensors:
        _collect_users(tensor)
    tensors.sort(key=lambda t: (t.layer, t.kind))
    return CacheSites(graph=graph, tensors=tensors, **_shared_dims(tensors))


def _collect_users(tensor: CacheTensor) -> None:
    for user, _ in tensor.input.uses():
        if user is tensor.write:
            continue
        if user.op_type == "Shape" and user.domain == "":
            tensor.shape_reads.append(user)
        else:
            raise UnsupportedPatternError(f"{_where(user)} reads cache input {tensor.name!r} directly")
    for user, index in tensor.output.uses():
        if user.domain == QEFF_DOMAIN and user.op_type in READ_OPS and index == 0:
            tensor.reads.append(user)
        elif user.op_type == "Shape" and user.domain == "":
            tensor.shape_reads.append(user)
        else:
            raise UnsupportedPatternError(
                f"{_where(user)} uses the written cache {tensor.output.name!r} in an unknown way"
            )


def _shared_dims(tensors: list[CacheTensor]) -> dict[str, Dim]:
    first = tensors[0]
    for tensor in tensors:
        shape = tensor.input.shape
        dtype = tensor.input.dtype
        if shape is None or len(shape) != 4:
            raise UnsupportedPatternError(
                f"{_where(tensor.write)}: cache {tensor.name!r} must be rank 4 [batch, heads, len, head_dim]"
            )
        if dtype is None or not dtype.is_floating_point():
            raise UnsupportedPatternError(
                f"{_where(tensor.write)}: cache {tensor.name!r} is not a float tensor"
            )
        if not isinstance(tensor.shape[1], int) or not isinstance(tensor.shape[3], int):
            raise UnsupportedPatternError(
                f"{_where(tensor.write)}: cache {tensor.name!r} needs static heads and head_dim, "
                f"got {list(tensor.shape)}"
            )
        for axis, label in ((0, "batch"), (2, "length")):
            if tensor.shape[axis] != first.shape[axis]:
                raise UnsupportedPatternError(
                    f"{_where(tensor.write)}: cache {tensor.name!r} has {label} dim {tensor.shape[axis]!r} "
                    f"but {first.name!r} has {first.shape[axis]!r}"
                )
    return {"batch_dim": first.shape[0], "length_dim": first.shape[2]}
