"""Rewire, don't patch: every ``Shape`` of a cache (input or written output, in the graph or in
a function body) becomes the shape the contiguous cache had — ``PagedLogicalShape``
(``[batch, heads, num_kv_blocks*kv_block_size, head_dim]``, from ``block_table``) for full-length
caches (whichever table addresses them: a logical-position window's, a ring's),
``PagedWindowShape`` (``[batch, heads, window, head_dim]``, through the ring's own table) for ring
buffers. Masks, context
lengths and batch sizes derived downstream then follow the logical view. Like the addresses, the
logical shape is computed once per call for every cache of the same heads and head_dim
(``shared_index``); each ``Shape`` node becomes an ``Identity`` of it (a ``Slice`` for
``Shape(start, end)``)."""

from __future__ import annotations

from paged_rewrite.graph import become
from paged_rewrite.passes.shared_index import POOL, SharedIndex
from paged_rewrite.passes.sites import CacheSites, PagedLayout, PassResult


def rewire_logical_shape(sites: CacheSites, layout: PagedLayout, shared: SharedIndex) -> PassResult:
    """Replace every ``Shape`` read of a cache (what a ``Shape`` read stays read: nothing dropped)."""
    for site, length_dim in sites.shape_reads:
        assert site.cache is not None
        node = site.node
        attributes = {a.name: a.i for a in node.attribute}
        start, end = attributes.get("start", 0), attributes.get("end")
        if length_dim in layout.windows:
            window = (layout.windows[length_dim],)
            table = layout.group_of(site.cache).table  # its window table, or the one shared table
            (logical,) = shared.request(site, "PagedWindowShape", [POOL, table, window], ["window_shape"])
        else:  # a full-length cache, whatever table addresses it, spans the context of block_table
            (logical,) = shared.request(
                site, "PagedLogicalShape", [POOL, layout.block_table], ["logical_shape"], shape_only=True
            )
        if start == 0 and end in (None, 4):
            become(node, "", "Identity", [logical])
            continue
        # Shape(start, end) is a slice of the logical shape: the node becomes the Slice.
        starts = site.body.constant(node, layout.fresh_name("start"), [start])
        ends = site.body.constant(node, layout.fresh_name("end"), [end if end is not None else 4])
        become(node, "", "Slice", [logical, starts, ends])
    return PassResult(changed=len(sites.shape_reads))
