"""Add the paged-cache inputs ``block_table`` and ``slot_id``, thread them into every local
function that holds cache ops (one new pair of function inputs, every call site passes the
graph's), and fix the paged layout: block size, table width, and each cache's logical length."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import onnx_ir as ir

from paged_rewrite.errors import UnsupportedPatternError, UsageError
from paged_rewrite.passes.find_cache_sites import CacheSites, Dim, where

BLOCK_TABLE = "block_table"
SLOT_ID = "slot_id"
NUM_KV_BLOCKS = "num_kv_blocks"
TOTAL_NUM_KV_BLOCKS = "total_num_kv_blocks"
CTX_LEN = "ctx_len"


@dataclass
class PagedLayout:
    """The paged cache layout every later pass builds on."""

    kv_block_size: int
    num_kv_blocks: int | str
    total_num_kv_blocks: int | str
    batch_dim: Dim
    context_dim: Dim  # the length dim of full-context caches: they span the whole table
    windows: dict[str, int]  # length dim -> ring length, for sliding-window caches
    bound_dims: dict[str, int]  # every symbolic dim of the input the user gave a value
    block_table: ir.Value
    slot_id: ir.Value
    scoped: dict[ir.Graph, tuple[ir.Value, ir.Value]] = field(default_factory=dict)

    @property
    def logical_length(self) -> int | None:
        """``num_kv_blocks * kv_block_size`` when static: the context full layers see."""
        return self.num_kv_blocks * self.kv_block_size if isinstance(self.num_kv_blocks, int) else None

    def addressing(self, node: ir.Node) -> tuple[ir.Value, ir.Value]:
        """``(block_table, slot_id)`` as seen from where ``node`` lives (graph or function body)."""
        assert node.graph is not None
        return self.scoped[node.graph]


def add_paged_inputs(
    model: ir.Model,
    sites: CacheSites,
    kv_block_size: int,
    dims: Mapping[str, int] | None = None,
    num_blocks: int | None = None,
) -> PagedLayout:
    """Append ``block_table`` int64 ``[batch, num_kv_blocks]`` and ``slot_id`` int64 ``[batch]``."""
    if kv_block_size < 1:
        raise UsageError(f"--kv-block-size must be a positive integer, got {kv_block_size}")
    if num_blocks is not None and num_blocks < 2:
        raise UsageError(f"--num-blocks must be at least 2 (block 0 is the null block), got {num_blocks}")
    bound = dict(dims or {})
    for name, value in bound.items():
        if value < 1:
            raise UsageError(f"--dim {name}={value}: a dim must be a positive integer")
    context_dim, context_len, windows = _lengths(sites, bound, kv_block_size)
    taken = {value.name for value in model.graph.inputs}
    for name in (BLOCK_TABLE, SLOT_ID):
        if name in taken:
            raise UnsupportedPatternError(f"the model already has an input named {name!r}")
    num_kv_blocks: int | str = math.ceil(context_len / kv_block_size) if context_len else NUM_KV_BLOCKS
    block_table, slot_id = _addressing_values(sites.batch_dim, num_kv_blocks)
    model.graph.inputs.extend([block_table, slot_id])
    layout = PagedLayout(
        kv_block_size=kv_block_size,
        num_kv_blocks=num_kv_blocks,
        total_num_kv_blocks=num_blocks if num_blocks is not None else TOTAL_NUM_KV_BLOCKS,
        batch_dim=sites.batch_dim,
        context_dim=context_dim,
        windows=windows,
        bound_dims=bound,
        block_table=block_table,
        slot_id=slot_id,
        scoped={model.graph: (block_table, slot_id)},
    )
    for function in sites.functions:
        _thread_into_function(model, function, layout)
    return layout


def _addressing_values(batch: Dim, num_kv_blocks: int | str) -> tuple[ir.Value, ir.Value]:
    int64 = ir.TensorType(ir.DataType.INT64)
    return (
        ir.Value(name=BLOCK_TABLE, type=int64, shape=ir.Shape([batch, num_kv_blocks])),
        ir.Value(name=SLOT_ID, type=int64, shape=ir.Shape([batch])),
    )


def _lengths(
    sites: CacheSites, bound: dict[str, int], kv_block_size: int
) -> tuple[Dim, int | None, dict[str, int]]:
    """Which length dim spans the whole table, its value if known, and the ring lengths.

    One length dim: every cache is full-context. Several (sliding-window layers): ``ctx_len``
    (else the largest) is the full context; every other one is a ring whose length must be
    bound, because the graph uses the buffer length as the window.
    """

    def value(dim: Dim) -> int | None:
        return dim if isinstance(dim, int) else bound.get(dim) if isinstance(dim, str) else None

    lengths = sites.length_dims
    if len(lengths) == 1:
        return lengths[0], value(lengths[0]), {}
    context: Dim = CTX_LEN if CTX_LEN in lengths else max(lengths, key=lambda d: value(d) or math.inf)
    windows: dict[str, int] = {}
    for dim in lengths:
        if dim == context:
            continue
        ring = value(dim)
        holder = next(t for t in sites.tensors if t.length_dim == dim)
        if ring is None or not isinstance(dim, str):
            raise UsageError(
                f"{where(holder.write)}: cache {holder.name!r} is a ring buffer of symbolic length {dim!r}; "
                f"give its value with --dim {dim}=N (the window the model attends over)"
            )
        windows[dim] = ring
    context_len = value(context)
    for dim, ring in windows.items():
        if context_len is not None and ring > math.ceil(context_len / kv_block_size) * kv_block_size:
            raise UsageError(f"--dim {dim}={ring} is longer than the context ({context}={context_len})")
    return context, context_len, windows


def _thread_into_function(model: ir.Model, function: ir.Function, layout: PagedLayout) -> None:
    """Give ``function`` its own ``block_table`` / ``slot_id`` inputs and pass them at every call."""
    names = {str(v.name) for v in function.inputs}
    if BLOCK_TABLE in names or SLOT_ID in names:
        raise UnsupportedPatternError(f"function {function.name!r} already has a block_table/slot_id input")
    inner = _addressing_values(layout.batch_dim, layout.num_kv_blocks)
    function.inputs.extend(inner)
    layout.scoped[function.graph] = inner
    for node in model.graph:
        if (node.domain, node.op_type, node.overload) == function.identifier():
            count = len(node.inputs)
            node.resize_inputs(count + 2)
            node.replace_input_with(count, layout.block_table)
            node.replace_input_with(count + 1, layout.slot_id)
