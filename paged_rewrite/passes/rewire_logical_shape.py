"""Rewire, don't patch: every ``Shape`` of a cache (input or written output, in the graph or in
a function body) becomes the shape the contiguous cache had — ``PagedLogicalShape``
(``[batch, heads, num_kv_blocks*kv_block_size, head_dim]``) for full-context caches,
``PagedWindowShape`` (``[batch, heads, window, head_dim]``) for ring buffers. Masks, context
lengths and batch sizes derived downstream then follow the logical view."""

from __future__ import annotations

from onnx import helper

from paged_rewrite.custom_ops import PAGED_DOMAIN
from paged_rewrite.graph import become
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.sites import CacheSites, Dim, Site


def rewire_logical_shape(sites: CacheSites, layout: PagedLayout) -> int:
    """Replace every ``Shape`` read of a cache; returns how many were replaced."""
    for site, length_dim in sites.shape_reads:
        node = site.node
        attributes = {a.name: a.i for a in node.attribute}
        start, end = attributes.get("start", 0), attributes.get("end")
        op_type, operands = _logical_shape_op(site, length_dim, layout)
        if start == 0 and end in (None, 4):
            become(node, PAGED_DOMAIN, op_type, operands)
            continue
        # Shape(start, end) is a slice of the logical shape: the node becomes the Slice.
        logical = layout.fresh_name("logical_shape")
        starts = site.body.constant(node, layout.fresh_name("start"), [start])
        ends = site.body.constant(node, layout.fresh_name("end"), [end if end is not None else 4])
        site.body.insert_before(
            node, [helper.make_node(op_type, operands, [logical], name=logical, domain=PAGED_DOMAIN)]
        )
        become(node, "", "Slice", [logical, starts, ends])
    return len(sites.shape_reads)


def _logical_shape_op(site: Site, length_dim: Dim, layout: PagedLayout) -> tuple[str, list[str]]:
    pool = site.node.input[0]
    if length_dim in layout.windows:
        window = site.body.constant(site.node, layout.fresh_name("window"), [layout.windows[length_dim]])
        return "PagedWindowShape", [pool, layout.block_table, window]
    return "PagedLogicalShape", [pool, layout.block_table]
