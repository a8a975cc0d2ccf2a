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

import onnx_ir as ir

from paged_rewrite.errors import NoCacheError, UnsupportedPatternError
from paged_rewrite.passes.cache_op_rules import QEFF_DOMAIN, is_cache_op_like, rule_for

Dim = int | str | None


def dim_value(d: object) -> Dim:
    if isinstance(d, int):
        return d
    value = getattr(d, "value", None)
    return value if isinstance(value, (int, str)) else None


def where(node: ir.Node) -> str:
    """How errors name a node: its name and ``domain::op``."""
    return f"node {node.name!r} ({node.domain or 'ai.onnx'}::{node.op_type})"


@dataclass
class CacheTensor:
    """One layer's K or V cache as the model's interface shows it."""

    input: ir.Value
    output: ir.Value
    write: ir.Node
    call: ir.Node | None = None  # the call passing the cache into a local function, if any

    @property
    def name(self) -> str:
        return str(self.input.name)

    @property
    def shape(self) -> tuple[Dim, ...]:
        return tuple(dim_value(d) for d in self.input.shape) if self.input.shape is not None else ()

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

    model: ir.Model
    tensors: list[CacheTensor]
    writes: list[ir.Node] = field(default_factory=list)
    reads: list[ir.Node] = field(default_factory=list)
    shape_reads: dict[ir.Node, Dim] = field(default_factory=dict)  # Shape node -> cache length dim
    functions: list[ir.Function] = field(default_factory=list)

    @property
    def batch_dim(self) -> Dim:
        return self.tensors[0].shape[0]

    @property
    def length_dims(self) -> list[Dim]:
        return list(dict.fromkeys(t.length_dim for t in self.tensors))


def find_cache_sites(model: ir.Model) -> CacheSites:
    """Return the cache sites of ``model`` or raise a refusal that names the offending node."""
    _refuse_foreign_ops(model)
    with_cache = {
        key: function for key, function in model.functions.items() if any(_is_cache_op(n) for n in function)
    }
    _refuse_nested_calls(model, with_cache)
    graph = model.graph
    sites = CacheSites(model=model, tensors=[], functions=list(with_cache.values()))
    for node in graph:
        rule = rule_for(node.domain, node.op_type)
        if rule is not None and rule.role == "write":
            sites.tensors.append(_interface_cache(graph, node, node.inputs[0], node.outputs[0], node))
        function = with_cache.get((node.domain, node.op_type, node.overload))
        if function is not None:
            sites.tensors += _caches_through_call(graph, node, function)
    if not sites.tensors:
        _refuse_dynamic_cache(graph)
        raise NoCacheError("no KV cache found (no com.qualcomm.cloud::CtxScatter* writes a graph input)")
    sites.tensors.sort(key=lambda t: (t.layer, t.kind))
    for tensor in sites.tensors:
        _collect_users(sites, tensor)
    _check_shapes(sites.tensors)
    return sites


def _is_cache_op(node: ir.Node) -> bool:
    return rule_for(node.domain, node.op_type) is not None


def _refuse_foreign_ops(model: ir.Model) -> None:
    bodies: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for body in bodies:
        for node in body:
            if node.domain == QEFF_DOMAIN and node.op_type.startswith("Paged"):
                raise UnsupportedPatternError(f"{where(node)}: the model is already paged")
            if is_cache_op_like(node.domain, node.op_type) and not _is_cache_op(node):
                raise UnsupportedPatternError(f"{where(node)}: unknown cache op")


def _refuse_dynamic_cache(graph: ir.Graph) -> None:
    """A cache grown by ``Concat`` each step (a dynamic cache) cannot be paged: say so."""
    for node in graph:
        grows = [
            v
            for v in node.inputs
            if v is not None and v.is_graph_input() and v.shape is not None and len(v.shape) == 4
        ]
        if node.op_type == "Concat" and grows and node.outputs[0] in graph.outputs:
            raise UnsupportedPatternError(
                f"{where(node)} grows {grows[0].name!r} by concatenation: a dynamic KV cache; "
                "export with QEfficient's static cache (CtxScatter/CtxGather) to page it"
            )


def _refuse_nested_calls(model: ir.Model, with_cache: dict[ir.OperatorIdentifier, ir.Function]) -> None:
    for function in model.functions.values():
        for node in function:
            if (node.domain, node.op_type, node.overload) in with_cache:
                raise UnsupportedPatternError(
                    f"{where(node)} in function {function.name!r}: cache ops nested two functions deep"
                )


def _interface_cache(
    graph: ir.Graph, user: ir.Node, data: ir.Value | None, out: ir.Value, write: ir.Node
) -> CacheTensor:
    if data is None or not data.is_graph_input() or out not in graph.outputs:
        raise UnsupportedPatternError(
            f"{where(user)}: the cache it writes is not a graph input returned as a graph output"
        )
    return CacheTensor(input=data, output=out, write=write, call=None if user is write else user)


def _caches_through_call(graph: ir.Graph, call: ir.Node, function: ir.Function) -> list[CacheTensor]:
    tensors = []
    for inner in function:
        rule = rule_for(inner.domain, inner.op_type)
        if rule is None or rule.role != "write":
            continue
        data, out = inner.inputs[0], inner.outputs[0]
        if data not in function.inputs or out not in function.outputs:
            raise UnsupportedPatternError(
                f"{where(inner)} in function {function.name!r}: the cache must be a function input "
                "returned as a function output"
            )
        outer_in = call.inputs[function.inputs.index(data)]
        outer_out = call.outputs[function.outputs.index(out)]
        tensors.append(_interface_cache(graph, call, outer_in, outer_out, inner))
    return tensors


def _collect_users(sites: CacheSites, tensor: CacheTensor) -> None:
    """Record the readers of ``tensor``; refuse any user that is not a known cache op or Shape."""
    inner_in, inner_out = tensor.write.inputs[0], tensor.write.outputs[0]
    pairs = [(inner_in, inner_out)]
    if tensor.call is not None:
        pairs.append((tensor.input, tensor.output))
    for cache_in, cache_out in pairs:
        assert cache_in is not None
        for user, index in cache_in.uses():
            if user is not tensor.write and not (user is tensor.call and user.inputs[index] is cache_in):
                _shape_or_refuse(sites, tensor, user, f"reads cache input {tensor.name!r} directly")
        for user, index in cache_out.uses():
            rule = rule_for(user.domain, user.op_type)
            if rule is not None and rule.role == "read" and index == 0:
                if user not in sites.reads:
                    sites.reads.append(user)
            else:
                _shape_or_refuse(
                    sites, tensor, user, f"uses the written cache {cache_out.name!r} in an unknown way"
                )
    if tensor.write not in sites.writes:
        sites.writes.append(tensor.write)


def _shape_or_refuse(sites: CacheSites, tensor: CacheTensor, user: ir.Node, why: str) -> None:
    if user.op_type != "Shape" or user.domain != "":
        raise UnsupportedPatternError(f"{where(user)} {why}")
    seen = sites.shape_reads.setdefault(user, tensor.length_dim)
    if seen != tensor.length_dim:
        raise UnsupportedPatternError(
            f"{where(user)} serves caches of different lengths ({seen!r} and {tensor.length_dim!r})"
        )


def _check_shapes(tensors: list[CacheTensor]) -> None:
    first = tensors[0]
    for tensor in tensors:
        node = where(tensor.write)
        dtype = tensor.input.dtype
        if len(tensor.shape) != 4:
            raise UnsupportedPatternError(
                f"{node}: cache {tensor.name!r} must be rank 4 [batch, heads, len, head_dim]"
            )
        if dtype is None or not dtype.is_floating_point():
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
        if tensor.output.shape is not None and [dim_value(d) for d in tensor.output.shape] != list(
            tensor.shape
        ):
            raise UnsupportedPatternError(
                f"{node}: retained output {tensor.output.name!r} does not have the shape of {tensor.name!r}"
            )
