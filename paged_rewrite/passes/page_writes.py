"""Page the writes: every cache write (``CtxScatter``, ``CtxScatterCB``) becomes
``PagedCtxScatter(pool, write_index, updates, zeros)``, its ``write_index`` (and the ``zeros`` it
writes to the null block's zero row) computed by
``PagedWriteIndex(pool, block_table, slot_id, positions, slot_period)`` once for every cache
written at the same positions (``shared_index``). ``slot_period`` is the period over which ``slot_id`` (a logical position
modulo ``kv_block_size``) and the written slot must agree: ``kv_block_size`` for full-context
caches, ``gcd(window, kv_block_size)`` for ring buffers, whose positions are ring slots — and the
same for caches written at ``position % C`` with a constant ``C`` (Llama 4's chunked-attention
layers: ``ring_writes.py``)."""

from __future__ import annotations

import math

from paged_rewrite.passes._edit import replace_by_rule
from paged_rewrite.passes.shared_index import SharedIndex
from paged_rewrite.passes.sites import CacheSites, Dim, PagedLayout, PassResult


def page_writes(sites: CacheSites, layout: PagedLayout, shared: SharedIndex) -> PassResult:
    """Replace every cache write (once per node, shared function bodies included)."""
    served: dict[int, list[str]] = {}  # a write in a layer function serves every layer calling it
    for tensor in sites.tensors:
        served.setdefault(id(tensor.write.node), []).append(tensor.name)
    result = PassResult(changed=len(sites.writes))
    for site in sites.writes:
        assert site.cache is not None
        period = _slot_period(site.cache.length_dim, layout)
        for name in served.get(id(site.node), [site.cache.name]):  # one period for all of them
            period = math.gcd(period, layout.write_moduli[name].modulus or period)
        result.dropped |= replace_by_rule(site, layout, shared, {"slot_period": period})
    return result


def _slot_period(length_dim: Dim, layout: PagedLayout) -> int:
    if length_dim in layout.windows:
        return math.gcd(layout.windows[length_dim], layout.kv_block_size)
    return layout.kv_block_size
