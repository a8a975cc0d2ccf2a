"""Reshape the cache I/O: ``past_*`` inputs and their ``_RetainedState`` outputs keep their names
and become block pools ``[total_num_kv_blocks, kv_heads, kv_block_size, head_dim]`` (a window
group's pools: ``[total_num_kv_blocks_w<W>, ...]``). Recorded
shapes (``value_info``) that carried an old length dim now carry the logical length."""

from __future__ import annotations

from paged_rewrite.graph import dims_of, set_dims
from paged_rewrite.passes.shared_index import SharedIndex
from paged_rewrite.passes.sites import CacheSites, PagedLayout, PassResult


def reshape_cache_io(sites: CacheSites, layout: PagedLayout, shared: SharedIndex) -> PassResult:
    """Give every cache input and output the pool shape; fix stale intermediate shapes (values
    keep their readers: nothing dropped)."""
    changed = 0
    for tensor in sites.tensors:
        blocks = layout.group_of(tensor).pool_dim  # a window group's pool is its own
        pool = [blocks, tensor.kv_heads, layout.kv_block_size, tensor.head_dim]
        set_dims(tensor.input, pool)
        set_dims(tensor.output, pool)
        changed += 1
    logical: dict[str, int | None] = {d: n for d, n in layout.windows.items() if isinstance(d, str)}
    if isinstance(layout.context_dim, str):
        logical[layout.context_dim] = layout.logical_length
    value_infos = [sites.model.graph.value_info, *(f.value_info for f in sites.model.functions)]
    for values in value_infos:
        for value in values:
            dims = dims_of(value)
            if any(isinstance(d, str) and d in logical for d in dims):
                set_dims(value, [logical.get(d) if isinstance(d, str) and d in logical else d for d in dims])
    return PassResult(changed=changed)
