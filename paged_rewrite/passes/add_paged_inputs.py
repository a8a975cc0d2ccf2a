"""Add the paged-cache inputs ``block_table`` (one per table group) and ``slot_id``, thread them
into every local function that holds cache ops (new function inputs, every call site passes the
graph's), and fix the paged layout: block size, table widths, context buckets, each cache's
logical length, and which table and pool dim each cache uses.

Table groups: full-context caches are addressed through ``block_table`` and their pools share
the dim ``total_num_kv_blocks``. Each distinct ring length ``W`` (a sliding window) gets its own
table ``block_table_w<W>`` of static width ``ceil(W / kv_block_size)`` and pool dim
``total_num_kv_blocks_w<W>``: ring slot ``p % W`` lives at column ``(p % W) // kv_block_size``,
so a window layer holds window-sized memory (as vLLM's hybrid KV cache manager and
TensorRT-LLM give each attention-window group its own pool). A full-length cache read as a
window over logical positions (``logical_windows.py``) gets a table ``block_table_w<W>`` as wide
as ``block_table`` and a pool of its own: the runtime frees its blocks behind the window. A
full-length cache written as a ring of ``C`` slots (Llama 4's chunked attention,
``ring_writes.py``) joins the ring group of ``C``. With
``shared_window_table`` every window lives in the one ``block_table`` instead (every pool as
large as a full-context pool)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import onnx
from onnx import helper

from paged_rewrite.buckets import columns_for, resolve_buckets
from paged_rewrite.errors import UnsupportedPatternError, UsageError
from paged_rewrite.graph import Body
from paged_rewrite.passes.logical_windows import logical_windows
from paged_rewrite.passes.ring_writes import rings_in_full_caches, write_moduli
from paged_rewrite.passes.sites import (
    BLOCK_TABLE,
    SLOT_ID,
    CacheSites,
    Dim,
    PagedLayout,
    TableGroup,
    WriteModulus,
    where,
)

NUM_KV_BLOCKS = "num_kv_blocks"
TOTAL_NUM_KV_BLOCKS = "total_num_kv_blocks"
CTX_LEN = "ctx_len"


def add_paged_inputs(
    model: onnx.ModelProto,
    sites: CacheSites,
    kv_block_size: int,
    dims: Mapping[str, int] | None = None,
    num_blocks: int | None = None,
    ctx_len: int | None = None,
    ctx_buckets: Sequence[int] | None = None,
    shared_window_table: bool = False,
) -> PagedLayout:
    """Append ``block_table`` int64 ``[batch, num_kv_blocks]``, one ``block_table_w<W>`` int64
    ``[batch, ceil(W / kv_block_size)]`` per ring length ``W`` (ring buffers, and full-length
    caches written as a ring; none with ``shared_window_table``) and ``slot_id`` int64 ``[batch]``. Full-length caches read as a window
    ``W`` over logical positions (``logical_windows.py``) get a table ``block_table_w<W>`` of width
    ``num_kv_blocks`` per ``W`` (none with ``shared_window_table``).

    ``ctx_len`` binds the length axis of the full-context caches, whatever that dim is named.
    The table width stays the symbolic ``num_kv_blocks`` whenever there are several context
    buckets (``ctx_buckets``, else the default ladder up to a known context), so a runtime can
    pass a narrower table per step; with a single bucket it is static, ``ceil(bucket / bs)``."""
    if kv_block_size < 2:  # the null block's row 0 takes invalid writes, its last row is the zero row
        raise UsageError(
            f"--kv-block-size must be at least 2 (the null block keeps a row for invalid writes "
            f"and a zero row for invalid reads), got {kv_block_size}"
        )
    if num_blocks is not None and num_blocks < 2:
        raise UsageError(f"--num-blocks must be at least 2 (block 0 is the null block), got {num_blocks}")
    bound = dict(dims or {})
    for name, value in bound.items():
        if value < 1:
            raise UsageError(f"--dim {name}={value}: a dim must be a positive integer")
    if ctx_len is not None and ctx_len < 1:
        raise UsageError(f"--ctx-len must be a positive integer, got {ctx_len}")
    context_dim, context_len, windows = _lengths(sites, bound, kv_block_size, ctx_len)
    if context_len is not None and kv_block_size > context_len:
        raise UsageError(
            f"--kv-block-size {kv_block_size} is larger than the context ({context_dim}={context_len})"
        )
    buckets = _buckets(sites, ctx_buckets, context_len, kv_block_size)
    if shared_window_table:
        _refuse_rings_beyond(windows, buckets, kv_block_size)
    num_kv_blocks: int | str = columns_for(buckets[0], kv_block_size) if len(buckets) == 1 else NUM_KV_BLOCKS
    layout = PagedLayout(
        kv_block_size=kv_block_size,
        num_kv_blocks=num_kv_blocks,
        total_num_kv_blocks=num_blocks if num_blocks is not None else TOTAL_NUM_KV_BLOCKS,
        batch_dim=sites.row_dim,
        context_dim=context_dim,
        windows=windows,
        bound_dims=bound,
        ctx_buckets=buckets,
        shared_window_table=shared_window_table,
    )
    layout.write_moduli = write_moduli(sites)
    if not shared_window_table:
        layout.window_groups = _window_groups(windows, kv_block_size)
        logical = logical_windows(sites, context_dim)
        found = rings_in_full_caches(sites, layout.write_moduli, context_dim, context_len, kv_block_size)
        # a ring of a logical window's length would need that window's table name: it stays full
        rings = {c: w for c, w in found.items() if c not in logical and w not in logical.values()}
        layout.cache_groups = _cache_groups(layout, logical, rings)
    layout.wrapping_caches = _wrapping_caches(sites, layout)
    for body in sites.bodies:
        _refuse_name_clash(body, [*layout.tables, SLOT_ID])
    int64 = onnx.TensorProto.INT64
    model.graph.input.extend(
        [
            *(
                helper.make_tensor_value_info(group.table, int64, [sites.row_dim, group.columns])
                for group in layout.groups
            ),
            helper.make_tensor_value_info(SLOT_ID, int64, [sites.row_dim]),
        ]
    )
    for function in sites.functions:
        _thread_into_function(model, function, _table_of_function(sites, layout, function))
    return layout


def _window_groups(windows: Mapping[Dim, int], kv_block_size: int) -> dict[Dim, TableGroup]:
    """One group per distinct ring length: two ring dims bound to the same length share it."""
    return {dim: _ring_group(ring, kv_block_size) for dim, ring in windows.items()}


def _ring_group(ring: int, kv_block_size: int) -> TableGroup:
    """The group of every ring of ``ring`` slots, in a cache of that length or a longer one."""
    return TableGroup(
        f"{BLOCK_TABLE}_w{ring}", columns_for(ring, kv_block_size), f"{TOTAL_NUM_KV_BLOCKS}_w{ring}", ring
    )


def _cache_groups(
    layout: PagedLayout, logical: Mapping[str, int], rings: Mapping[str, int]
) -> dict[str, TableGroup]:
    """The groups found per cache: one per window length of the caches read over logical
    positions, and the ring group of each full-length cache written as a ring (shared with the
    ring buffers of that length)."""
    ring_lengths = {group.window or 0 for group in layout.window_groups.values()} | set(rings.values())
    clash = sorted(ring_lengths & set(logical.values()))
    if clash:
        raise UnsupportedPatternError(
            f"the model has a ring and a logical-position window both of length {clash[0]}: "
            "rewrite with --shared-window-table"
        )
    groups = {
        cache: TableGroup(
            f"{BLOCK_TABLE}_w{window}", layout.num_kv_blocks, f"{TOTAL_NUM_KV_BLOCKS}_w{window}", window, True
        )
        for cache, window in logical.items()
    }
    groups.update({cache: _ring_group(ring, layout.kv_block_size) for cache, ring in rings.items()})
    return groups


def _wrapping_caches(sites: CacheSites, layout: PagedLayout) -> dict[str, WriteModulus]:
    """The caches written through ``block_table`` at ``p % C`` (``ring_writes.py``): a cache
    left full (``--shared-window-table``, a block size that does not divide ``C``, a layer
    function serving other caches too) wraps in the table's first columns, which a runtime must
    know (the metadata records it, and whether the slots are exactly ``p % C``)."""
    return {
        t.name: layout.write_moduli[t.name]
        for t in sites.tensors
        if layout.group_of(t).window is None and layout.write_moduli[t.name].modulus is not None
    }


def _table_of_function(sites: CacheSites, layout: PagedLayout, function: Body) -> str:
    """The one table a layer function's caches use. A function body serving caches of two table
    groups (a ring and a full-context layer through one body) would need a table per call; such
    an export is refused with the way out."""
    proto = function.proto
    assert isinstance(proto, onnx.FunctionProto)
    served = [
        t
        for t in sites.tensors
        if t.call is not None and (t.call.domain, t.call.op_type) == (proto.domain, proto.name)
    ]
    tables = sorted({layout.group_of(t).table for t in served}) or [layout.block_table]
    if len(tables) > 1:
        raise UnsupportedPatternError(
            f"function {function.name!r} serves caches of several table groups ({', '.join(tables)}): "
            "one layer body cannot take a table per call; rewrite with --shared-window-table"
        )
    return tables[0]


def _buckets(
    sites: CacheSites, given: Sequence[int] | None, context_len: int | None, kv_block_size: int
) -> tuple[int, ...]:
    """The context buckets. A graph that never reads its cache (disaggregated prefill) attends
    within its chunk: a narrower table would save nothing, and QEfficient ties its chunk to the
    cache length (``seq_len = ctx_len``), so its graph breaks on any other width. It gets the
    context as its one bucket."""
    if not sites.reads:
        if given is not None and len(set(given)) > 1:
            raise UsageError(
                "--ctx-buckets: the model never reads its cache (a prefill-only graph attends within "
                "its chunk, whose length is the context): give one bucket or none"
            )
        if given is None:
            return (context_len,) if context_len else ()
    return resolve_buckets(given, context_len, kv_block_size)


def _refuse_rings_beyond(windows: Mapping[Dim, int], buckets: Sequence[int], kv_block_size: int) -> None:
    """With ``--shared-window-table`` a ring lives in the first table columns: the widest table
    must hold it."""
    widest = columns_for(buckets[-1], kv_block_size) * kv_block_size if buckets else None
    for dim, ring in windows.items():
        if widest is not None and ring > widest:
            raise UsageError(f"--dim {dim}={ring} is longer than the largest context bucket ({buckets[-1]})")


def _refuse_name_clash(body: Body, new_names: Sequence[str]) -> None:
    """The new names must be free: not an input, initializer or output, and read by no node (a
    node output of that name nobody reads is left to the checker, which rejects the duplicate)."""
    names = set(body.input_names) | set(body.output_names)
    if isinstance(body.proto, onnx.GraphProto):
        names |= {t.name for t in body.proto.initializer}
    unwatched = [name for name in new_names if name not in (BLOCK_TABLE, SLOT_ID)]
    if unwatched:  # the finder indexes readers of the two fixed names only
        names |= {value for node in body.proto.node for value in node.input} & set(unwatched)
    for name in new_names:
        if name in names or (name in (BLOCK_TABLE, SLOT_ID) and body.consumers(name)):
            where_ = f"function {body.name!r}" if body.is_function else "the model"
            raise UnsupportedPatternError(f"{where_} already has a value named {name!r}")


def _lengths(
    sites: CacheSites, bound: dict[str, int], kv_block_size: int, ctx_len: int | None
) -> tuple[Dim, int | None, dict[Dim, int]]:
    """Which length dim spans the whole table, its value if known, and the ring lengths.

    One length dim: every cache is full-context. Several (sliding-window layers): ``ctx_len``
    (else the one ``--ctx-len`` can only mean, else the largest) is the full context; every other
    one is a ring whose length must be bound, because the graph uses the buffer length as the
    window. ``ctx_len`` (the flag) is bound onto the context dim, whatever its name.
    """

    def value(dim: Dim) -> int | None:
        return dim if isinstance(dim, int) else bound.get(dim) if isinstance(dim, str) else None

    lengths = sites.length_dims
    context: Dim
    if len(lengths) == 1:
        context = lengths[0]
    elif CTX_LEN in lengths:
        context = CTX_LEN
    elif ctx_len is not None:
        unbound = [d for d in lengths if value(d) is None]
        if len(unbound) != 1:
            raise UsageError(
                f"--ctx-len is ambiguous: the caches have length dims {', '.join(map(repr, lengths))}; "
                "bind the windows with --dim NAME=V, or the context with --dim instead of --ctx-len"
            )
        context = unbound[0]
    else:
        context = max(lengths, key=lambda d: value(d) or math.inf)
    if ctx_len is not None:
        _bind_context(context, ctx_len, bound)
    if len(lengths) == 1:
        return context, value(context), {}
    windows: dict[Dim, int] = {}
    for dim in lengths:
        if dim == context:
            continue
        ring = value(dim)
        holder = next(t for t in sites.tensors if t.length_dim == dim)
        if ring is None:
            raise UsageError(
                f"{where(holder.write.node)}: cache {holder.name!r} is a ring buffer of symbolic length {dim!r}; "
                f"give its value with --dim {dim}=N (the window the model attends over)"
            )
        windows[dim] = ring
    context_len = value(context)
    for dim, ring in windows.items():
        if context_len is not None and ring > math.ceil(context_len / kv_block_size) * kv_block_size:
            raise UsageError(f"--dim {dim}={ring} is longer than the context ({context}={context_len})")
    return context, context_len, windows


def _bind_context(context: Dim, ctx_len: int, bound: dict[str, int]) -> None:
    """``--ctx-len`` sets the context dim; a static length or ``--dim`` must agree with it."""
    if isinstance(context, int) and context != ctx_len:
        raise UsageError(f"--ctx-len {ctx_len} contradicts the caches' static length {context}")
    if isinstance(context, str):
        if bound.setdefault(context, ctx_len) != ctx_len:
            raise UsageError(f"--ctx-len {ctx_len} contradicts --dim {context}={bound[context]}")
    elif context is None:
        raise UsageError("--ctx-len: the caches' length axis has no dim to bind")


def _thread_into_function(model: onnx.ModelProto, function: Body, table: str) -> None:
    """Give ``function`` its own ``table`` / ``slot_id`` inputs (named as in the main graph) and
    pass them at every call."""
    proto = function.proto
    assert isinstance(proto, onnx.FunctionProto)
    formal = len(proto.input)
    proto.input.extend([table, SLOT_ID])
    for node in model.graph.node:
        if (node.domain, node.op_type) == (proto.domain, proto.name):
            node.input.extend([""] * (formal - len(node.input)))  # omitted optional inputs stay omitted
            node.input.extend([table, SLOT_ID])
