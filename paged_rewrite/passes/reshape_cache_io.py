"""Reshape the cache I/O: ``past_*`` inputs and their ``_RetainedState`` outputs keep their names
and become block pools ``[total_num_kv_blocks, kv_heads, kv_block_size, head_dim]``. Values inside
the graph that carried the old context-length dim now carry the logical length."""

from __future__ import annotations

import onnx_ir as ir

from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.find_cache_sites import CacheSites, dim_value


def reshape_cache_io(sites: CacheSites, layout: PagedLayout) -> None:
    """Give every cache input and output the pool shape; fix stale intermediate shapes."""
    for tensor in sites.tensors:
        pool = ir.Shape([layout.total_num_kv_blocks, tensor.kv_heads, layout.kv_block_size, tensor.head_dim])
        tensor.input.shape = pool
        tensor.output.shape = pool
    io = {v for t in sites.tensors for v in (t.input, t.output)}
    old = layout.old_length_dim
    if not isinstance(old, str):
        return
    for node in sites.graph:
        for value in node.outputs:
            if value in io or value.shape is None:
                continue
            dims = [dim_value(d) for d in value.shape]
            if old in dims:
                value.shape = ir.Shape([layout.logical_length if d == old else d for d in dims])
