"""Find the full-length caches a layer reads as a window over logical positions.

QEfficient's chunked and disaggregated exports of sliding-window layers (gpt-oss with
``retain_full_kv``, chunked prefill) keep such a layer's cache at the full context and read only
the window before the call: ``[p0 - W, p0 + S)``, with ``p0`` the call's first position, as
``Range(0, S + W) + Where(p0 >= W, p0 - W, 0)``. Blocks behind that window are never read
again, so a runtime may free them (their table entries become ``-1``): the layer then holds
window-sized memory without a ring. This pass finds ``W`` by structure — a read whose positions
come, a few producers up, from ``Sub(x, W)`` where ``x`` is computed from ``position_ids`` and
``W`` is a positive integer constant — and matches nothing else: a read over the whole context
(``Range(0, ctx_len)``) and a ring (positions ``p % W``, a cache of the window's length) have no
such ``Sub``.
"""

from __future__ import annotations

from collections import deque

import onnx

from paged_rewrite.graph import Body, int_constant
from paged_rewrite.passes.cache_op_rules import rule_for
from paged_rewrite.passes.sites import CacheSites, CacheTensor

POSITIONS = "position_ids"
_READ_DEPTH = 8  # producers followed up from a read's positions
_POSITION_DEPTH = 4  # from the Sub's first operand up to position_ids


def logical_windows(sites: CacheSites, context_dim: object) -> dict[str, int]:
    """``{cache name: W}`` for the full-context caches (length ``context_dim``) whose reads all
    take the window ``[p0 - W, p0 + S)``."""
    found: dict[str, set[int | None]] = {}
    indexes: dict[int, _Producers] = {}  # per body, built once: a 70B graph has 160 reads
    for site in sites.reads:
        rule = rule_for(site.node.domain, site.node.op_type, len(site.node.input))
        assert rule is not None and site.cache is not None
        if id(site.body.proto) not in indexes:
            indexes[id(site.body.proto)] = _Producers(site.body)
        index = indexes[id(site.body.proto)]
        positions = site.node.input[rule.operand("ctx_indices")]
        window = _window_of(index, positions) if index.has_window_subs else None
        for tensor in _served(sites, site.cache):
            found.setdefault(tensor.name, set()).add(window)
    lengths = {t.name: t.length_dim for t in sites.tensors}
    result = {}
    for name, windows in found.items():
        (window, *others) = windows
        if lengths[name] == context_dim and window is not None and not others:
            result[name] = window
    return result


def _served(sites: CacheSites, cache: CacheTensor) -> list[CacheTensor]:
    """The caches a read serves: its own, or every cache passed to the layer function it sits in."""
    if cache.call is None:
        return [cache]
    key = (cache.call.domain, cache.call.op_type)
    return [t for t in sites.tensors if t.call is not None and (t.call.domain, t.call.op_type) == key]


class _Producers:
    """Who computes each value of one body, and its initializers (the main graph's)."""

    def __init__(self, body: Body) -> None:
        self.nodes = body.producers()
        proto = body.proto
        self.initializers = (
            {t.name: t for t in proto.initializer} if isinstance(proto, onnx.GraphProto) else {}
        )
        # No Sub by a positive constant in the body: no window to find, and no read to walk.
        self.has_window_subs = any(
            node.op_type == "Sub"
            and len(node.input) == 2
            and (int_constant(node.input[1], self.nodes, self.initializers) or 0) > 0
            for node in proto.node
        )


def _window_of(index: _Producers, positions: str) -> int | None:
    producers = index.nodes
    queue = deque([(positions, 0)])
    seen = set()
    while queue:
        name, depth = queue.popleft()
        node = producers.get(name)
        if node is None or name in seen or depth > _READ_DEPTH:
            continue
        seen.add(name)
        if node.op_type == "Sub" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            window = int_constant(node.input[1], producers, index.initializers)
            if window is not None and window > 0 and _reaches_positions(node.input[0], producers):
                return window
        queue.extend((value, depth + 1) for value in node.input if value)
    return None


def _reaches_positions(name: str, producers: dict[str, onnx.NodeProto]) -> bool:
    frontier = [(name, 0)]
    while frontier:
        value, depth = frontier.pop()
        if value == POSITIONS:
            return True
        node = producers.get(value)
        if node is not None and depth < _POSITION_DEPTH:
            frontier.extend((i, depth + 1) for i in node.input if i)
    return False
