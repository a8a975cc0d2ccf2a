"""Find the KV-cache sites of a QEfficient export: which graph inputs are caches, which nodes
write and read them (in the main graph or inside model-local functions), and which nodes look
at their shape.

Matching is by op and structure (see ``cache_op_rules``): a cache is the ``cache`` operand of a
write op that is a graph input — directly, or through the matching input of a call to a local
function — and whose result is a graph output (the ``_RetainedState``). Names only order the
layers. Anything else that touches a cache is refused, naming the node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

import onnx

from paged_rewrite.errors import NoCacheError, UnsupportedPatternError
from paged_rewrite.graph import Body, dims_of, function_key, used_names
from paged_rewrite.passes.cache_op_rules import QEFF_DOMAIN, is_cache_op_like, rule_for

Dim = int | str | None
SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})
ADDRESSING_NAMES = frozenset({"block_table", "slot_id"})  # watched so a clash can be refused
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


def where(node: onnx.NodeProto) -> str:
    """How errors name a node: its name and ``domain::op``."""
    return f"node {node.name!r} ({node.domain or 'ai.onnx'}::{node.op_type})"


@dataclass
class Site:
    """A node to rewrite and the body (graph or function) it lives in."""

    node: onnx.NodeProto
    body: Body


@dataclass
class CacheTensor:
    """One layer's K or V cache as the model's interface shows it."""

    input: onnx.ValueInfoProto
    output: onnx.ValueInfoProto
    write: Site
    call: onnx.NodeProto | None = None  # the call passing the cache into a local function, if any

    @property
    def name(self) -> str:
        return self.input.name

    @cached_property
    def shape(self) -> tuple[Dim, ...]:
        """The original shape (captured before the rewrite reshapes the input)."""
        return tuple(dims_of(self.input))

    @property
    def kv_heads(self) -> int:
        return int(self.shape[1])  # type: ignore[arg-type]

    @property
    def head_dim(self) -> int:
        return int(self.shape[3])  # type: ignore[arg-type]

    @property
    def length_dim(self) -> Dim:
        return self.shape[2]

    @property
    def layer(self) -> int:
        match = re.search(r"(\d+)$", self.name)
        return int(match.group(1)) if match else -1

    @property
    def kind(self) -> str:
        return "value" if "value" in self.name else "key"


@dataclass
class CacheSites:
    """Every cache of the model in layer order, and every node to rewrite (each once, even when
    a shared function body serves several layers)."""

    model: onnx.ModelProto
    main: Body
    tensors: list[CacheTensor] = field(default_factory=list)
    writes: list[Site] = field(default_factory=list)
    reads: list[Site] = field(default_factory=list)
    shape_reads: list[tuple[Site, Dim]] = field(default_factory=list)  # Shape node, cache length dim
    functions: list[Body] = field(default_factory=list)
    row_dim: Dim = None  # batch dim of the token rows (block_table rows); see _row_dim

    @property
    def batch_dim(self) -> Dim:
        return self.tensors[0].shape[0]

    @property
    def length_dims(self) -> list[Dim]:
        return list(dict.fromkeys(t.length_dim for t in self.tensors))

    @property
    def bodies(self) -> list[Body]:
        return [self.main, *self.functions]


MIN_OPSET = 13  # the paged ops' bodies use ops whose signatures are stable from opset 13 on


def default_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def find_cache_sites(model: onnx.ModelProto) -> CacheSites:
    """Return the cache sites of ``model`` or raise a refusal that names the offending node."""
    if default_opset(model) < MIN_OPSET:
        raise UnsupportedPatternError(f"default opset {default_opset(model)} is older than {MIN_OPSET}")
    for function in model.functions:
        for node in function.node:
            _refuse_foreign_op(node)
    with_cache = {
        (f.domain, f.name): Body(f) for f in model.functions if any(_is_cache_op(n) for n in f.node)
    }
    _refuse_nested_calls(model, with_cache)
    sites = CacheSites(model=model, main=Body(model.graph), functions=list(with_cache.values()))
    graph_inputs = {v.name: v for v in model.graph.input}
    graph_outputs = {v.name: v for v in model.graph.output}
    for node in model.graph.node:
        _refuse_foreign_op(node)
        rule = rule_for(node.domain, node.op_type)
        if rule is not None and rule.role == "write":
            site = Site(node, sites.main)
            sites.tensors.append(
                _interface_cache(graph_inputs, graph_outputs, node, node.input[0], node.output[0], site)
            )
        function = with_cache.get(function_key(node))
        if function is not None:
            sites.tensors += _caches_through_call(graph_inputs, graph_outputs, node, function)
    if not sites.tensors:
        _refuse_dynamic_cache(model.graph)
        raise NoCacheError("no KV cache found (no com.qualcomm.cloud::CtxScatter* writes a graph input)")
    sites.tensors.sort(key=lambda t: (t.layer, t.kind))
    _check_shapes(sites.tensors)
    cache_names = {name for t in sites.tensors for name in (t.input.name, t.output.name)}
    _refuse_subgraph_users(model.graph, cache_names)
    sites.main.watch(cache_names | ADDRESSING_NAMES)
    for tensor in sites.tensors:
        _collect_users(sites, tensor)
    sites.row_dim = _row_dim(model, sites)
    return sites


def _refuse_subgraph_users(graph: onnx.GraphProto, cache_names: set[str]) -> None:
    """A cache read inside an If/Loop/Scan body (by outer-scope reference) is refused, not missed."""
    for node in graph.node:
        if node.op_type not in SUBGRAPH_OPS:  # checked first: attributes are slow to walk
            continue
        subgraphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        subgraphs += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
        if subgraphs:
            used = used_names(subgraphs) & cache_names
            if used:
                raise UnsupportedPatternError(
                    f"{where(node)} reads cache {sorted(used)[0]!r} inside a subgraph"
                )


def _row_dim(model: onnx.ModelProto, sites: CacheSites) -> Dim:
    """The batch dim of the model's token rows: that of the rank-2 int64 graph input the first
    write's positions come from (``position_ids``). With continuous batching the cache's own
    batch dim is ``full_batch_size``, but ``block_table`` has one row per token row."""
    tensor = sites.tensors[0]
    node = tensor.write.node
    rule = rule_for(node.domain, node.op_type)
    assert rule is not None
    name = node.input[rule.operand("positions")]
    if tensor.call is not None and name in tensor.write.body.input_names:
        name = tensor.call.input[tensor.write.body.input_names.index(name)]
    inputs = {v.name: v for v in model.graph.input}
    producers = {out: n for n in model.graph.node for out in n.output} if name not in inputs else {}
    frontier, seen = [name], set()
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        value = inputs.get(current)
        if (
            value is not None
            and value.type.tensor_type.elem_type == onnx.TensorProto.INT64
            and len(dims_of(value)) == 2
        ):
            return dims_of(value)[0]
        producer = producers.get(current)
        if producer is not None:
            frontier.extend(producer.input)
    return sites.batch_dim


def _is_cache_op(node: onnx.NodeProto) -> bool:
    return rule_for(node.domain, node.op_type) is not None


def _refuse_foreign_op(node: onnx.NodeProto) -> None:
    """Refuse paged ops, unknown ``Ctx*`` ops and known ones with the wrong operands."""
    if node.domain != QEFF_DOMAIN:
        return
    if node.op_type.startswith("Paged"):
        raise UnsupportedPatternError(f"{where(node)}: the model is already paged")
    rule = rule_for(node.domain, node.op_type)
    if rule is None and is_cache_op_like(node.domain, node.op_type):
        raise UnsupportedPatternError(f"{where(node)}: unknown cache op")
    if rule is not None and (
        len(node.input) != len(rule.slots) or len(node.output) != 1 or not all(node.input)
    ):
        raise UnsupportedPatternError(
            f"{where(node)}: expects inputs ({', '.join(rule.slots)}) and one output, "
            f"has {len(node.input)} inputs and {len(node.output)} outputs"
        )


def _refuse_dynamic_cache(graph: onnx.GraphProto) -> None:
    """A cache grown by ``Concat`` each step (a dynamic cache) cannot be paged: say so."""
    rank4_inputs = {v.name for v in graph.input if len(dims_of(v)) == 4}
    outputs = {v.name for v in graph.output}
    for node in graph.node:
        grows = [name for name in node.input if name in rank4_inputs]
        if node.op_type == "Concat" and grows and node.output[0] in outputs:
            raise UnsupportedPatternError(
                f"{where(node)} grows {grows[0]!r} by concatenation: a dynamic KV cache; "
                "export with QEfficient's static cache (CtxScatter/CtxGather) to page it"
            )


def _refuse_nested_calls(model: onnx.ModelProto, with_cache: dict[tuple[str, str], Body]) -> None:
    for function in model.functions:
        for node in function.node:
            if function_key(node) in with_cache:
                raise UnsupportedPatternError(
                    f"{where(node)} in function {function.name!r}: cache ops nested two functions deep"
                )


def _interface_cache(
    inputs: dict[str, onnx.ValueInfoProto],
    outputs: dict[str, onnx.ValueInfoProto],
    user: onnx.NodeProto,
    data: str,
    out: str,
    write: Site,
) -> CacheTensor:
    if data not in inputs or out not in outputs:
        raise UnsupportedPatternError(
            f"{where(user)}: the cache it writes is not a graph input returned as a graph output"
        )
    return CacheTensor(inputs[data], outputs[out], write, call=None if user is write.node else user)


def _caches_through_call(
    inputs: dict[str, onnx.ValueInfoProto],
    outputs: dict[str, onnx.ValueInfoProto],
    call: onnx.NodeProto,
    function: Body,
) -> list[CacheTensor]:
    tensors = []
    formal_in, formal_out = function.input_names, function.output_names
    for inner in function:
        rule = rule_for(inner.domain, inner.op_type)
        if rule is None or rule.role != "write":
            continue
        data, out = inner.input[0], inner.output[0]
        if data not in formal_in or out not in formal_out:
            raise UnsupportedPatternError(
                f"{where(inner)} in function {function.name!r}: the cache must be a function input "
                "returned as a function output"
            )
        position_in, position_out = formal_in.index(data), formal_out.index(out)
        if position_in >= len(call.input) or position_out >= len(call.output):
            raise UnsupportedPatternError(f"{where(call)}: the call does not pass the cache {data!r}")
        outer_in, outer_out = call.input[position_in], call.output[position_out]
        tensors.append(_interface_cache(inputs, outputs, call, outer_in, outer_out, Site(inner, function)))
    return tensors


def _collect_users(sites: CacheSites, tensor: CacheTensor) -> None:
    """Record the readers of ``tensor``; refuse any user that is not a known cache op or Shape."""
    write = tensor.write
    scopes = [(write.body, write.node.input[0], write.node.output[0])]
    if tensor.call is not None:
        scopes.append((sites.main, tensor.input.name, tensor.output.name))
    for body, cache_in, cache_out in scopes:
        for user, _ in body.consumers(cache_in):
            if user is not write.node and user is not tensor.call:
                _shape_or_refuse(
                    sites, tensor, Site(user, body), f"reads cache input {tensor.name!r} directly"
                )
        for user, index in body.consumers(cache_out):
            rule = rule_for(user.domain, user.op_type)
            if rule is not None and rule.role == "read" and index == 0:
                if not any(site.node is user for site in sites.reads):
                    sites.reads.append(Site(user, body))
            else:
                _shape_or_refuse(
                    sites, tensor, Site(user, body), f"uses the written cache {cache_out!r} in an unknown way"
                )
    if not any(site.node is write.node for site in sites.writes):
        sites.writes.append(write)


def _shape_or_refuse(sites: CacheSites, tensor: CacheTensor, user: Site, why: str) -> None:
    if user.node.op_type != "Shape" or user.node.domain != "":
        raise UnsupportedPatternError(f"{where(user.node)} {why}")
    for site, length in sites.shape_reads:
        if site.node is user.node:
            if length != tensor.length_dim:
                raise UnsupportedPatternError(
                    f"{where(user.node)} serves caches of different lengths ({length!r} and {tensor.length_dim!r})"
                )
            return
    sites.shape_reads.append((user, tensor.length_dim))


def _check_shapes(tensors: list[CacheTensor]) -> None:
    first = tensors[0]
    for tensor in tensors:
        node = where(tensor.write.node)
        if len(tensor.shape) != 4:
            raise UnsupportedPatternError(
                f"{node}: cache {tensor.name!r} must be rank 4 [batch, heads, len, head_dim]"
            )
        if tensor.input.type.tensor_type.elem_type not in FLOAT_TYPES:
            raise UnsupportedPatternError(f"{node}: cache {tensor.name!r} is not a float tensor")
        if not isinstance(tensor.shape[1], int) or not isinstance(tensor.shape[3], int):
            raise UnsupportedPatternError(
                f"{node}: cache {tensor.name!r} needs static heads and head_dim, got {list(tensor.shape)}"
            )
        if tensor.shape[0] != first.shape[0]:
            raise UnsupportedPatternError(
                f"{node}: cache {tensor.name!r} has batch dim {tensor.shape[0]!r} "
                f"but {first.name!r} has {first.shape[0]!r}"
            )
        out_dims = dims_of(tensor.output)
        if out_dims and out_dims != list(tensor.shape):
            raise UnsupportedPatternError(
                f"{node}: retained output {tensor.output.name!r} does not have the shape of {tensor.name!r}"
            )
