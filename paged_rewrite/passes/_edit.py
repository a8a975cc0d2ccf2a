"""The graph edits the passes share: swap a node for a paged op, keeping its outputs' names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from paged_rewrite.custom_ops import PAGED_DOMAIN
from paged_rewrite.passes.cache_op_rules import rule_for

if TYPE_CHECKING:
    from paged_rewrite.passes.add_paged_inputs import PagedLayout


def replace_with_paged_op(old: ir.Node, op_type: str, inputs: Sequence[ir.Value | None]) -> ir.Node:
    """Insert ``PAGED_DOMAIN::op_type(inputs)`` in place of ``old``.

    The new node takes over ``old``'s name and its outputs' names, shapes, types and uses
    (graph and function outputs included), so the rest of the graph sees no change.
    """
    graph = old.graph
    assert graph is not None, f"node {old.name!r} is not in a graph"
    new = ir.Node(PAGED_DOMAIN, op_type, inputs, num_outputs=len(old.outputs), name=old.name)
    graph.insert_before(old, new)
    for before, after in zip(old.outputs, new.outputs, strict=True):
        name = before.name
        after.type, after.shape = before.type, before.shape
        before.replace_all_uses_with(after, replace_graph_outputs=True)
        before.name = None
        after.name = name
    graph.remove(old, safe=True)
    return new


def insert_constant(anchor: ir.Node, name: str, values: int | list[int]) -> ir.Value:
    """An int64 ``Constant`` (scalar for an int) right before ``anchor``; unlike an initializer
    it also works inside a function body."""
    tensor = ir.tensor(values, dtype=ir.DataType.INT64)
    node = ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)], name=name)
    assert anchor.graph is not None
    anchor.graph.insert_before(anchor, node)
    node.outputs[0].name = name
    return node.outputs[0]


def replace_by_rule(node: ir.Node, layout: PagedLayout, extra: dict[str, ir.Value] | None = None) -> ir.Node:
    """Replace a cache op by the paged op its rule emits, operands in the paged op's order;
    ``extra`` supplies operands the matched op does not have (``slot_period``)."""
    rule = rule_for(node.domain, node.op_type)
    assert rule is not None, f"no cache-op rule for {node.op_type}"
    block_table, slot_id = layout.addressing(node)
    paged = {"block_table": block_table, "slot_id": slot_id, **(extra or {})}
    operands = [
        paged[name] if name in paged else node.inputs[rule.operand(name)] for name in rule.emits_operands
    ]
    return replace_with_paged_op(node, rule.emits, operands)
