"""Sliding-window layers kept as ring buffers, as QEfficient exports gpt-oss's.

With ``ExportSpec.sliding_window`` set, layer 0's cache has the symbolic length ``sliding_window``
instead of ``ctx_len``, and the graph takes the window from that length (``Shape(past_key.0)[2]``),
as the gpt-oss export does; the value is only known when the caller binds the dim:

* write: position ``p`` goes to ring slot ``p % W`` (padding keeps position ``-1``; with
  continuous batching it then becomes the INT32_MAX sentinel, like every CB write);
* read: the whole ring, slots ``0 .. W-1``, one ``CtxGather`` (``CtxGatherCB``) per K/V; slots
  never written yet (``slot > last position``) are read at the invalid index and V is zeroed;
* mask: slot ``j`` holds the latest position ``k = j (mod W)`` at most the row's last position
  ``m`` (``k = j`` while the ring has not wrapped); query ``q`` sees it iff ``q - W < k <= q``.
"""

from __future__ import annotations

import numpy as np

from paged_rewrite.builder.graph_builder import GraphBuilder

RING_LAYER = 0
"""The layer whose cache is the ring (gpt-oss alternates, starting with a sliding layer)."""


def ring_length(g: GraphBuilder, scope: str) -> str:
    """Scalar int64: the ring's length, ``Shape(past_key.0)[2]``."""
    shape = g.op("Shape", [f"past_key.{RING_LAYER}"], scope)
    return g.op("Gather", [shape, g.const(scope, np.array(2, np.int64))], scope, axis=0)


def ring_positions(g: GraphBuilder, scope: str) -> str:
    """``[B, S]``: the ring slot each token is written to, ``-1`` for padding."""
    window = ring_length(g, scope)
    padding = g.op("Equal", ["position_ids", g.const(scope, np.array(-1, np.int64))], scope)
    slots = g.op("Mod", ["position_ids", window], scope, fmod=0)
    return g.op("Where", [padding, "position_ids", slots], scope)


def window_mask(g: GraphBuilder, scope: str) -> str:
    """``[B, 1, S, W]`` (True = hidden): the ring slots outside each query's window, or not yet
    written."""
    window = ring_length(g, scope)
    zero, one = g.const(scope, np.array(0, np.int64)), g.const(scope, np.array(1, np.int64))
    slots = g.op("Range", [zero, window, one], scope)
    slots = g.op("Reshape", [slots, g.ints(scope, 1, -1)], scope)  # [1, W]
    last = g.op("ReduceMax", ["position_ids"], scope, axes=[1], keepdims=1)  # [B, 1]
    # floor(last / W) with an integer Div, exact for last >= -W (padding rows have last = -1)
    rounds = g.op("Div", [g.op("Add", [last, window], scope), window], scope)
    rounds = g.op("Sub", [rounds, one], scope)
    held = g.op("Add", [slots, g.op("Mul", [rounds, window], scope)], scope)  # [B, W]
    # a slot past the last position holds the previous round's position, if there was one
    previous = g.op("Sub", [held, window], scope)
    after_last = g.op("Greater", [held, last], scope)
    wrapped = g.op("And", [after_last, g.op("GreaterOrEqual", [previous, zero], scope)], scope)
    held = g.op("Where", [wrapped, previous, held], scope)
    held = g.op("Unsqueeze", [held, g.ints(scope, 1)], scope)  # [B, 1, W]
    query = g.op("Unsqueeze", ["position_ids", g.ints(scope, -1)], scope)  # [B, S, 1]
    later = g.op("Greater", [held, query], scope)
    too_old = g.op("LessOrEqual", [held, g.op("Sub", [query, window], scope)], scope)
    return g.op("Unsqueeze", [g.op("Or", [later, too_old], scope), g.ints(scope, 1)], scope)


def chunk_window_mask(g: GraphBuilder, chunk_mask: str, scope: str) -> str:
    """The prefill-only graph's chunk mask ``[B, 1, S, S]``, also hiding keys ``W`` or more
    positions before the query."""
    window = ring_length(g, scope)
    query = g.op("Unsqueeze", ["position_ids", g.ints(scope, -1)], scope)  # [B, S, 1]
    key = g.op("Unsqueeze", ["position_ids", g.ints(scope, 1)], scope)  # [B, 1, S]
    too_old = g.op("LessOrEqual", [key, g.op("Sub", [query, window], scope)], scope)
    return g.op("Or", [chunk_mask, g.op("Unsqueeze", [too_old, g.ints(scope, 1)], scope)], scope)
