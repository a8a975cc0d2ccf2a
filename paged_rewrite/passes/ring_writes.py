"""Find the writes that wrap: a cache written at ``position % C`` for a constant ``C``.

Llama 4's chunked-attention layers keep each chunk of ``attention_chunk_size`` tokens at slots
``p % C`` of a cache as long as the context, and read only the slots the chunk has filled (its
read positions beyond the largest written slot are the ``INT32_MAX`` "don't care" sentinel). Such
a cache never holds anything outside its first ``C`` slots: the rest stays as the runtime
initialized it (zeros). So it is a ring of ``C`` slots, paged like a sliding-window ring (its own
table ``block_table_w<C>`` of ``ceil(C / kv_block_size)`` columns and its own pool,
``add_paged_inputs``), with one difference: the graph still sees a cache as long as the context
(``rewire_logical_shape`` gives it the full table's logical shape), and its reads beyond the ring
gather the zero row, which is what the original read there.

Found by structure: the write's positions come from ``Mod(x, C)`` through ``Where``/``Cast``/
``Identity`` (``-1`` padding kept by a ``Where``), following a layer function's input out to the
call's operand. ``page_writes`` uses the same ``C`` for the slot guard's period.
"""

from __future__ import annotations

import onnx

from paged_rewrite.graph import int_constant
from paged_rewrite.passes.cache_op_rules import rule_for
from paged_rewrite.passes.sites import CacheSites, Site

_PASS_THROUGH = frozenset({"Where", "Cast", "Identity"})  # ops a ring slot flows through unchanged
_SEARCH_DEPTH = 4


def rings_in_full_caches(sites: CacheSites, context_dim: object, context_len: int | None) -> dict[str, int]:
    """``{cache name: C}`` for the caches of length ``context_dim`` written at ``position % C``,
    ``C`` shorter than the context. A layer function's caches are all rings of one ``C`` or
    none (one body takes one table)."""
    moduli = write_moduli(sites)
    found: dict[str, int | None] = {}
    for tensor in sites.tensors:
        modulus = moduli[tensor.name]
        shorter = modulus is not None and (context_len is None or modulus < context_len)
        found[tensor.name] = modulus if tensor.length_dim == context_dim and shorter else None
    by_function: dict[tuple[str, str], set[int | None]] = {}
    for tensor in sites.tensors:
        if tensor.call is not None:
            key = (tensor.call.domain, tensor.call.op_type)
            by_function.setdefault(key, set()).add(found[tensor.name])
    rings = {}
    for tensor in sites.tensors:
        ring = found[tensor.name]
        mixed = tensor.call is not None and len(by_function[(tensor.call.domain, tensor.call.op_type)]) > 1
        if ring is not None and not mixed:
            rings[tensor.name] = ring
    return rings


def write_moduli(sites: CacheSites) -> dict[str, int | None]:
    """``{cache name: C}``: the constant ``C`` its write's positions are taken modulo, or None."""
    producers = _Producers(sites)
    return {tensor.name: producers.constant_modulus(tensor.write, tensor.call) for tensor in sites.tensors}


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
