"""Page the writes: every cache write (``CtxScatter``, ``CtxScatterCB``) becomes
``PagedCtxScatter(pool, block_table, slot_id, positions, updates, slot_period)`` — see
``cache_op_rules``. ``slot_period`` is ``kv_block_size`` for full-context caches and
``gcd(window, kv_block_size)`` for ring buffers, whose positions are ring slots."""

from __future__ import annotations

import math

from paged_rewrite.passes._edit import replace_by_rule
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.sites import CacheSites, Dim


def page_writes(sites: CacheSites, layout: PagedLayout) -> int:
    """Replace every cache write (once per node, shared function bodies included)."""
    for site in sites.writes:
        length = next(t.length_dim for t in sites.tensors if t.write.node is site.node)
        period = site.body.constant(site.node, layout.fresh_name("slot_period"), _slot_period(length, layout))
        replace_by_rule(site, layout, {"slot_period": period})
    return len(sites.writes)


def _slot_period(length_dim: Dim, layout: PagedLayout) -> int:
    if length_dim in layout.windows:
        return math.gcd(layout.windows[length_dim], layout.kv_block_size)
    return layout.kv_block_size
