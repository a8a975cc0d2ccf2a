"""Page the reads: ``CtxGather`` (with or without a CCL length), ``CtxGatherCB`` and
``CtxGatherBlockedKV`` become ``PagedCtxGather(pool, rows, row_shape)``; ``rows`` come from
``PagedReadIndex`` (``PagedReadIndexCCL``), computed once for every cache read at the same
logical positions (``shared_index``). Invalid positions read the null block's zero row, which
the write whose output every paged read takes (``find_cache_sites`` accepts no other read) has
just set to zeros."""

from __future__ import annotations

from paged_rewrite.passes._edit import replace_by_rule
from paged_rewrite.passes.shared_index import SharedIndex
from paged_rewrite.passes.sites import CacheSites, PagedLayout, PassResult


def page_reads(sites: CacheSites, layout: PagedLayout, shared: SharedIndex) -> PassResult:
    """Replace every cache read (once per node, shared function bodies included)."""
    result = PassResult(changed=len(sites.reads))
    for site in sites.reads:
        result.dropped |= replace_by_rule(site, layout, shared)
    return result
