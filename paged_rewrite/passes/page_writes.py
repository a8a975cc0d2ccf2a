"""Page the writes: every cache write (``CtxScatter``, ``CtxScatterCB``) becomes
``PagedCtxScatter(pool, block_table, slot_id, positions, updates, slot_period)`` — see
``cache_op_rules``. ``slot_period`` is ``kv_block_size`` for full-context caches and
``gcd(window, kv_block_size)`` for ring buffers, whose positions are ring slots."""

from __future__ import annotations

import math

from paged_rewrite.passes._edit import insert_constant, replace_by_rule
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.find_cache_sites import CacheSites


def page_writes(sites: CacheSites, layout: PagedLayout) -> int:
    """Replace every cache write (once per node, shared function bodies included)."""
    period = {t.write: _slot_period(t.length_dim, layout) for t in sites.tensors}
    paged = {}
    for old in sites.writes:
        constant = insert_constant(old, f"{old.name}/slot_period", period[old])
        paged[old] = replace_by_rule(old, layout, {"slot_period": constant})
    for tensor in sites.tensors:
        if tensor.call is None:  # a main-graph write produces the graph output itself
            tensor.output = paged[tensor.write].outputs[0]
        tensor.write = paged[tensor.write]
    sites.writes = list(paged.values())
    return len(paged)


def _slot_period(length_dim: object, layout: PagedLayout) -> int:
    if isinstance(length_dim, str) and length_dim in layout.windows:
        return math.gcd(layout.windows[length_dim], layout.kv_block_size)
    return layout.kv_block_size
