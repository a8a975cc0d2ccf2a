"""Page the writes: ``CtxScatter(cache, position_ids, updates)`` becomes
``PagedCtxScatter(pool, block_table, slot_id, position_ids, updates)``."""

from __future__ import annotations

from paged_rewrite.passes._edit import replace_with_paged_op
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.find_cache_sites import CacheSites


def page_writes(sites: CacheSites, layout: PagedLayout) -> int:
    """Replace every cache write; returns how many were replaced."""
    for tensor in sites.tensors:
        pool, position_ids, updates = tensor.write.inputs
        tensor.write = replace_with_paged_op(
            tensor.write, "PagedCtxScatter", [pool, layout.block_table, layout.slot_id, position_ids, updates]
        )
        tensor.output = tensor.write.outputs[0]
    return len(sites.tensors)
