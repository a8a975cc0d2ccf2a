"""Page the reads: ``CtxGather`` / ``CtxGatherCB`` become ``PagedCtxGather`` and
``CtxGatherBlockedKV`` becomes ``PagedCtxGatherPositions``; each reads the same logical
positions through the block table (invalid ones read the null block)."""

from __future__ import annotations

from paged_rewrite.passes._edit import replace_by_rule
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.sites import CacheSites


def page_reads(sites: CacheSites, layout: PagedLayout) -> int:
    """Replace every cache read (once per node, shared function bodies included)."""
    for site in sites.reads:
        replace_by_rule(site, layout)
    return len(sites.reads)
