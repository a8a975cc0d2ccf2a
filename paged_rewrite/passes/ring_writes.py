"""Find the writes that wrap: a cache written at ``position % C`` for a constant ``C``.

Llama 4's chunked-attention layers keep each chunk of ``attention_chunk_size`` tokens at slots
``p % C`` of a cache as long as the context (``Where(p == -1, p, Mod(p, C))``: padding stays
``-1``), and read only the slots their chunk has filled: a read position past the largest slot
written is the ``INT32_MAX`` "don't care" sentinel, and the mask hides it. Such a cache is a ring
of ``C`` slots, and is paged as one: its own table ``block_table_w<C>`` of ``C / kv_block_size``
columns and its own pool (``add_paged_inputs``), as a sliding-window ring is, while the graph
still sees a cache as long as the context (``rewire_logical_shape`` gives it the full table's
logical shape).

Whatever its reads, nothing the original holds is lost: the original writes only slots below
``C`` (and its padding into its last slot, which the paged model never does, as for every
export), and a read past the ring gathers the zero row where the original held the zeros a cache
starts with. That needs ``C`` to be a multiple of ``kv_block_size``, so that the ring table ends
at slot ``C`` exactly: otherwise its last block would have slots past ``C`` that no write ever
fills, so a cache whose ``C`` the block size does not divide stays a full-context cache.

A ring is found by structure, strictly: from the write's positions, through ``Cast`` and
``Identity``, to a ``Where`` that only lets padding through (a condition ``Equal(v, -1)``, its
``Not``, or ``Less(v, 0)``; the padding branch ``v`` itself or ``-1``; negative positions other
than ``-1`` are invalid writes either way) whose other branch is ``Mod(v, C)`` itself, ``C`` a
positive integer constant, following a layer function's input out to its call's operand.
``write_moduli`` also reports a looser modulus: any ``Mod`` by a constant a few producers up,
through any op. ``page_writes`` takes the slot guard's period from it (a smaller period only
accepts more ``slot_id`` values, all consistent ones), and the metadata records it for every cache
that stays in ``block_table``, whose first columns a runtime then treats as a ring.
"""

from __future__ import annotations

import onnx

from paged_rewrite.graph import int_constant
from paged_rewrite.passes.cache_op_rules import rule_for
from paged_rewrite.passes.sites import CacheSites, CacheTensor, Dim, WriteModulus

_SEARCH_DEPTH = 4


def write_moduli(sites: CacheSites) -> dict[str, WriteModulus]:
    """The ``WriteModulus`` of every cache, by name."""
    producers = _Producers(sites)
    return {
        tensor.name: WriteModulus(producers.loose_modulus(tensor), producers.ring_modulus(tensor))
        for tensor in sites.tensors
    }


def rings_in_full_caches(
    sites: CacheSites,
    moduli: dict[str, WriteModulus],
    context_dim: Dim,
    context_len: int | None,
    kv_block_size: int,
) -> dict[str, int]:
    """``{cache name: C}`` for the caches of length ``context_dim`` written as a ring of ``C``
    slots (``moduli``: ``write_moduli``), ``C`` a multiple of ``kv_block_size`` shorter than the
    context. A layer function's caches are all rings of one ``C`` or none (one body takes one
    table)."""
    found: dict[str, int | None] = {}
    for tensor in sites.tensors:
        ring = moduli[tensor.name].ring
        fits = ring is not None and ring % kv_block_size == 0 and (context_len is None or ring < context_len)
        found[tensor.name] = ring if fits and tensor.length_dim == context_dim else None
    by_function: dict[tuple[str, str], set[int | None]] = {}
    for tensor in sites.tensors:
        if tensor.call is not None:
            by_function.setdefault((tensor.call.domain, tensor.call.op_type), set()).add(found[tensor.name])
    rings = {}
    for tensor in sites.tensors:
        ring = found[tensor.name]
        mixed = tensor.call is not None and len(by_function[(tensor.call.domain, tensor.call.op_type)]) > 1
        if ring is not None and not mixed:
            rings[tensor.name] = ring
    return rings


class _Producers:
    """Who computes a value, in the main graph and in the function bodies holding writes, and
    which values are int constants."""

    def __init__(self, sites: CacheSites) -> None:
        self._sites = sites
        self._bodies = {id(body.proto): body for body in sites.bodies}
        self._initializers = {t.name: t for t in sites.model.graph.initializer}

    def loose_modulus(self, tensor: CacheTensor) -> int | None:
        """``C`` when the write's positions come, through any ops a few producers up, from
        ``Mod(x, C)`` for a constant ``C`` (either ``fmod``): where a write might wrap, a runtime
        had better treat it as a ring."""
        frontier = [(self._positions(tensor), self._body(tensor), tensor.call, 0)]
        while frontier:
            name, body, via, depth = frontier.pop()
            node = self._producer(name, body)
            if node is None:
                outer = self._outside(name, body, via)
                if outer is not None:
                    frontier.append((outer, self._sites.model.graph, None, depth))
                continue
            if depth >= _SEARCH_DEPTH:
                continue
            modulus = self._mod_divisor(node, body)
            if modulus is not None:
                return modulus
            frontier += [(x, body, via, depth + 1) for x in node.input if x]
        return None

    def ring_modulus(self, tensor: CacheTensor) -> int | None:
        """``C`` when the write's positions are exactly ``p % C`` with padding kept (module doc):
        a bare ``Mod`` is no ring, since it would write padding (``-1 % C``) into the ring."""
        name, body, via = self._positions(tensor), self._body(tensor), tensor.call
        for _ in range(2 * _SEARCH_DEPTH):
            node = self._producer(name, body)
            if node is None:
                outer = self._outside(name, body, via)
                if outer is None:
                    return None
                name, body, via = outer, self._sites.model.graph, None
                continue
            if node.op_type in ("Cast", "Identity"):
                name = node.input[0]
            elif node.op_type == "Where" and len(node.input) == 3:
                slots = self._slot_branch(node, body)
                mod = self._producer(slots, body) if slots is not None else None
                return self._mod_divisor(mod, body) if mod is not None else None
            else:
                return None
        return None

    def _slot_branch(self, where: onnx.NodeProto, body: onnx.GraphProto | onnx.FunctionProto) -> str | None:
        """The branch of a padding ``Where`` that carries the ring slots: the ``Mod`` side of
        ``Where(padding(v), v or -1, Mod(v, C))`` or of ``Where(Not(padding(v)), Mod(v, C), v or -1)``;
        None for any other ``Where``."""
        condition, if_true, if_false = where.input
        padding, negated = self._padding_test(condition, body)
        if padding is None:
            return None
        kept, slots = (if_false, if_true) if negated else (if_true, if_false)
        mod = self._producer(slots, body)
        divides_v = mod is not None and mod.op_type == "Mod" and mod.input[0] == padding
        keeps_padding = kept == padding or self._int(kept, body) == -1
        return slots if divides_v and keeps_padding else None

    def _padding_test(
        self, condition: str, body: onnx.GraphProto | onnx.FunctionProto
    ) -> tuple[str | None, bool]:
        """``(v, negated)`` when ``condition`` is ``Equal(v, -1)``, ``Less(v, 0)`` or the ``Not``
        of one; ``(None, False)`` otherwise."""
        node = self._producer(condition, body)
        negated = node is not None and node.op_type == "Not"
        if node is not None and negated:
            node = self._producer(node.input[0], body)
        if node is None or len(node.input) != 2:
            return None, False
        if (node.op_type, self._int(node.input[1], body)) in (("Equal", -1), ("Less", 0)):
            return node.input[0], negated
        return None, False

    def _mod_divisor(self, node: onnx.NodeProto, body: onnx.GraphProto | onnx.FunctionProto) -> int | None:
        """``C`` when ``node`` is ``Mod(x, C)``, ``C`` a positive integer constant. Either ``fmod``:
        the two agree for ``x >= 0``, and a negative result is an invalid write (the null block)."""
        if node.op_type != "Mod" or len(node.input) != 2:
            return None
        value = self._int(node.input[1], body)
        return value if value is not None and value > 0 else None

    def _int(self, name: str, body: onnx.GraphProto | onnx.FunctionProto) -> int | None:
        initializers = self._initializers if isinstance(body, onnx.GraphProto) else {}
        return int_constant(name, self._bodies[id(body)].producers(), initializers)

    def _producer(self, name: str, body: onnx.GraphProto | onnx.FunctionProto) -> onnx.NodeProto | None:
        return self._bodies[id(body)].producers().get(name)

    def _outside(
        self, name: str, body: onnx.GraphProto | onnx.FunctionProto, via: onnx.NodeProto | None
    ) -> str | None:
        """The call's operand for a function input ``name``, else None."""
        if via is None or not isinstance(body, onnx.FunctionProto) or name not in body.input:
            return None
        index = list(body.input).index(name)
        return via.input[index] if index < len(via.input) else None

    def _positions(self, tensor: CacheTensor) -> str:
        node = tensor.write.node
        rule = rule_for(node.domain, node.op_type, len(node.input))
        assert rule is not None
        return str(node.input[rule.operand("positions")])

    @staticmethod
    def _body(tensor: CacheTensor) -> onnx.GraphProto | onnx.FunctionProto:
        return tensor.write.body.proto
