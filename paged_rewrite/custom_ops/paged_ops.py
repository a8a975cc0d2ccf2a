# mypy: ignore-errors
# (onnxscript DSL: these bodies are translated to ONNX, not run as Python; their values are ONNX
# tensors whose types mypy cannot model. The typed entry point is custom_ops/__init__.py.)
"""The paged KV-cache ops, as onnxscript functions.

Each op is emitted into the rewritten model as a model-local function in the domain
``com.qualcomm.cloud``; its body uses only standard opset-17 ops, so any ONNX runtime can run
it and the QAIC compiler can inline it. The docstring of each function is its specification.

Every cache op is split in two. An *index* op (``PagedWriteIndex``, ``PagedReadIndex``) computes
the addresses from ``block_table``, ``slot_id`` and the positions; the rewrite emits one per call
for all the caches that share its operands (each layer's K and V, and every layer in the main
graph), so the address math is paid once, not once per cache. A *data* op (``PagedCtxScatter``,
``PagedCtxGather``) per cache then only moves bytes with those addresses.

The sources are factored (``PagedBlockAddress`` is the one place the address rule is written),
but what is emitted is flat: ``emit.py`` expands every helper call into the calling body, so
no emitted body calls another function, and lowers ``CastLike`` to a ``Cast`` to the caches'
type. Bodies use only ops of QEfficient's own exports (``qeff_op_vocabulary.txt``): hence
``Greater(x, -1)`` for ``x >= 0`` and a ``Gather`` from the flattened table instead of
``GatherElements``.

Shared vocabulary
-----------------
``pool``         float ``[total_num_kv_blocks, kv_heads, kv_block_size, head_dim]``: one layer's
                 K or V block pool. All sizes are read from its shape at run time.
``block_table``  int64 ``[batch, num_kv_blocks]``: ``block_table[b, j]`` is the physical block that
                 holds logical positions ``[j*kv_block_size, (j+1)*kv_block_size)`` of row ``b``;
                 ``-1`` means unallocated.
Null block       physical block 0. A runtime never hands it to a sequence. Every write that must
                 not land goes to its first row (offset 0), and its last row (offset
                 ``kv_block_size - 1``, one per head) is the *zero row*: every paged write writes
                 zeros there with its tokens (in the same ``ScatterND``, at indices no other
                 write names, so the result is defined), and every read whose address is invalid, or is
                 block 0 itself, reads it. So invalid reads return zeros whatever block 0 held
                 before the call (NaN included), and the graph needs no second pass over what it
                 reads to make them (see ``PagedCtxGather``): the rewrite pages only reads of a
                 write's output, as QEfficient builds every layer. Hence ``kv_block_size >= 2``:
                 the two rows must differ.
Address          logical position ``p`` of row ``b`` lives at
                 ``pool[block_table[b, p // kv_block_size], :, p % kv_block_size, :]``.
"""

from __future__ import annotations

from onnxscript import opset17 as op
from onnxscript import script
from onnxscript.values import Opset

from paged_rewrite.custom_ops.library import PAGED_DOMAIN

paged = Opset(PAGED_DOMAIN, 1)


@script(paged, default_opset=op)
def PagedBlockAddress(pool, block_table, positions):
    """Physical address of logical cache positions (a source helper, expanded where called).

    Inputs:
      pool         ``[N, H, kv_block_size, D]`` (only its shape is read).
      block_table  int64 ``[B, num_kv_blocks]``.
      positions    int64 ``[B, K]`` logical positions (any values).
    Outputs:
      block   int64 ``[B, K]``: ``block_table[b, p // kv_block_size]``.
      offset  int64 ``[B, K]``: ``p % kv_block_size``, in ``[0, kv_block_size)`` whatever ``p``.
    Invalid addresses map to block 0, the null block: a position outside
    ``[0, num_kv_blocks * kv_block_size)`` (padding ``-1``, INT32_MAX sentinels, garbage), or a
    table entry outside ``[0, N)`` (``-1`` = unallocated, or a block the pool does not have).
    Which row of block 0 is the caller's choice (writes: row 0; reads: the zero row), so every
    caller replaces the offset wherever ``block`` is 0.
    """
    pool_shape = op.Shape(pool)
    block_size = op.Gather(pool_shape, 2)
    num_columns = op.Gather(op.Shape(block_table), 1)
    zero = op.Constant(value_int=0)
    negative = op.Constant(value_int=-1)  # x > -1 is x >= 0 for integers (GreaterOrEqual: see above)
    in_range = op.And(op.Greater(positions, negative), op.Less(positions, op.Mul(num_columns, block_size)))
    safe_position = op.Where(in_range, positions, zero)
    # block_table[b, column] read from the flattened table at b * num_kv_blocks + column.
    row = op.Unsqueeze(
        op.Range(zero, op.Gather(op.Shape(positions), 0), op.Constant(value_int=1)),
        op.Constant(value_ints=[1]),
    )
    flat_table = op.Reshape(block_table, op.Constant(value_ints=[-1]))
    entry = op.Gather(flat_table, op.Add(op.Mul(row, num_columns), op.Div(safe_position, block_size)))
    valid = op.And(in_range, op.And(op.Greater(entry, negative), op.Less(entry, op.Gather(pool_shape, 0))))
    block = op.Where(valid, entry, zero)
    return block, op.Mod(safe_position, block_size)


@script(paged, default_opset=op)
def PagedRowIndex(pool, block, offset):
    """Row numbers of the pool seen as ``[N * H * kv_block_size, D]`` (a source helper).

    Inputs:
      pool    ``[N, H, kv_block_size, D]`` (only its shape is read).
      block   int64 ``[B, 1 or H, K]``, offset int64 ``[B, 1 or H, K]``: addresses (from
              ``PagedBlockAddress``, so always in range).
    Output:
      int64 ``[B, H, K]``: ``(block * H + h) * kv_block_size + offset`` — one row of ``D`` values
      per head. Built by broadcasting, so no index tensor is expanded or concatenated.
    """
    pool_shape = op.Shape(pool)
    heads = op.Gather(pool_shape, 1)
    block_size = op.Gather(pool_shape, 2)
    head_index = op.Reshape(
        op.Range(op.Constant(value_int=0), heads, op.Constant(value_int=1)),
        op.Constant(value_ints=[1, -1, 1]),
    )
    return op.Add(op.Mul(op.Add(op.Mul(block, heads), head_index), block_size), offset)


@script(paged, default_opset=op)
def PagedWriteIndex(pool, block_table, slot_id, position_ids, slot_period):
    """Where a write lands: the ``ScatterND`` index every cache written at the same positions
    shares (computed once per call, not once per cache; see ``PagedCtxScatter``).

    Inputs:
      pool          ``[N, H, kv_block_size, D]`` (only its shape and type are read).
      block_table   int64 ``[B, num_kv_blocks]``.
      slot_id       int64 ``[B]``: entries of row ``b``'s active block already filled before
                    this call; a caller passes ``position_ids[b, 0] % kv_block_size``.
      position_ids  int64 ``[B, S]``: logical position of each token; ``-1`` is padding.
      slot_period   int64 scalar: the period over which ``slot_id`` and the first position must
                    agree: ``kv_block_size`` for full-context caches, ``gcd(window,
                    kv_block_size)`` for ring buffers, whose ``position_ids`` are ring slots
                    ``p % window`` while ``slot_id`` counts logical positions.
    Outputs:
      write_index  int64 ``[B, H, S + 1, 3]``: ``(block, h, offset)`` of token ``s < S`` of row
                   ``b`` for head ``h``, at the address of ``position_ids[b, s]`` (see
                   ``PagedBlockAddress``); then one more entry per row, for the zeros: the zero
                   row ``(0, h, kv_block_size - 1)`` for row 0, row 0 of the null block for the
                   others (so the zero row is named once).
      zeros        ``[B, H, 1, D]`` zeros of the pool's type, what the extra entries write.

    Invalid writes go to row 0 of the null block: padding and out-of-range positions, ``-1``,
    out-of-pool or null (0) table entries, and every token of a row whose ``slot_id`` is broken:
    ``slot_id[b]`` outside ``[0, kv_block_size)``, or, when the row has a position inside the
    table, ``slot_id[b] % slot_period != p0 % slot_period`` for its first such position ``p0``:
    such a row's runtime bookkeeping is broken, and writing nothing is the only safe choice.
    Hence no index ever names a block other than 0 and the blocks listed in the writer's own
    ``block_table`` row, and only one entry names the zero row. A chunk may cross block
    boundaries.
    """
    block, offset = PagedBlockAddress(pool, block_table, position_ids)
    pool_shape = op.Shape(pool)
    position_shape = op.Shape(position_ids)
    zero = op.Constant(value_int=0)
    negative = op.Constant(value_int=-1)
    block_size = op.Gather(pool_shape, 2)
    capacity = op.Mul(op.Gather(op.Shape(block_table), 1), block_size)
    in_range = op.And(op.Greater(position_ids, negative), op.Less(position_ids, capacity))
    # The row's first position inside the table: ArgMax picks the first maximum, read from the
    # flattened positions at b * S + index. A row with none reads a position outside the table.
    first_index = op.ArgMax(op.Cast(in_range, to=6), axis=1, keepdims=1)
    row = op.Unsqueeze(
        op.Range(zero, op.Gather(position_shape, 0), op.Constant(value_int=1)), op.Constant(value_ints=[1])
    )
    flat_positions = op.Reshape(position_ids, op.Constant(value_ints=[-1]))
    first = op.Gather(flat_positions, op.Add(op.Mul(row, op.Gather(position_shape, 1)), first_index))
    has_valid = op.And(op.Greater(first, negative), op.Less(first, capacity))
    given = op.Unsqueeze(slot_id, op.Constant(value_ints=[1]))
    slot_in_block = op.And(op.Greater(given, negative), op.Less(given, block_size))
    slot_agrees = op.Equal(op.Mod(given, slot_period), op.Mod(first, slot_period))
    slot_ok = op.And(slot_in_block, op.Or(op.Not(has_valid), slot_agrees))
    block = op.Where(slot_ok, block, zero)
    # Every token write into block 0 lands on its row 0, never on the zero row.
    offset = op.Where(op.Greater(block, zero), offset, zero)
    # One more entry per row (a [B, 1] column): the zero row for row 0, row 0 for the others.
    block = op.Concat(block, op.Mul(row, zero), axis=1)
    zero_row_offset = op.Sub(block_size, op.Constant(value_int=1))
    offset = op.Concat(offset, op.Where(op.Equal(row, zero), zero_row_offset, zero), axis=1)

    one = op.Constant(value_ints=[1])
    batch_and_heads = op.Concat(
        op.Slice(position_shape, op.Constant(value_ints=[0]), one),
        op.Slice(pool_shape, one, op.Constant(value_ints=[2])),
        axis=0,
    )
    index_shape = op.Concat(
        batch_and_heads, op.Slice(op.Shape(block), one, op.Constant(value_ints=[2])), one, axis=0
    )
    head_index = op.Range(zero, op.Gather(pool_shape, 1), op.Constant(value_int=1))
    write_index = op.Concat(
        op.Expand(op.Unsqueeze(block, op.Constant(value_ints=[1, 3])), index_shape),
        op.Expand(op.Unsqueeze(head_index, op.Constant(value_ints=[0, 2, 3])), index_shape),
        op.Expand(op.Unsqueeze(offset, op.Constant(value_ints=[1, 3])), index_shape),
        axis=3,
    )
    head_dim = op.Slice(pool_shape, op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
    # Expanded as float, then cast: onnxruntime's CPU Expand has no bfloat16 kernel.
    zeros_shape = op.Concat(batch_and_heads, one, head_dim, axis=0)
    zeros = op.CastLike(op.Expand(op.Constant(value_float=0.0), zeros_shape), pool)
    return write_index, zeros


@script(paged, default_opset=op)
def PagedCtxScatter(pool, write_index, updates, zeros):
    """Write new K or V rows into the block pool, and zeros into its zero rows; the paged form
    of ``CtxScatter``.

    Inputs:
      pool         ``[N, H, kv_block_size, D]``.
      write_index  int64 ``[B, H, S + 1, 3]``, zeros ``[B, H, 1, D]``: from ``PagedWriteIndex``
                   (so only block 0 and the writer's own blocks are ever named).
      updates      ``[B, H, S, D]``.
    Output:
      the pool with ``pool[write_index[b, h, s]] = updates[b, h, s, :]`` for ``s < S``, and the
      zero rows set to zeros, same shape as ``pool``.

    One ``ScatterND`` straight into the 4-D pool: its result is the graph's retained-state
    output, and a ``Reshape`` of the pool between the two would cost a full copy of it
    (measured: as much as the scatter). The updates are copied once to append the zeros; they
    are one call's tokens, small beside the pool.
    """
    return op.ScatterND(pool, write_index, op.Concat(updates, zeros, axis=2))


@script(paged, default_opset=op)
def PagedReadIndex(pool, block_table, ctx_indices):
    """The rows a read gathers, shared by every cache read at the same positions (computed
    once per call, not once per cache; see ``PagedCtxGather``).

    Inputs:
      pool          ``[N, H, kv_block_size, D]`` (only its shape is read).
      block_table   int64 ``[B, num_kv_blocks]``.
      ctx_indices   int64 ``[B, 1 or H, C]``: logical positions to read, per head or shared.
    Outputs:
      rows       int64 ``[B, H, C]``: row ``(block * H + h) * kv_block_size + offset`` of the pool
                 seen as ``[N * H * kv_block_size, D]``, at the address of ``ctx_indices[b, h (or
                 0), k]`` where that address is readable; the zero row of head ``h`` (``offset =
                 kv_block_size - 1`` of block 0) where it is not: an invalid index (padding, the
                 INT32_MAX "don't care" sentinel of QEfficient exports, a position beyond the
                 table, an unallocated or out-of-pool entry) or a table entry naming block 0, the
                 null block, which invalid writes fill with garbage (NaN included).
      row_shape  int64 ``[2]``: ``[-1, D]``, the pool seen as rows.
    """
    index_shape = op.Shape(ctx_indices)
    block, offset = PagedBlockAddress(pool, block_table, op.Flatten(ctx_indices, axis=1))
    block = op.Reshape(block, index_shape)
    last_offset = op.Sub(op.Gather(op.Shape(pool), 2), op.Constant(value_int=1))
    offset = op.Where(
        op.Greater(block, op.Constant(value_int=0)), op.Reshape(offset, index_shape), last_offset
    )
    rows = PagedRowIndex(pool, block, offset)
    head_dim = op.Slice(op.Shape(pool), op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
    row_shape = op.Concat(op.Constant(value_ints=[-1]), head_dim, axis=0)
    return rows, row_shape


@script(paged, default_opset=op)
def PagedReadIndexCCL(pool, block_table, ctx_indices, comp_ctx_len):
    """``PagedReadIndex`` for the reads of ``CtxGather`` with a compute-context length.

    Inputs:
      pool, block_table  as for ``PagedReadIndex``.
      ctx_indices        int64 ``[B, 1 or H, C]``: logical positions to read (as in ``CtxGather``).
      comp_ctx_len       int64 scalar: number of positions to read; ``ctx_indices`` is broadcast to
                         ``[B, ., comp_ctx_len]`` first (``C`` is 1 or ``comp_ctx_len``).
    Outputs:
      rows, row_shape as ``PagedReadIndex`` gives them for the broadcast indices.
    """
    length = op.Reshape(comp_ctx_len, op.Constant(value_ints=[1]))
    broadcast = op.Concat(op.Constant(value_ints=[1, 1]), length, axis=0)
    rows, row_shape = PagedReadIndex(pool, block_table, op.Expand(ctx_indices, broadcast))
    return rows, row_shape


@script(paged, default_opset=op)
def PagedCtxGather(pool, rows, row_shape):
    """Read K or V rows from a block pool a paged write of this call produced; the paged form
    of ``CtxGather`` (with or without a compute-context length) and of ``CtxGatherBlockedKV``.

    Inputs:
      pool             ``[N, H, kv_block_size, D]``: the output of a ``PagedCtxScatter``, whose
                       zero rows are therefore zeros.
      rows, row_shape  from ``PagedReadIndex`` (or its CCL form).
    Output:
      ``[B, H, C, D]``: ``out[b, h, k, :]`` is pool row ``rows[b, h, k]``: the addressed row where
      the address is readable, zeros where it is not, whatever block 0 held before the call.

    One pass over what is read: a ``Gather`` of rows, not of an expanded index. Zeroing the
    unreadable positions here instead (a ``Where``, or a pick from the rows after one zero row)
    would move them again: measured, 1.6 to 2.3 times the ``Gather``.
    """
    return op.Gather(op.Reshape(pool, row_shape), rows, axis=0)


@script(paged, default_opset=op)
def PagedLogicalShape(pool, block_table):
    """The shape the contiguous cache had: ``[B, H, num_kv_blocks * kv_block_size, D]``.

    Inputs:
      pool         ``[N, H, kv_block_size, D]`` (only its shape is read).
      block_table  int64 ``[B, num_kv_blocks]`` (only its shape is read).
    Output:
      int64 ``[4]``. Every node that derived a batch size, a context length or a mask from the
      old cache shape reads this instead, so it sees the logical view of the paged cache.
    """
    pool_shape = op.Shape(pool)
    table_shape = op.Shape(block_table)
    zero = op.Constant(value_ints=[0])
    one = op.Constant(value_ints=[1])
    two = op.Constant(value_ints=[2])
    three = op.Constant(value_ints=[3])
    four = op.Constant(value_ints=[4])
    logical_length = op.Mul(op.Slice(table_shape, one, two), op.Slice(pool_shape, two, three))
    return op.Concat(
        op.Slice(table_shape, zero, one),
        op.Slice(pool_shape, one, two),
        logical_length,
        op.Slice(pool_shape, three, four),
        axis=0,
    )


@script(paged, default_opset=op)
def PagedWindowShape(pool, block_table, window):
    """The shape a ring-buffer (sliding-window) cache had: ``[B, H, window, D]``.

    Inputs:
      pool         ``[N, H, kv_block_size, D]`` (only its shape is read).
      block_table  int64 ``[B, num_kv_blocks]`` (only its shape is read).
      window       int64 ``[1]``: the ring length. The ring lives in the first
                   ``ceil(window / kv_block_size)`` columns of each row's ``block_table``: the
                   ring's own table ``block_table_w<window>`` (exactly that wide, addressing a
                   window-sized pool), or, with ``--shared-window-table``, the one table of all
                   layers.
    Output:
      int64 ``[4]``, read by every node that derived the ring length or the batch size from the
      old cache shape.
    """
    pool_shape = op.Shape(pool)
    table_shape = op.Shape(block_table)
    one = op.Constant(value_ints=[1])
    return op.Concat(
        op.Slice(table_shape, op.Constant(value_ints=[0]), one),
        op.Slice(pool_shape, one, op.Constant(value_ints=[2])),
        window,
        op.Slice(pool_shape, op.Constant(value_ints=[3]), op.Constant(value_ints=[4])),
        axis=0,
    )
