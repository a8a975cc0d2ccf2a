"""Find the KV caches of a QEfficient export by structure, and every Ctx op that is not one.

A KV cache is a rank-4 float graph input written by a Ctx scatter whose rule indexes token
positions on axis 2, whose result is a graph output (the retained state), and which only Ctx
gathers and ``Shape`` read — in the main graph or through the matching input of a call to a local
function. Only those are rewritten. Every other Ctx op — adapter weights gathered by LoRA, sampler
penalty buffers, MoE activations — is left exactly as it is and listed with the reason. Each op
that is rewritten must also *do* what its rule says (``ctx_op_body``). Names only order the layers.
"""

from __future__ import annotations

import onnx

from paged_rewrite.domain import QEFF_DOMAIN
from paged_rewrite.errors import NoCacheError, UnsupportedPatternError
from paged_rewrite.graph import Body, dims_of, function_key, used_names
from paged_rewrite.passes.cache_op_rules import (
    KV_POSITION_AXIS,
    CtxOpRule,
    is_ctx_op,
    known_arities,
    rule_for,
)
from paged_rewrite.passes.ctx_op_body import body_mismatch
from paged_rewrite.passes.sites import CacheSites, CacheTensor, Dim, LeftAlone, Site, where

SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan"})
ADDRESSING_NAMES = frozenset({"block_table", "slot_id"})  # watched so a clash can be refused
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}
MIN_OPSET = 13  # the paged ops' bodies use ops whose signatures are stable from opset 13 on


def default_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


class _Interface:
    """The model's graph inputs, outputs and initializers, and the Ctx op definitions."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.inputs = {v.name: v for v in model.graph.input}
        self.outputs = {v.name: v for v in model.graph.output}
        self.initializers = {t.name for t in model.graph.initializer}
        self.definitions = {(f.domain, f.name): f for f in model.functions}
        self.mismatches: dict[tuple[int, int], str | None] = {}  # (rule, definition) -> body_mismatch

    def outer(self, name: str, body: Body, call: onnx.NodeProto | None, outputs: bool = False) -> str | None:
        """``name`` of ``body`` as the main graph calls it (None when it is local to the function)."""
        if call is None:
            return name
        formal = body.output_names if outputs else body.input_names
        actual = call.output if outputs else call.input
        index = formal.index(name) if name in formal else len(actual)
        return actual[index] if index < len(actual) else None


def find_cache_sites(model: onnx.ModelProto) -> CacheSites:
    """Return the cache sites of ``model`` or raise a refusal that names the offending node."""
    if default_opset(model) < MIN_OPSET:
        raise UnsupportedPatternError(f"default opset {default_opset(model)} is older than {MIN_OPSET}")
    for node in [*model.graph.node, *(n for f in model.functions for n in f.node)]:
        if node.domain == QEFF_DOMAIN and node.op_type.startswith("Paged"):
            raise UnsupportedPatternError(f"{where(node)}: the model is already paged")
    interface = _Interface(model)
    layers = {key: Body(f) for key, f in interface.definitions.items() if any(_is_ctx(n) for n in f.node)}
    _refuse_nested_calls(model, layers)
    sites = CacheSites(model=model, main=Body(model.graph))
    for node in model.graph.node:
        if _is_ctx(node):
            _classify_write(sites, interface, node, sites.main, None)
        layer = layers.get(function_key(node))
        if layer is not None:
            for inner in layer:
                if _is_ctx(inner):
                    _classify_write(sites, interface, inner, layer, node)
            if any(t.call is node for t in sites.tensors) and layer not in sites.functions:
                sites.functions.append(layer)
    if not sites.tensors:
        _refuse_dynamic_cache(model.graph)
        raise NoCacheError("no KV cache found (no com.qualcomm.cloud::CtxScatter* writes a graph input)")
    sites.tensors.sort(key=lambda t: (t.layer, t.kind))
    _check_shapes(sites.tensors, model)
    cache_names = {name for t in sites.tensors for name in (t.input.name, t.output.name)}
    _refuse_subgraph_users(model.graph, cache_names)
    for function, local_names in _local_cache_names(sites).values():
        _refuse_subgraph_users(function, local_names)
    sites.main.watch(cache_names | ADDRESSING_NAMES)
    for tensor in sites.tensors:
        _collect_users(sites, interface, tensor)
    _list_left_alone(sites, interface, layers)
    sites.row_dim = _row_dim(model, sites)
    return sites


def _classify_write(
    sites: CacheSites, interface: _Interface, node: onnx.NodeProto, body: Body, call: onnx.NodeProto | None
) -> None:
    """Record ``node`` as a KV cache write if it is one; refuse it if it looks like one but cannot
    be paged. Everything else is listed later, by ``_list_left_alone``."""
    rule = rule_for(node.domain, node.op_type, len(node.input))
    if rule is not None and (rule.role != "write" or not rule.may_move_kv):
        return
    data = interface.outer(node.input[0], body, call) if node.input else None
    out = interface.outer(node.output[0], body, call, outputs=True) if node.output else None
    value = interface.inputs.get(data) if data is not None else None
    kv_shaped = (
        value is not None and len(dims_of(value)) == 4 and value.type.tensor_type.elem_type in FLOAT_TYPES
    )
    if rule is None:
        if kv_shaped and out in interface.outputs:
            arities = known_arities(node.op_type)
            detail = f" with {len(node.input)} inputs (known: {arities})" if arities else ""
            raise UnsupportedPatternError(f"{where(node)}: unknown cache op{detail} writes {data!r}")
        return
    if not kv_shaped:
        return  # a computed value or a buffer of another rank: listed as left alone
    if out not in interface.outputs:
        raise UnsupportedPatternError(
            f"{where(node)}: the cache it writes is not a graph input returned as a graph output"
        )
    _check_body(node, rule, interface)
    assert data is not None and out is not None
    tensor = CacheTensor(interface.inputs[data], interface.outputs[out], Site(node, body), call=call)
    tensor.write.cache = tensor
    sites.tensors.append(tensor)


def _check_body(node: onnx.NodeProto, rule: CtxOpRule, interface: _Interface) -> None:
    if not all(node.input) or len(node.output) != 1:
        raise UnsupportedPatternError(
            f"{where(node)}: expects inputs ({', '.join(rule.slots)}) and one output, "
            f"has {len(node.input)} inputs ({sum(1 for i in node.input if not i)} omitted) "
            f"and {len(node.output)} outputs"
        )
    function = interface.definitions.get(function_key(node))
    if function is None:
        raise UnsupportedPatternError(f"{where(node)}: no model-local function defines {node.op_type}")
    key = (id(rule), id(function))  # every call of one definition has the same answer
    if key not in interface.mismatches:
        interface.mismatches[key] = body_mismatch(rule, function)
    mismatch = interface.mismatches[key]
    if mismatch is not None:
        raise UnsupportedPatternError(f"{where(node)}: not the {rule.op_type} the rewrite knows: {mismatch}")


def _is_ctx(node: onnx.NodeProto) -> bool:
    return is_ctx_op(node.domain, node.op_type)


def _refuse_nested_calls(model: onnx.ModelProto, layers: dict[tuple[str, str], Body]) -> None:
    """Ctx ops are followed one call deep (QEfficient's layer functions); deeper is refused, not
    missed."""
    for function in model.functions:
        for node in function.node:
            if function_key(node) in layers:
                raise UnsupportedPatternError(
                    f"{where(node)} in function {function.name!r}: cache ops nested two functions deep"
                )


def _local_cache_names(sites: CacheSites) -> dict[int, tuple[onnx.FunctionProto, set[str]]]:
    """Per layer function, the names its caches have inside it: the cache operand and the written
    value of each write (what a subgraph there could read by outer-scope reference)."""
    local: dict[int, tuple[onnx.FunctionProto, set[str]]] = {}
    for tensor in sites.tensors:
        body, node = tensor.write.body, tensor.write.node
        if isinstance(body.proto, onnx.FunctionProto):
            rule = rule_for(node.domain, node.op_type, len(node.input))
            assert rule is not None
            names = local.setdefault(id(body.proto), (body.proto, set()))[1]
            names.update((node.input[rule.operand("cache")], node.output[0]))
    return local


def _refuse_subgraph_users(graph: onnx.GraphProto | onnx.FunctionProto, cache_names: set[str]) -> None:
    """A cache read inside an If/Loop/Scan body (by outer-scope reference) is refused, not missed:
    in the main graph and in a layer function alike."""
    inside = f" in function {graph.name!r}" if isinstance(graph, onnx.FunctionProto) else ""
    for node in graph.node:
        if node.op_type not in SUBGRAPH_OPS:  # checked first: attributes are slow to walk
            continue
        subgraphs = [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
        subgraphs += [g for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS for g in a.graphs]
        if subgraphs:
            used = used_names(subgraphs) & cache_names
            if used:
                raise UnsupportedPatternError(
                    f"{where(node)}{inside} reads cache {sorted(used)[0]!r} inside a subgraph"
                )


def _collect_users(sites: CacheSites, interface: _Interface, tensor: CacheTensor) -> None:
    """Record the readers of ``tensor``; refuse any user that is not a KV gather or ``Shape``."""
    write = tensor.write
    scopes = [(write.body, write.node.input[0], write.node.output[0])]
    if tensor.call is not None:
        scopes.append((sites.main, tensor.input.name, tensor.output.name))
    for body, cache_in, cache_out in scopes:
        for user, _ in body.consumers(cache_in):
            if user is not write.node and user is not tensor.call:
                _shape_or_refuse(
                    sites, tensor, Site(user, body, tensor), f"reads cache input {tensor.name!r} directly"
                )
        for user, index in body.consumers(cache_out):
            rule = rule_for(user.domain, user.op_type, len(user.input))
            if rule is not None and rule.role == "read" and rule.may_move_kv and index == 0:
                if not any(site.node is user for site in sites.reads):
                    _check_body(user, rule, interface)
                    sites.reads.append(Site(user, body, tensor))
            else:
                _shape_or_refuse(
                    sites,
                    tensor,
                    Site(user, body, tensor),
                    f"uses the written cache {cache_out!r} in an unknown way",
                )
    if not any(site.node is write.node for site in sites.writes):
        sites.writes.append(write)


def _shape_or_refuse(sites: CacheSites, tensor: CacheTensor, user: Site, why: str) -> None:
    if user.node.op_type != "Shape" or user.node.domain != "":
        known = rule_for(user.node.domain, user.node.op_type, len(user.node.input))
        if known is not None:
            why = (
                f"reads KV cache {tensor.name!r}, but {known.op_type} indexes axis {known.position_axis}, "
                "not token positions: it cannot be paged"
                if not known.may_move_kv
                else f"uses KV cache {tensor.name!r} in a way the rewrite does not know"
            )
        elif is_ctx_op(user.node.domain, user.node.op_type):
            why = f"is an unknown cache op reading KV cache {tensor.name!r}"
        raise UnsupportedPatternError(f"{where(user.node)} {why}")
    for site, length in sites.shape_reads:
        if site.node is user.node:
            if length != tensor.length_dim:
                raise UnsupportedPatternError(
                    f"{where(user.node)} serves caches of different lengths ({length!r} and {tensor.length_dim!r})"
                )
            return
    sites.shape_reads.append((user, tensor.length_dim))


def _list_left_alone(sites: CacheSites, interface: _Interface, layers: dict[tuple[str, str], Body]) -> None:
    """Every Ctx op the rewrite does not touch, with the reason it is not a KV cache op."""
    rewritten = {id(site.node) for site in [*sites.writes, *sites.reads]}
    first_call: dict[tuple[str, str], onnx.NodeProto] = {}
    names = {name for _, name in layers}  # a cheap test first: a 70B graph has tens of thousands of nodes
    for node in sites.model.graph.node:
        if node.op_type in names:
            first_call.setdefault(function_key(node), node)
    places: list[tuple[onnx.NodeProto, Body, onnx.NodeProto | None]]
    places = [(node, sites.main, None) for node in sites.model.graph.node if node.op_type.startswith("Ctx")]
    for key, layer in layers.items():  # names resolved through the first call of a shared body
        places += [(inner, layer, first_call.get(key)) for inner in layer if inner.op_type.startswith("Ctx")]
    for node, body, call in places:
        if not _is_ctx(node) or id(node) in rewritten:
            continue
        local = node.input[0] if node.input else ""
        data = (interface.outer(local, body, call) if local else None) or local
        sites.left_alone.append(
            LeftAlone(
                node=node.name,
                op=node.op_type,
                function=body.name if body.is_function else None,
                data=data,
                reason=_why_not_kv(node, data, interface),
            )
        )


def _why_not_kv(node: onnx.NodeProto, data: str, interface: _Interface) -> str:
    rule = rule_for(node.domain, node.op_type, len(node.input))
    if rule is None:
        return "no rule knows this op, and it touches no KV cache"
    if rule.position_axis != KV_POSITION_AXIS:
        return f"indexes axis {rule.position_axis} (activations or per-sequence buffers), not token positions of a KV cache"
    if data in interface.initializers:
        return "its data operand is an initializer (weights), not a KV cache"
    if data in interface.inputs:
        value = interface.inputs[data]
        rank = len(dims_of(value))
        if rank != 4:
            return f"its data operand is a rank-{rank} graph input; a KV cache has rank 4"
        if value.type.tensor_type.elem_type not in FLOAT_TYPES:
            return "its data operand is not a float tensor; a KV cache is"
        return "its data operand is a graph input that no KV scatter writes and returns as a retained state"
    return "its data operand is a computed value, not a cache graph input"


def _row_dim(model: onnx.ModelProto, sites: CacheSites) -> Dim:
    """The batch dim of the model's token rows: that of the rank-2 int64 graph input the first
    write's positions come from (``position_ids``). With continuous batching the cache's own
    batch dim is ``full_batch_size``, but ``block_table`` has one row per token row."""
    tensor = sites.tensors[0]
    node = tensor.write.node
    rule = rule_for(node.domain, node.op_type, len(node.input))
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


def _contradicts(declared: list[Dim], shape: list[Dim], known_dims: set[str]) -> bool:
    """A retained output's declared shape contradicts its cache's only where both are known: the
    exporter names dims it could not infer ``CtxScatter..._dim_0``; those say nothing."""
    if not declared:
        return False
    if len(declared) != len(shape):
        return True
    return any(
        out != dim and (isinstance(out, int) or out in known_dims) and dim is not None
        for out, dim in zip(declared, shape, strict=True)
    )


def _check_shapes(tensors: list[CacheTensor], model: onnx.ModelProto) -> None:
    known_dims = {d for v in model.graph.input for d in dims_of(v) if isinstance(d, str)}
    first = tensors[0]
    for tensor in tensors:
        node = where(tensor.write.node)
        if tensor.input.type.tensor_type.elem_type not in FLOAT_TYPES:
            raise UnsupportedPatternError(f"{node}: cache {tensor.name!r} is not a float tensor")
        if tensor.input.type.tensor_type.elem_type != first.input.type.tensor_type.elem_type:
            types = [
                onnx.TensorProto.DataType.Name(t.input.type.tensor_type.elem_type) for t in (tensor, first)
            ]
            raise UnsupportedPatternError(
                f"{node}: cache {tensor.name!r} is {types[0]} but {first.name!r} is {types[1]} "
                "(the paged ops are emitted for one cache type)"
            )
        if not isinstance(tensor.shape[1], int) or not isinstance(tensor.shape[3], int):
            raise UnsupportedPatternError(
                f"{node}: cache {tensor.name!r} needs static heads and head_dim, got {list(tensor.shape)}"
            )
        if tensor.shape[0] != first.shape[0]:
            raise UnsupportedPatternError(
                f"{node}: cache {tensor.name!r} has batch dim {tensor.shape[0]!r} "
                f"but {first.name!r} has {first.shape[0]!r}"
            )
        if _contradicts(dims_of(tensor.output), list(tensor.shape), known_dims):
            raise UnsupportedPatternError(
                f"{node}: retained output {tensor.output.name!r} does not have the shape of {tensor.name!r}"
            )
