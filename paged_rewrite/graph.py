"""A thin editing layer over the ONNX protobuf, for in-place rewrites of huge graphs.

The rewrite touches a few nodes per layer of graphs with tens of thousands of nodes. Decoding the
whole graph into a Python object model costs about 14x a plain ``onnx.load`` + ``onnx.save`` (see
docs/design.md), so the passes edit the ``ModelProto`` where it lies: a node keeps its output names
and becomes the paged op in place, and only the nodes that must be added are inserted. ``Body``
indexes one graph or function body (who consumes which value) and applies insertions in one pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Body:
    """The main graph or one function body: nodes, interface names and a consumer index."""

    def __init__(self, proto: onnx.GraphProto | onnx.FunctionProto) -> None:
        self.proto = proto
        self.is_function = isinstance(proto, onnx.FunctionProto)
        self.name = proto.name
        self._before: dict[int, list[onnx.NodeProto]] = {}
        self._producers: dict[str, onnx.NodeProto] | None = None
        self._consumers: dict[str, list[tuple[onnx.NodeProto, int]]] | None = None
        self._watched = False  # True: only the watched names are indexed

    def __iter__(self) -> Iterator[onnx.NodeProto]:
        return iter(self.proto.node)

    @property
    def input_names(self) -> list[str]:
        if isinstance(self.proto, onnx.FunctionProto):
            return list(self.proto.input)
        return [value.name for value in self.proto.input]

    @property
    def output_names(self) -> list[str]:
        if isinstance(self.proto, onnx.FunctionProto):
            return list(self.proto.output)
        return [value.name for value in self.proto.output]

    def watch(self, names: set[str]) -> None:
        """Index the consumers of ``names`` only, in one pass (a full index of a 70B graph costs
        more than the rest of the rewrite)."""
        index: dict[str, list[tuple[onnx.NodeProto, int]]] = {name: [] for name in names}
        for node in self.proto.node:
            for position, value in enumerate(node.input):
                users = index.get(value)
                if users is not None:
                    users.append((node, position))
        self._consumers = index
        self._watched = True

    def consumers(self, name: str) -> list[tuple[onnx.NodeProto, int]]:
        """``(node, input index)`` of every node of this body that reads ``name`` (a watched name,
        or any name if nothing was watched)."""
        if self._consumers is None:
            everything: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
            for node in self.proto.node:
                for position, value in enumerate(node.input):
                    if value:
                        everything.setdefault(value, []).append((node, position))
            self._consumers = everything
        if name not in self._consumers and self._watched:
            raise KeyError(
                f"{self.name or 'the graph'}: consumers of {name!r} were not indexed (watch it first)"
            )
        return self._consumers.get(name, [])

    def producers(self) -> dict[str, onnx.NodeProto]:
        """Which node computes each value, built once per body and shared by the passes: the
        edits before ``commit`` keep every node's outputs (a node becomes its paged op in place)
        and only queue new nodes, which no pass looks up."""
        if self._producers is None:
            self._producers = {out: node for node in self.proto.node for out in node.output}
        return self._producers

    def insert_before(self, anchor: onnx.NodeProto, nodes: Sequence[onnx.NodeProto]) -> None:
        """Queue ``nodes`` to go right before ``anchor``; applied by ``commit``."""
        self._before.setdefault(id(anchor), []).extend(nodes)

    def constant(self, anchor: onnx.NodeProto, name: str, values: int | list[int]) -> str:
        """An int64 constant (scalar for an int) usable by ``anchor``; returns its name. In the main
        graph it is an initializer, so the node list need not be rebuilt; in a function body,
        which has no initializers, a ``Constant`` node queued before ``anchor``."""
        dims = [] if isinstance(values, int) else [len(values)]
        flat = [values] if isinstance(values, int) else values
        tensor = helper.make_tensor(name, onnx.TensorProto.INT64, dims, flat)
        if isinstance(self.proto, onnx.GraphProto):
            self.proto.initializer.append(tensor)
        else:
            self.insert_before(anchor, [helper.make_node("Constant", [], [name], name=name, value=tensor)])
        return name

    def commit(self) -> None:
        """Write queued insertions into the proto, keeping topological order."""
        if not self._before:
            return
        ordered: list[onnx.NodeProto] = []
        for node in self.proto.node:
            ordered.extend(self._before.get(id(node), []))
            ordered.append(node)
        del self.proto.node[:]
        self.proto.node.extend(ordered)
        self._before.clear()
        self._consumers = None
        self._watched = False
        self._producers = None


def prune_unread(body: onnx.GraphProto | onnx.FunctionProto, seeds: set[str]) -> int:
    """Remove the nodes that compute only values nobody reads, starting from ``seeds`` (values an
    edit stopped reading) and following their producers; returns how many went. Only nodes
    reachable from a seed are looked at (an unread node elsewhere stays), and a value read inside
    a subgraph or returned by the body keeps its producer.

    At 70B scale the body has tens of thousands of nodes and the seeds reach a few dozen: the
    candidates are found first, and readers are counted for their outputs only."""
    producers = {out: node for node in body.node for out in node.output}
    candidates: dict[int, onnx.NodeProto] = {}
    frontier = [name for name in seeds if name in producers]
    while frontier:
        node = producers[frontier.pop()]
        if id(node) not in candidates:
            candidates[id(node)] = node
            frontier += [name for name in node.input if name in producers]
    if not candidates:
        return 0
    watched = {out for node in candidates.values() for out in node.output if out}
    readers = dict.fromkeys(watched, 0)
    outputs = {v.name for v in body.output} if isinstance(body, onnx.GraphProto) else set(body.output)
    for node in body.node:
        for name in node.input:
            if name in readers:
                readers[name] += 1
        if node.op_type in SUBGRAPH_OPS:  # a subgraph may read any outer value: keep those
            for attribute in node.attribute:
                if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    for name in used_names([g for g in [attribute.g, *attribute.graphs] if g.node]):
                        if name in readers:
                            readers[name] += 1
    removed: set[int] = set()
    stack = [name for name in seeds if name in producers]
    while stack:
        node = producers[stack.pop()]
        if id(node) in removed or any(readers.get(o, 0) or o in outputs for o in node.output if o):
            continue
        removed.add(id(node))
        for name in node.input:
            if name in readers:
                readers[name] -= 1
                if readers[name] == 0:
                    stack.append(name)
    if removed:
        kept = [node for node in body.node if id(node) not in removed]
        del body.node[:]
        body.node.extend(kept)
    return len(removed)


def int_constant(
    name: str, producers: Mapping[str, onnx.NodeProto], initializers: Mapping[str, onnx.TensorProto]
) -> int | None:
    """``name`` as an integer scalar: a ``Constant`` node's value (``producers``: the body's) or
    an initializer's; None for anything else, external data and malformed tensors included (a
    damaged input is the checker's to blame)."""
    node = producers.get(name)
    tensor = initializers.get(name) if node is None else None
    if (
        node is not None
        and node.op_type == "Constant"
        and node.attribute
        and node.attribute[0].name == "value"
    ):
        tensor = node.attribute[0].t
    if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL or sum(tensor.dims) > 1:
        return None
    try:
        value = numpy_helper.to_array(tensor)
    except (ValueError, TypeError):
        return None
    if value.size != 1 or not np.issubdtype(value.dtype, np.integer):
        return None
    return int(value.reshape(()))


def become(node: onnx.NodeProto, domain: str, op_type: str, inputs: Sequence[str]) -> None:
    """Turn ``node`` into ``domain::op_type(inputs)`` in place; its name and outputs stay."""
    node.domain = domain
    node.op_type = op_type
    del node.input[:]
    node.input.extend(inputs)
    del node.attribute[:]


def dims_of(value: onnx.ValueInfoProto) -> list[int | str | None]:
    """A value's dims: int when static, str when symbolic, None when unknown."""
    if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
        return []
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None
        for d in value.type.tensor_type.shape.dim
    ]


def set_dims(value: onnx.ValueInfoProto, dims: Sequence[int | str | None]) -> None:
    """Replace a value's shape."""
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for dim in dims:
        entry = shape.dim.add()
        if isinstance(dim, int):
            entry.dim_value = dim
        elif isinstance(dim, str):
            entry.dim_param = dim


def function_key(node: onnx.NodeProto) -> tuple[str, str]:
    return (node.domain, node.op_type)


def used_names(bodies: Sequence[onnx.GraphProto | onnx.FunctionProto]) -> set[str]:
    """Every value name read by a node of ``bodies`` (subgraphs of If/Loop/Scan included)."""
    names: set[str] = set()
    stack = [list(b.node) for b in bodies]
    while stack:
        for node in stack.pop():
            names.update(node.input)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    stack.append(list(attribute.g.node))
                    names.update(o.name for o in attribute.g.output)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for graph in attribute.graphs:
                        stack.append(list(graph.node))
                        names.update(o.name for o in graph.output)
    return names


SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})  # the standard ops whose attributes hold subgraphs
STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft"})


def undefined_ops(model: onnx.ModelProto) -> set[tuple[str, str]]:
    """Custom-domain ops called in the graph or a function body that no model-local function
    defines. The ONNX checker cannot see these (it does not know custom domains)."""
    defined = {(f.domain, f.name) for f in model.functions}
    bodies = [model.graph.node, *(f.node for f in model.functions)]
    return {
        (n.domain, n.op_type)
        for body in bodies
        for n in body
        if n.domain not in STANDARD_DOMAINS and (n.domain, n.op_type) not in defined
    }
