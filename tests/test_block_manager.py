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


def test_fork_shares_full_blocks_and_copies_a_partial_one_on_write() -> None:
    manager = BlockManager(10, 4)
    manager.append("a", 6)  # blocks [1, 2]; block 2 holds positions 4, 5 of 8
    manager.fork("a", "b")
    assert manager.blocks_of("b") == [1, 2] and manager.num_used_blocks == 2
    manager.prepare_write("b", 7)  # b writes position 6, inside shared block 2: copy it first
    assert manager.take_copies() == [(2, 3)]
    assert manager.blocks_of("b") == [1, 3] and manager.blocks_of("a") == [1, 2]
    manager.append("b", 1)
    manager.prepare_write("a", 7)  # a's block 2 is no longer shared: no copy
    assert manager.take_copies() == []
    manager.free("a")
    assert manager.num_used_blocks == 2 and manager.blocks_of("b") == [1, 3]  # block 1 still b's
    manager.free("b")
    assert manager.num_used_blocks == 0 and manager.num_free_blocks == 9


def test_fork_at_a_block_boundary_copies_nothing() -> None:
    manager = BlockManager(10, 4)
    manager.append("a", 8)
    manager.fork("a", "b")
    manager.prepare_write("b", 9)  # position 8 starts a new block
    assert manager.take_copies() == []
    assert manager.blocks_of("b")[:2] == manager.blocks_of("a") and len(manager.blocks_of("b")) == 3
