"""Page the reads: ``CtxGather`` (with or without a CCL length), ``CtxGatherCB`` and
``CtxGatherBlockedKV`` become ``PagedCtxGather(pool, rows, pick)``; ``rows`` and ``pick`` come
from ``PagedReadIndex`` (``PagedReadIndexCCL``), computed once for every cache read at the same
logical positions (``shared_index``). Invalid positions read zeros."""

from __future__ import annotations

from paged_rewrite.passes._edit import replace_by_rule
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.shared_index import SharedIndex
from paged_rewrite.passes.sites import CacheSites


def page_reads(sites: CacheSites, layout: PagedLayout, shared: SharedIndex) -> int:
    """Replace every cache read (once per node, shared function bodies included)."""
    for site in sites.reads:
        replace_by_rule(site, layout, shared)
    return len(sites.reads)
