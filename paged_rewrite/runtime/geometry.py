"""What a runtime must know of a paged model before driving it, read from the model file: page
size, table width, vocabulary, bound dims, ring lengths, its block tables and the caches each
addresses, and whether it ever reads its cache."""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import onnx
from onnx import numpy_helper

from paged_rewrite.domain import QEFF_DOMAIN
from paged_rewrite.errors import UnsupportedPatternError

PAGED_DOMAIN = QEFF_DOMAIN
# PagedWriteIndex(pool, block_table, slot_id, position_ids, slot_period)
_WRITE_TABLE, _WRITE_POSITIONS = 1, 3
_SEARCH_DEPTH = 4


@dataclass(frozen=True)
class TableGroup:
    """One block table of a paged model and the pools it addresses: ``block_table`` (full
    context, ``window`` None, width bucketed) or a window group's ``block_table_w<W>``: a ring of
    length ``window`` (static width ``num_kv_blocks``), or with ``logical`` a window over logical
    positions of full-length caches (as wide as ``block_table``)."""

    table: str
    caches: tuple[str, ...]
    window: int | None = None
    num_kv_blocks: int | None = None
    logical: bool = False


@dataclass(frozen=True)
class PagedGeometry:
    """Page size, table width (static, else None), vocabulary, the dims the rewrite bound, the
    ring lengths a runtime must know (for copy on write and isolation), ``write_only``: the model
    never reads its cache (a prefill-only graph, whose attention uses the chunk's fresh K/V), its
    inputs, and its context buckets (tokens; the table widths it was written for)."""

    kv_block_size: int
    num_kv_blocks: int | None
    vocab_size: int
    dims: dict[str, int] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=dict)
    position_rings: tuple[int, ...] = ()
    write_only: bool = False
    inputs: tuple[str, ...] = ()
    ctx_buckets: tuple[int, ...] = ()
    groups: tuple[TableGroup, ...] = ()
    prefill_lengths: tuple[int, ...] = ()  # the seq_len values prefill is specialized for
    pool_blocks: dict[str, int] = field(default_factory=dict)  # table -> its pools' static block count
    # cache -> C: written through block_table at exactly p % C (so only slots below C)
    exact_rings: dict[str, int] = field(default_factory=dict)
    # the caches of block_table whose writes may wrap; None: not recorded (an older rewrite)
    wrapping_caches: frozenset[str] | None = frozenset()

    def written_slots(self, cache: str, length: int, positions: Iterable[int]) -> set[int]:
        """The slots of the original's ``cache`` (``length`` long) that positions ``positions``
        write: ``p % C`` for a ring of ``C`` (a ring group's, or recorded for ``block_table``),
        else ``p % length`` — less the original's last slot, where it writes its padding, for a
        cache whose writes may wrap in a way not recorded exactly (that slot may then hold
        padding where the paged model holds a token, or nothing)."""
        ring = next((g.window for g in self.window_groups if cache in g.caches and not g.logical), None)
        ring = ring or self.exact_rings.get(cache)
        if ring:
            return {p % min(ring, length) for p in positions}
        slots = {p % length for p in positions}
        unknown = (
            self.wrapping_caches is None and self.position_rings and self.table_of(cache) == "block_table"
        )
        if unknown or cache in (self.wrapping_caches or ()):
            slots.discard(length - 1)
        return slots

    @property
    def window_groups(self) -> list[TableGroup]:
        """The groups with a table of their own per window length (none with a shared table)."""
        return [group for group in self.groups if group.window is not None]

    def table_of(self, cache: str) -> str:
        """The table addressing ``cache`` (``block_table`` unless a window group lists it)."""
        return next((g.table for g in self.window_groups if cache in g.caches), "block_table")

    @property
    def full_num_kv_blocks(self) -> int | None:
        """The widest table: the static width, else the largest bucket's, else unknown."""
        if self.num_kv_blocks:
            return self.num_kv_blocks
        return -(-max(self.ctx_buckets) // self.kv_block_size) if self.ctx_buckets else None

    @property
    def ring_lengths(self) -> list[int]:
        """Every ring a write through ``block_table`` may wrap around: the sliding windows the
        rewrite paged as rings in its first columns (``--shared-window-table``; a window group's
        ring is in its own table) and the rings the model computes itself (``position_rings``)."""
        shared = [] if self.window_groups else list(self.windows.values())
        return sorted({*shared, *self.position_rings})

    @classmethod
    def of(cls, paged_path: str | os.PathLike[str]) -> PagedGeometry:
        model = onnx.load(os.fspath(paged_path), load_external_data=False)
        graph = model.graph
        metadata = {p.key: p.value for p in model.metadata_props}
        dims = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]
        }
        if "block_table" not in dims:
            raise UnsupportedPatternError(f"{paged_path}: not a paged model (no block_table input)")
        pools = [shape for name, shape in dims.items() if len(shape) == 4 and f"{name}_RetainedState" in dims]
        block_size = pools[0][2] if pools else None
        if "logits" not in dims:
            returned = ", ".join(v.name for v in graph.output if not v.name.endswith("_RetainedState"))
            raise UnsupportedPatternError(
                f"{paged_path}: verify compares logits, and this model returns none (it returns {returned})"
            )
        vocab = dims["logits"][-1]
        if not block_size or not vocab:
            raise UnsupportedPatternError(f"{paged_path}: needs a static kv_block_size and vocab size")
        ops = [node.op_type for node in _model_nodes(model)]
        described = json.loads(metadata.get("paged_rewrite.groups", "[]"))
        groups = tuple(
            TableGroup(
                g["table"],
                tuple(g["caches"]),
                g["window"],
                g["num_kv_blocks"],
                g.get("window_addressing") == "logical_positions",
            )
            for g in described
        )
        pool_blocks = {
            g["table"]: g["total_num_kv_blocks"] for g in described if g.get("total_num_kv_blocks")
        }
        # the caches written through block_table at p % C, and whether exactly (models rewritten
        # before the record have none: their ring lengths come from the graph alone)
        recorded = (
            json.loads(metadata["paged_rewrite.wrapping_caches"])
            if "paged_rewrite.wrapping_caches" in metadata
            else None
        )
        if not described and pools and pools[0][0]:  # rewritten before the groups were recorded: one pool
            pool_blocks = {"block_table": pools[0][0]}
        return cls(
            block_size,
            dims["block_table"][1] or None,
            vocab,
            json.loads(metadata.get("paged_rewrite.dims", "{}")),
            json.loads(metadata.get("paged_rewrite.windows", "{}")),
            tuple(sorted({*(r["modulus"] for r in (recorded or {}).values()), *position_rings(model)})),
            write_only=not any(op.startswith("PagedCtxGather") for op in ops),
            inputs=tuple(v.name for v in graph.input),
            ctx_buckets=tuple(json.loads(metadata.get("paged_rewrite.ctx_buckets", "[]"))),
            groups=groups,
            prefill_lengths=tuple(json.loads(metadata.get("paged_rewrite.prefill_lengths", "[]"))),
            pool_blocks=pool_blocks,
            exact_rings={cache: r["modulus"] for cache, r in (recorded or {}).items() if r["ring"]},
            wrapping_caches=frozenset(recorded) if recorded is not None else None,
        )


def _model_nodes(model: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """The nodes of the main graph and of the model's own functions, not the bodies of the paged
    ops (they define the ops; they are not uses of them)."""
    yield from model.graph.node
    for function in model.functions:
        if not (function.domain == PAGED_DOMAIN and function.name.startswith("Paged")):
            yield from function.node


def position_rings(model: onnx.ModelProto) -> list[int]:
    """Ring lengths a model computes itself, searched for in the graph: a paged write through
    ``block_table`` whose positions come, a few producers up, from ``Mod(x, C)`` with a constant
    ``C`` (Llama 4's chunked attention keeps each chunk at slots ``p % C`` of a full-length
    cache), in the main graph or a layer function. Position ``p`` is then written at logical
    position ``p % C``, in the first columns of the table: a runtime must know it as a ring. The
    rewrite records the same (``paged_rewrite.wrapping_caches``, following layer inputs out to
    their calls); a runtime takes both, so a model rewritten before the record is still known."""
    rings = set()
    for body in [model.graph, *(f for f in model.functions if f.domain != PAGED_DOMAIN)]:
        producers = {out: node for node in body.node for out in node.output}
        constants = {t.name: numpy_helper.to_array(t) for t in getattr(body, "initializer", [])}
        for node in body.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        for node in body.node:
            if node.op_type != "PagedWriteIndex" or len(node.input) <= _WRITE_POSITIONS:
                continue
            if node.input[_WRITE_TABLE] != "block_table":  # a ring of its own table is its group's
                continue
            queue = deque([(node.input[_WRITE_POSITIONS], 0)])
            while queue:
                name, depth = queue.popleft()
                producer = producers.get(name)
                if producer is None or depth > _SEARCH_DEPTH:
                    continue
                divisor = constants.get(producer.input[1]) if producer.op_type == "Mod" else None
                if divisor is not None and divisor.size == 1 and int(divisor.reshape(())) > 0:
                    rings.add(int(divisor.reshape(())))
                queue.extend((source, depth + 1) for source in producer.input)
    return sorted(rings)
