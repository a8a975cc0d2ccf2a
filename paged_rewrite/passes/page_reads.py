"""Page the reads: ``CtxGather(cache, ctx_indices, comp_ctx_len)`` becomes
``PagedCtxGather(pool, block_table, ctx_indices, comp_ctx_len)``, which reads the same logical
positions through the block table (invalid ones read the null block)."""

from __future__ import annotations

from paged_rewrite.passes._edit import replace_with_paged_op
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.find_cache_sites import CacheSites


def page_reads(sites: CacheSites, layout: PagedLayout) -> int:
    """Replace every cache read; returns how many were replaced."""
    count = 0
    for tensor in sites.tensors:
        paged = []
        for read in tensor.reads:
            pool, ctx_indices, comp_ctx_len = read.inputs
            paged.append(
                replace_with_paged_op(
                    read, "PagedCtxGather", [pool, layout.block_table, ctx_indices, comp_ctx_len]
                )
            )
        tensor.reads = paged
        count += len(paged)
    return count
