"""Page the writes: every cache write (``CtxScatter``, ``CtxScatterCB``) becomes
``PagedCtxScatter(pool, write_index, updates, zeros)``, its ``write_index`` (and the ``zeros`` it
writes to the null block's zero row) computed by
``PagedWriteIndex(pool, block_table, slot_id, positions, slot_period)`` once for every cache
written at the same positions (``shared_index``). ``slot_period`` is the period over which ``slot_id`` (a logical position
modulo ``kv_block_size``) and the written slot must agree: ``kv_block_size`` for full-context
caches, ``gcd(window, kv_block_size)`` for ring buffers, whose positions are ring slots — and the
same for caches written at ``position % C`` with a constant ``C`` (Llama 4's chunked-attention
layers wrap inside the first ``C`` slots of a full-length cache)."""

from __future__ import annotations

import math

import onnx

from paged_rewrite.graph import int_constant
from paged_rewrite.passes._edit import replace_by_rule
from paged_rewrite.passes.cache_op_rules import rule_for
from paged_rewrite.passes.shared_index import SharedIndex
from paged_rewrite.passes.sites import CacheSites, Dim, PagedLayout, PassResult, Site

_PASS_THROUGH = frozenset({"Where", "Cast", "Identity"})  # ops a ring slot flows through unchanged
_SEARCH_DEPTH = 4


def page_writes(sites: CacheSites, layout: PagedLayout, shared: SharedIndex) -> PassResult:
    """Replace every cache write (once per node, shared function bodies included)."""
    producers = _Producers(sites)
    result = PassResult(changed=len(sites.writes))
    for site in sites.writes:
        tensor = site.cache
        assert tensor is not None
        period = _slot_period(tensor.length_dim, layout)
        modulus = producers.constant_modulus(site, tensor.call)
        if modulus is not None:
            period = math.gcd(period, modulus)
        result.dropped |= replace_by_rule(site, layout, shared, {"slot_period": period})
    return result


def _slot_period(length_dim: Dim, layout: PagedLayout) -> int:
    if length_dim in layout.windows:
        return math.gcd(layout.windows[length_dim], layout.kv_block_size)
    return layout.kv_block_size


class _Producers:
    """Who computes a value, in the main graph and in the function bodies holding writes, and
    which values are int constants; built once, on first use."""

    def __init__(self, sites: CacheSites) -> None:
        self._sites = sites
        self._bodies = {id(body.proto): body for body in sites.bodies}
        self._initializers = {t.name: t for t in sites.model.graph.initializer}

    def constant_modulus(self, site: Site, call: onnx.NodeProto | None) -> int | None:
        """``C`` when the write's positions are ``Mod(x, C)`` for a constant ``C`` (through
        ``Where``/``Cast``), following a function input out to the call's operand."""
        rule = rule_for(site.node.domain, site.node.op_type, len(site.node.input))
        assert rule is not None
        positions = site.node.input[rule.operand("positions")]
        frontier = [(positions, site.body.proto, call, 0)]
        while frontier:
            name, body, via, depth = frontier.pop()
            node = self._producers(body).get(name)
            if (
                node is None
                and via is not None
                and isinstance(body, onnx.FunctionProto)
                and name in body.input
            ):
                index = list(body.input).index(name)
                if index < len(via.input):
                    frontier.append((via.input[index], self._sites.model.graph, None, depth))
                continue
            if node is None or depth >= _SEARCH_DEPTH:
                continue
            if node.op_type == "Mod" and len(node.input) == 2:
                initializers = self._initializers if isinstance(body, onnx.GraphProto) else {}
                value = int_constant(node.input[1], self._producers(body), initializers)
                if value is not None and value > 0:
                    return value
            if node.op_type in _PASS_THROUGH:
                frontier += [(x, body, via, depth + 1) for x in node.input[-2:] if x]
        return None

    def _producers(self, body: onnx.GraphProto | onnx.FunctionProto) -> dict[str, onnx.NodeProto]:
        return self._bodies[id(body)].producers()
