"""Rewire, don't patch: every ``Shape`` of a cache (input or written output) becomes
``PagedLogicalShape(pool, block_table)``, the ``[batch, heads, num_kv_blocks*kv_block_size,
head_dim]`` the contiguous cache had. Masks, context lengths and batch sizes derived from it
then follow the logical view, whatever nodes the exporter put downstream."""

from __future__ import annotations

import onnx_ir as ir

from paged_rewrite.passes._edit import replace_with_paged_op
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.find_cache_sites import CacheSites


def rewire_logical_shape(sites: CacheSites, layout: PagedLayout) -> int:
    """Replace every ``Shape`` read of a cache; returns how many were replaced."""
    count = 0
    for tensor in sites.tensors:
        for shape in tensor.shape_reads:
            _replace_shape(shape, layout)
            count += 1
        tensor.shape_reads = []
    return count


def _replace_shape(shape: ir.Node, layout: PagedLayout) -> None:
    start = shape.attributes.get_int("start", 0)
    end = shape.attributes.get_int("end", None)
    if start == 0 and end is None:
        replace_with_paged_op(shape, "PagedLogicalShape", [shape.inputs[0], layout.block_table])
        return
    # Shape(start, end) is a slice of the full logical shape.
    graph = shape.graph
    assert graph is not None
    logical = ir.Node("com.qualcomm.cloud", "PagedLogicalShape", [shape.inputs[0], layout.block_table])
    starts = ir.Value(name=f"{shape.name}/start", const_value=ir.tensor([start], dtype=ir.DataType.INT64))
    ends = ir.Value(
        name=f"{shape.name}/end",
        const_value=ir.tensor([end if end is not None else 4], dtype=ir.DataType.INT64),
    )
    graph.register_initializer(starts)
    graph.register_initializer(ends)
    sliced = ir.Node("", "Slice", [logical.outputs[0], starts, ends], name=shape.name)
    graph.insert_before(shape, [logical, sliced])
    name = shape.outputs[0].name
    shape.outputs[0].replace_all_uses_with(sliced.outputs[0], replace_graph_outputs=True)
    shape.outputs[0].name = None
    sliced.outputs[0].name = name
    graph.remove(shape, safe=True)
