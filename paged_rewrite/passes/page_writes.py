"""Page the writes: every cache write (``CtxScatter``, ``CtxScatterCB``) becomes
``PagedCtxScatter(pool, block_table, slot_id, positions, updates)`` — see ``cache_op_rules``."""

from __future__ import annotations

from paged_rewrite.passes._edit import replace_by_rule
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.find_cache_sites import CacheSites


def page_writes(sites: CacheSites, layout: PagedLayout) -> int:
    """Replace every cache write (once per node, shared function bodies included)."""
    paged = {old: replace_by_rule(old, layout) for old in sites.writes}
    for tensor in sites.tensors:
        if tensor.call is None:  # a main-graph write produces the graph output itself
            tensor.output = paged[tensor.write].outputs[0]
        tensor.write = paged[tensor.write]
    sites.writes = list(paged.values())
    return len(paged)
