"""The index ops, one per call for every cache that shares their operands.

Every cache of a layer, and every layer in the main graph, computes its paged addresses from the
same values: ``block_table``, ``slot_id`` and the positions the exporter passes to all of them.
The passes ask for an index op by what it reads (``request``); requests with the same op,
operands and pool signature get the same outputs, and ``place`` emits each op once:

- in the main graph when every operand is a main-graph value there, or a layer function's input
  that all its calls feed with the same main-graph value; the outputs then become new inputs of
  the layer function (as ``block_table`` and ``slot_id`` did), so a subfunction export keeps one
  shared layer body and computes the addresses once per call of the model, not once per layer;
- else inside the function body, once per call of the function (the positions are computed
  there, e.g. a ring slot ``p % window``).

Operands are the same when they compute the same thing, not only when they have the same name:
QEfficient recomputes the read positions in every layer from the same inputs, by nodes that differ
only in their names (``Where(Greater(Range(0, Gather(Shape(past_key.3), 2)), ...))``; once the
``Shape`` reads the shared logical shape, every layer's chain is the same expression). Values are
compared by that expression, a few producers deep, over deterministic standard ops; the layers'
now unread copies are pruned when the model is finalized.

Each op is placed right before the first node that needs it, reading that node's own operands. It
reads only the shape of the pool it is given, and the pool's number of blocks bounds the table
entries it accepts: any pool of the same heads, head_dim and table group will do (the pools of one
group share their number of blocks; a window group's pool is smaller than the full one), so the
signature a request is keyed by names the group's table, and the representative pool of a
main-graph op is one of that group. A logical shape reads no block count, only heads, head_dim and
the table it is given (``block_table`` for every full-length cache, whatever group addresses it):
one serves every group, on a pool of ``block_table``'s group where there is one (``shape_only``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
from onnx import helper

from paged_rewrite.custom_ops import PAGED_DOMAIN
from paged_rewrite.graph import Body, function_key
from paged_rewrite.passes.expression_keys import ExpressionKeys, comparable
from paged_rewrite.passes.sites import CacheSites, CacheTensor, PagedLayout, Site

# An operand as a pass states it: a value of the requesting body, an int64 constant, or POOL.
Operand = str | int | tuple[int, ...]
POOL = "<pool>"


_MAX_HOISTED_NODES = 48  # a layer function's position computation copied to the main graph


@dataclass
class _User:
    """A node that needs an index op, with the operands it would give it (names in the op's body)."""

    node: onnx.NodeProto
    operands: list[Operand]


@dataclass
class _IndexNode:
    """One index op to emit into ``body``, before the first of ``users``."""

    body: Body
    op_type: str
    outputs: list[str]
    users: list[_User] = field(default_factory=list)


class SharedIndex:
    """Deduplicates and places the index ops of one rewrite (see the module doc)."""

    def __init__(self, sites: CacheSites, layout: PagedLayout) -> None:
        self._sites = sites
        self._layout = layout
        self._nodes: dict[tuple[object, ...], _IndexNode] = {}
        self._calls: dict[tuple[str, str], list[onnx.NodeProto]] = {}
        local = {function.name for function in sites.model.functions}  # a cheap test first: 70B graphs
        for node in sites.model.graph.node:
            if node.op_type in local:
                self._calls.setdefault(function_key(node), []).append(node)
        self._threaded: dict[tuple[str, str], list[str]] = {}  # function -> hoisted inputs added
        self._expressions: dict[int, ExpressionKeys] = {}
        self._clones: dict[tuple[str, str], dict[str, str]] = {}  # function -> values moved -> copies
        self._producer_maps: dict[int, dict[str, onnx.NodeProto]] = {}
        self._orders: dict[int, dict[int, int]] = {}
        self._cache_names = {t.name for t in sites.tensors}
        self._copies: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
        self.dropped: set[str] = set()  # values of layer functions moved to the main graph

    def request(
        self,
        site: Site,
        op_type: str,
        operands: Sequence[Operand],
        outputs: Sequence[str],
        shape_only: bool = False,
    ) -> list[str]:
        """The names, in ``site``'s body, of the outputs of ``op_type(operands)`` for the cache
        ``site`` touches; ``outputs`` names them for reading (``"rows"``, ``"row_shape"``).
        ``shape_only``: the op reads only the pool's heads and head_dim and the table it is given
        (a logical shape), so one op serves the caches of every group; its pool is one of that
        table's group where the group has one of those heads and head_dim."""
        assert site.cache is not None
        signature = self._layout.pool_signature(site.cache)
        if shape_only:
            table = operands[1]
            assert isinstance(table, str)
            signature = (*site.cache.pool_signature, table)
        hoisted = self._in_main_graph(site, operands) if site.body.is_function else None
        body = self._sites.main if hoisted is not None or not site.body.is_function else site.body
        resolved = hoisted if hoisted is not None else list(operands)
        if body is self._sites.main:  # a graph input of the same shape serves every user
            resolved = [self._main_pool(signature) if o == POOL else o for o in resolved]
        else:
            resolved = [site.node.input[0] if o == POOL else o for o in resolved]
        expressions = self._expressions_of(body)
        key = (
            id(body.proto),
            op_type,
            signature,  # heads, head_dim and table group: any pool of those will do (module doc)
            *(
                o if o == POOL or not isinstance(o, str) else expressions.key(o)
                for o in _with_pool(operands, resolved)
            ),
        )
        index = self._nodes.get(key)
        if index is None:
            names = [self._layout.fresh_name(what) for what in outputs]
            index = self._nodes[key] = _IndexNode(body, op_type, names)
        if body is site.body:
            index.users.append(_User(site.node, resolved))
            return list(index.outputs)
        calls = self._calls[function_key_of(site.body)]
        index.users.extend(_User(call, resolved) for call in calls)
        self._thread(site.body, calls, index.outputs)
        return list(index.outputs)

    @property
    def count(self) -> int:
        """Index ops requested so far (each emitted once)."""
        return len(self._nodes)

    def place(self) -> None:
        """Emit every requested index op before its first user, with that user's operands. Ops
        that read no copied value go first: a copy may read them (a ring's slots read the shared
        window shape), and the others read the copies."""
        copied = {name for copies in self._copies for node in copies[1] for name in node.output}
        indices = sorted(
            self._nodes.values(), key=lambda index: any(o in copied for u in index.users for o in u.operands)
        )
        reads_copies = [any(o in copied for u in i.users for o in u.operands) for i in indices]
        for index, after_copies in zip(indices, reads_copies, strict=True):
            if after_copies and self._copies:
                for anchor, copies in self._copies:
                    self._sites.main.insert_before(anchor, copies)
                self._copies.clear()
            self._emit(index)
        for anchor, copies in self._copies:
            self._sites.main.insert_before(anchor, copies)
        self._copies.clear()

    def _emit(self, index: _IndexNode) -> None:
        order = self._order_of(index.body)
        first = min(index.users, key=lambda user: order[id(user.node)])
        operands = []
        for operand in first.operands:
            if isinstance(operand, str):
                operands.append(operand)
            else:
                values = operand if isinstance(operand, int) else list(operand)
                operands.append(index.body.constant(first.node, self._layout.fresh_name("constant"), values))
        node = helper.make_node(
            index.op_type, operands, index.outputs, name=index.outputs[0], domain=PAGED_DOMAIN
        )
        index.body.insert_before(first.node, [node])

    def _expressions_of(self, body: Body) -> ExpressionKeys:
        if id(body.proto) not in self._expressions:
            self._expressions[id(body.proto)] = ExpressionKeys(body)
        return self._expressions[id(body.proto)]

    def _in_main_graph(self, site: Site, operands: Sequence[Operand]) -> list[Operand] | None:
        """The operands as main-graph values, or None when one is local to the function or its
        calls disagree (or their caches differ in heads or head_dim)."""
        calls = self._calls.get(function_key_of(site.body), [])
        formal = site.body.input_names
        tensors = [t for t in self._sites.tensors if t.call is not None and t.call in calls]
        assert site.cache is not None
        signature = self._layout.pool_signature
        if not calls or any(signature(t) != signature(site.cache) for t in tensors):
            return None
        resolved: list[Operand | list[onnx.NodeProto]] = []
        for operand in operands:
            if not isinstance(operand, str) or operand == POOL or operand in self._layout_inputs:
                resolved.append(operand)
                continue
            actual = _actual(formal, operand, calls)
            chain = self._chain(site.body, operand, calls) if actual is None else None
            if actual is None and chain is None:
                return None
            resolved.append(actual if actual is not None else chain)  # type: ignore[arg-type]
        return [
            self._clone(site.body, o, calls, given) if isinstance(o, list) else o
            for o, given in zip(resolved, operands, strict=True)
        ]

    def _chain(self, function: Body, name: str, calls: list[onnx.NodeProto]) -> list[onnx.NodeProto] | None:
        """The nodes of ``function`` computing ``name`` from its inputs (each fed the same by
        every call) and constants, in order, if they are few and comparable; else None."""
        producers = function.producers()
        formal = function.input_names
        chain: list[onnx.NodeProto] = []
        seen: set[str] = set()

        def visit(value: str) -> bool:
            if not value or value in seen:
                return True
            seen.add(value)
            if value in formal:  # a cache's values or shape are never copied (its pool differs)
                return _actual(formal, value, calls) not in (None, *self._cache_names)
            node = producers.get(value)
            if node is None or not comparable(node) or any(a.ref_attr_name for a in node.attribute):
                return False
            if not all(visit(i) for i in node.input) or len(chain) >= _MAX_HOISTED_NODES:
                return False
            if all(n is not node for n in chain):
                chain.append(node)
            return True

        return chain if visit(name) else None

    def _clone(
        self, function: Body, chain: list[onnx.NodeProto], calls: list[onnx.NodeProto], name: Operand
    ) -> str:
        """Move ``chain`` to the main graph, before the function's first call: the copies compute
        once what every call computed alike, the function reads them as new inputs where it used
        the chain's values for anything else (its mask, say), and its own nodes are pruned when the
        model is finalized. Returns the name of the copy of ``name`` (the chain's last node computes
        it, as one of its outputs)."""
        assert isinstance(name, str)
        renamed = self._clones.setdefault(function_key_of(function), {})  # moved once, serves all
        if name in renamed:
            return renamed[name]
        formal = function.input_names
        copies = []
        for node in chain:
            if node.output[0] in renamed:
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            inputs = [
                renamed.get(i) or (_actual(formal, i, calls) if i in formal else i) or "" for i in node.input
            ]
            del copy.input[:]
            copy.input.extend(inputs)
            del copy.output[:]
            for output in node.output:
                renamed[output] = self._layout.fresh_name("hoisted") if output else ""
                copy.output.append(renamed[output])
            copy.name = renamed[node.output[0]]
            copies.append(copy)
        order = self._order_of(self._sites.main)
        first = min(calls, key=lambda call: order[id(call)])
        self._copies.append((first, copies))  # inserted by place(), after the ops they may read
        self._read_moved_values(function, chain, renamed, calls)
        return renamed[name]

    def _read_moved_values(
        self,
        function: Body,
        chain: list[onnx.NodeProto],
        renamed: dict[str, str],
        calls: list[onnx.NodeProto],
    ) -> None:
        """Make the function's other readers of the chain's values read the main-graph copies. A
        function whose nodes hold subgraphs (which may read any outer value) or that returns one
        of the values keeps its chain."""
        proto = function.proto
        assert isinstance(proto, onnx.FunctionProto)
        moved = {output for node in chain for output in node.output if output}
        if moved & set(proto.output) or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for n in proto.node
            for a in n.attribute
        ):
            return
        members = {id(node) for node in chain}
        for node in proto.node:
            if id(node) in members or not moved & set(node.input):
                continue
            for position, name in enumerate(node.input):
                if name in moved:
                    self._thread(function, calls, [renamed[name]])
                    node.input[position] = renamed[name]
        self.dropped |= moved  # what the function no longer reads: pruned at the end

    def _order_of(self, body: Body) -> dict[int, int]:
        """Node positions of ``body`` as the passes found it (insertions wait for ``commit``)."""
        if id(body.proto) not in self._orders:
            self._orders[id(body.proto)] = {id(node): i for i, node in enumerate(body.proto.node)}
        return self._orders[id(body.proto)]

    @property
    def _layout_inputs(self) -> set[str]:
        return {*self._layout.tables, self._layout.slot_id}

    def _main_pool(self, signature: tuple[int, int, str]) -> str:
        """A pool of the requesting cache's heads, head_dim and table group (see the module doc);
        for a ``shape_only`` request whose table's group has none, one of another group."""
        signature_of = self._layout.pool_signature
        pools = [t for t in self._sites.tensors if signature_of(t)[:2] == signature[:2]]
        first: CacheTensor = next((t for t in pools if signature_of(t) == signature), pools[0])
        return first.name

    def _thread(self, function: Body, calls: list[onnx.NodeProto], names: Sequence[str]) -> None:
        """Make ``names`` inputs of ``function`` (same names inside) fed by every call."""
        proto = function.proto
        assert isinstance(proto, onnx.FunctionProto)
        added = self._threaded.setdefault((proto.domain, proto.name), [])
        for name in names:
            if name in added:
                continue
            added.append(name)
            formal = len(proto.input)
            proto.input.append(name)
            for call in calls:
                call.input.extend([""] * (formal - len(call.input)))  # omitted optional inputs
                call.input.append(name)


def _with_pool(stated: Sequence[Operand], resolved: Sequence[Operand]) -> list[Operand]:
    return [POOL if given == POOL else value for given, value in zip(stated, resolved, strict=True)]


def _actual(formal: list[str], name: str, calls: list[onnx.NodeProto]) -> str | None:
    """The main-graph value every call feeds to the function input ``name``, if they agree."""
    if name not in formal:
        return None
    position = formal.index(name)
    actual = {call.input[position] if position < len(call.input) else "" for call in calls}
    return actual.pop() if len(actual) == 1 and "" not in actual else None


def function_key_of(body: Body) -> tuple[str, str]:
    proto = body.proto
    assert isinstance(proto, onnx.FunctionProto)
    return (proto.domain, proto.name)
