"""The reference block manager: allocation order, table/slot production, freeing, exhaustion."""

from __future__ import annotations

import numpy as np
import pytest

from paged_rewrite.runtime.block_manager import BlockManager, OutOfBlocksError, shuffled_order


def test_shuffled_allocation_tables_and_slots() -> None:
    order = shuffled_order(9, seed=3)
    manager = BlockManager(9, 4, order)
    manager.append("a", 6)  # 2 blocks, 2 slots used in the second
    manager.append("b", 4)  # exactly 1 block, full
    assert manager.blocks_of("a") == order[:2] and manager.blocks_of("b") == order[2:3]
    table = manager.block_table(["a", None, "b"], 3)
    assert table.tolist() == [[*order[:2], -1], [-1, -1, -1], [order[2], -1, -1]]
    assert manager.slot_id(["a", None, "b"]).tolist() == [2, 0, 0]
    assert 0 not in table


def test_free_returns_blocks_and_exhaustion_is_an_error() -> None:
    manager = BlockManager(4, 2)
    manager.append("a", 6)
    assert manager.num_free_blocks == 0
    with pytest.raises(OutOfBlocksError):
        manager.append("b", 1)
    manager.free("a")
    assert manager.num_free_blocks == 3
    manager.append("b", 1)
    assert manager.blocks_of("b") == [1]


def test_block_zero_is_never_handed_out() -> None:
    manager = BlockManager(50, 1, shuffled_order(50, seed=0))
    manager.append("s", 49)
    assert sorted(manager.blocks_of("s")) == list(range(1, 50))
    with pytest.raises(ValueError, match="permutation"):
        BlockManager(4, 1, [0, 1, 2])
    assert np.array_equal(manager.block_table(["s"], 49)[0], manager.blocks_of("s"))
