"""Reshape the cache I/O: ``past_*`` inputs and their ``_RetainedState`` outputs keep their names
and become block pools ``[total_num_kv_blocks, kv_heads, kv_block_size, head_dim]`` (also where a
function receives them). Values that carried an old length dim now carry the logical length."""

from __future__ import annotations

import onnx_ir as ir

from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.find_cache_sites import CacheSites, dim_value


def reshape_cache_io(sites: CacheSites, layout: PagedLayout) -> None:
    """Give every cache value the pool shape; fix stale intermediate shapes."""
    pools: set[ir.Value] = set()
    for tensor in sites.tensors:
        pool = ir.Shape([layout.total_num_kv_blocks, tensor.kv_heads, layout.kv_block_size, tensor.head_dim])
        values = [tensor.input, tensor.output, tensor.write.inputs[0], tensor.write.outputs[0]]
        for value in values:
            if value is not None and value.type is not None:  # function-internal values carry no type
                value.shape = pool
                pools.add(value)
    logical: dict[str, int | None] = dict(layout.windows)
    if isinstance(layout.context_dim, str):
        logical[layout.context_dim] = layout.logical_length
    bodies: list[ir.Graph] = [sites.model.graph, *(f.graph for f in sites.functions)]
    for body in bodies:
        for node in body:
            for value in node.outputs:
                if value in pools or value.shape is None:
                    continue
                dims = [dim_value(d) for d in value.shape]
                if any(d in logical for d in dims):
                    value.shape = ir.Shape([logical.get(d, d) if isinstance(d, str) else d for d in dims])
