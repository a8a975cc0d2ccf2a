"""The one graph edit every pass uses: swap a node for a paged op, keeping its outputs' names."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from paged_rewrite.custom_ops import PAGED_DOMAIN


def replace_with_paged_op(old: ir.Node, op_type: str, inputs: Sequence[ir.Value | None]) -> ir.Node:
    """Insert ``PAGED_DOMAIN::op_type(inputs)`` in place of ``old``.

    The new node takes over ``old``'s name and its outputs' names, shapes, types and uses
    (graph outputs included), so the rest of the graph and the model's interface see no change.
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
