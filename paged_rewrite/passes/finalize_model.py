"""Finish the model: embed the paged ops it calls as model-local functions (flat bodies, typed
for its caches), record the layout in the metadata, and drop what no longer feeds anything
(inputs such as ``batch_index``, the function definitions of replaced ops that nothing calls
any more)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from paged_rewrite.custom_ops import EMITTED_OPS, PAGED_DOMAIN, paged_function_protos
from paged_rewrite.graph import SUBGRAPH_OPS, Body, prune_unread, used_names
from paged_rewrite.passes.cache_op_rules import is_ctx_op
from paged_rewrite.passes.find_cache_sites import default_opset
from paged_rewrite.passes.sites import CacheSites, PagedLayout


@dataclass(frozen=True)
class Finalized:
    """What finishing the model changed beyond the cache ops."""

    removed_inputs: list[str]  # original graph inputs that no longer feed anything
    kept_inputs: dict[str, str]  # dropped by a replaced op but still read (by these op types)
    paged_op_nodes: dict[str, int]  # node count of each emitted paged-op body


def finalize_model(
    sites: CacheSites, layout: PagedLayout, dropped: set[str], metadata: dict[str, str]
) -> Finalized:
    """Commit the edits, emit the paged ops and tidy up (see the module doc). ``dropped``: the
    values the earlier passes stopped reading (their ``PassResult``s); only what they kept alive
    can go."""
    model = sites.model
    dropped = set(dropped)  # grows with the call operands of dead layer-function inputs
    for body in sites.bodies:
        body.commit()
    # What only the replaced ops read goes: the positions each layer computed for an index op
    # now shared, then the layer-function inputs that carried them, then their main-graph sources.
    for function in sites.functions:
        prune_unread(function.proto, dropped)
        dropped |= _drop_dead_function_inputs(model, function, layout, dropped)
    prune_unread(model.graph, dropped)
    _remove_unused_functions(model)
    opset = default_opset(model)
    emitted = paged_function_protos(
        _called_paged_ops(model), sites.tensors[0].input.type.tensor_type.elem_type
    )
    for function in emitted:
        for entry in function.opset_import:  # bodies use ops unchanged from opset 13 on
            if entry.domain == "":
                entry.version = opset
        model.functions.append(function)
    _import_domain(model.opset_import)
    for function in model.functions:
        if any(node.domain == PAGED_DOMAIN for node in function.node):
            _import_domain(function.opset_import)
    for key, value in sorted(metadata.items()):
        entry = next((p for p in model.metadata_props if p.key == key), None)
        if entry is None:
            entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    # Only an input whose last reader was a replaced cache op (batch_index) can have become dead.
    candidates = dropped & {v.name for v in model.graph.input}
    # Function bodies cannot see graph values (a parameter of a kept CtxGatherCB definition
    # may be called batch_index too), so only the graph's own nodes keep an input alive.
    used = _read_in_graph(model.graph, candidates)
    removed = [v.name for v in model.graph.input if v.name in candidates and v.name not in used]
    kept = [v for v in model.graph.input if v.name not in removed]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    still_read = {name: _readers(model, name) for name in sorted(candidates - set(removed))}
    return Finalized(removed, still_read, {f.name: len(f.node) for f in emitted})


def _called_paged_ops(model: onnx.ModelProto) -> set[str]:
    """The paged ops some node calls: only those are emitted (the domain is QEfficient's, whose
    own ops a model may still call: LoRA's ``CtxGatherCB``, the sampler's ``CtxScatterCB3D``)."""
    bodies = [model.graph.node, *(f.node for f in model.functions)]
    return {
        n.op_type for body in bodies for n in body if n.domain == PAGED_DOMAIN and n.op_type in EMITTED_OPS
    }


def _drop_dead_function_inputs(
    model: onnx.ModelProto, function: Body, layout: PagedLayout, dropped: set[str]
) -> set[str]:
    """A layer function's input that only a replaced op read (``batch_index`` of a CB export with
    subfunctions, positions whose index op moved to the main graph) leaves its signature and
    every call, so the graph input can go too when nothing else reads it. Returns the calls'
    operands that went."""
    proto = function.proto
    assert isinstance(proto, onnx.FunctionProto)
    read = used_names([proto]) | set(proto.output)  # subgraphs may read any outer value
    # block_table / slot_id too: a layer whose index ops all moved to the main graph reads neither.
    droppable = dropped | {*layout.tables, layout.slot_id}
    dead = [i for i, name in enumerate(proto.input) if name in droppable and name not in read]
    operands: set[str] = set()
    calls = [n for n in model.graph.node if (n.domain, n.op_type) == (proto.domain, proto.name)]
    for index in reversed(dead):
        del proto.input[index]
        for call in calls:
            if index < len(call.input):
                operands.add(call.input[index])
                del call.input[index]
    return operands


def _read_in_graph(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    """Which of ``names`` a node of ``graph`` (or a subgraph of one) reads, or an output returns."""
    if not names:
        return set()
    read = {o.name for o in graph.output} & names
    for node in graph.node:
        if not names.isdisjoint(node.input):
            read.update(names.intersection(node.input))
        if node.op_type in SUBGRAPH_OPS:
            read |= (
                used_names(
                    [graph_of for a in node.attribute for graph_of in [a.g, *a.graphs] if graph_of.node]
                )
                & names
            )
    return read


def _readers(model: onnx.ModelProto, name: str) -> str:
    """The op types of the main-graph nodes that read ``name``, for the report."""
    ops = sorted({n.op_type for n in model.graph.node if name in n.input})
    return ", ".join(ops)


def _import_domain(imports: Any) -> None:  # a repeated OperatorSetIdProto field
    if not any(entry.domain == PAGED_DOMAIN for entry in imports):
        entry = imports.add()
        entry.domain, entry.version = PAGED_DOMAIN, 1


def _remove_unused_functions(model: onnx.ModelProto) -> None:
    """Drop the definition of a Ctx op only when no node calls it any more: KV calls became paged
    ops, but a LoRA ``CtxGatherCB`` on adapter weights still needs its definition."""
    called = {(n.domain, n.op_type) for n in model.graph.node}
    called |= {(n.domain, n.op_type) for f in model.functions for n in f.node}
    kept = [f for f in model.functions if not is_ctx_op(f.domain, f.name) or (f.domain, f.name) in called]
    if len(kept) != len(model.functions):
        del model.functions[:]
        model.functions.extend(kept)
