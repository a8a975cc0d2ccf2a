"""Add the paged-cache inputs ``block_table`` and ``slot_id`` and fix the paged layout."""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx_ir as ir

from paged_rewrite.errors import UnsupportedPatternError, UsageError
from paged_rewrite.passes.find_cache_sites import CacheSites, Dim

BLOCK_TABLE = "block_table"
SLOT_ID = "slot_id"
NUM_KV_BLOCKS = "num_kv_blocks"
TOTAL_NUM_KV_BLOCKS = "total_num_kv_blocks"


@dataclass(frozen=True)
class PagedLayout:
    """The paged cache layout every later pass builds on."""

    kv_block_size: int
    num_kv_blocks: int | str
    total_num_kv_blocks: int | str
    batch_dim: Dim
    old_length_dim: Dim
    block_table: ir.Value
    slot_id: ir.Value

    @property
    def logical_length(self) -> int | None:
        """``num_kv_blocks * kv_block_size`` when static: the context attention sees."""
        if isinstance(self.num_kv_blocks, int):
            return self.num_kv_blocks * self.kv_block_size
        return None


def add_paged_inputs(
    model: ir.Model,
    sites: CacheSites,
    kv_block_size: int,
    ctx_len: int | None = None,
    num_blocks: int | None = None,
) -> PagedLayout:
    """Append ``block_table`` int64 ``[batch, num_kv_blocks]`` and ``slot_id`` int64 ``[batch]``."""
    if kv_block_size < 1:
        raise UsageError(f"--kv-block-size must be a positive integer, got {kv_block_size}")
    if ctx_len is None and isinstance(sites.length_dim, int):
        ctx_len = sites.length_dim
    if ctx_len is not None and ctx_len < 1:
        raise UsageError(f"--ctx-len must be a positive integer, got {ctx_len}")
    if num_blocks is not None and num_blocks < 2:
        raise UsageError(f"--num-blocks must be at least 2 (block 0 is the null block), got {num_blocks}")
    taken = {value.name for value in model.graph.inputs}
    for name in (BLOCK_TABLE, SLOT_ID):
        if name in taken:
            raise UnsupportedPatternError(f"the model already has an input named {name!r}")
    num_kv_blocks: int | str = math.ceil(ctx_len / kv_block_size) if ctx_len is not None else NUM_KV_BLOCKS
    batch = sites.batch_dim
    block_table = ir.Value(
        name=BLOCK_TABLE, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch, num_kv_blocks])
    )
    slot_id = ir.Value(name=SLOT_ID, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([batch]))
    model.graph.inputs.extend([block_table, slot_id])
    return PagedLayout(
        kv_block_size=kv_block_size,
        num_kv_blocks=num_kv_blocks,
        total_num_kv_blocks=num_blocks if num_blocks is not None else TOTAL_NUM_KV_BLOCKS,
        batch_dim=batch,
        old_length_dim=sites.length_dim,
        block_table=block_table,
        slot_id=slot_id,
    )
