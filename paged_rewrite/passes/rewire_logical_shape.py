"""Rewire, don't patch: every ``Shape`` of a cache (input or written output, in the graph or in
a function body) becomes the shape the contiguous cache had — ``PagedLogicalShape``
(``[batch, heads, num_kv_blocks*kv_block_size, head_dim]``) for full-context caches,
``PagedWindowShape`` (``[batch, heads, window, head_dim]``) for ring buffers. Masks, context
lengths and batch sizes derived downstream then follow the logical view."""

from __future__ import annotations

import onnx_ir as ir

from paged_rewrite.custom_ops import PAGED_DOMAIN
from paged_rewrite.passes._edit import insert_constant, replace_with_paged_op
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.find_cache_sites import CacheSites


def rewire_logical_shape(sites: CacheSites, layout: PagedLayout) -> int:
    """Replace every ``Shape`` read of a cache; returns how many were replaced."""
    for shape, length_dim in sites.shape_reads.items():
        op_type, operands = _logical_shape_op(shape, length_dim, layout)
        start = shape.attributes.get_int("start", 0)
        end = shape.attributes.get_int("end", None)
        if start == 0 and end is None:
            replace_with_paged_op(shape, op_type, operands)
        else:
            _replace_sliced(shape, op_type, operands, start, end)
    count = len(sites.shape_reads)
    sites.shape_reads = {}
    return count


def _logical_shape_op(shape: ir.Node, length_dim: object, layout: PagedLayout) -> tuple[str, list[ir.Value]]:
    block_table, _ = layout.addressing(shape)
    pool = shape.inputs[0]
    assert pool is not None
    if isinstance(length_dim, str) and length_dim in layout.windows:
        window = insert_constant(shape, f"{shape.name}/window", [layout.windows[length_dim]])
        return "PagedWindowShape", [pool, block_table, window]
    return "PagedLogicalShape", [pool, block_table]


def _replace_sliced(
    shape: ir.Node, op_type: str, operands: list[ir.Value], start: int, end: int | None
) -> None:
    """``Shape(start, end)`` is a slice of the full logical shape."""
    graph = shape.graph
    assert graph is not None
    logical = ir.Node(PAGED_DOMAIN, op_type, operands, name=f"{shape.name}/logical")
    graph.insert_before(shape, logical)
    starts = insert_constant(shape, f"{shape.name}/start", [start])
    ends = insert_constant(shape, f"{shape.name}/end", [end if end is not None else 4])
    sliced = ir.Node("", "Slice", [logical.outputs[0], starts, ends], name=shape.name)
    graph.insert_before(shape, sliced)
    name = shape.outputs[0].name
    shape.outputs[0].replace_all_uses_with(sliced.outputs[0], replace_graph_outputs=True)
    shape.outputs[0].name = None
    sliced.outputs[0].name = name
    graph.remove(shape, safe=True)
