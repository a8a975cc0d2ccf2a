"""The paged write contract, restated in numpy for the tests that check a model against it."""

from __future__ import annotations

import numpy as np


def contract_writes(
    table: np.ndarray, positions: np.ndarray, slot_id: np.ndarray, bs: int, num_pool: int
) -> set[tuple[int, int]]:
    """Where the contract lets each row write, row by row: its own positions through its own
    table row, nothing at all if its slot_id is broken (block 0 is always allowed)."""
    allowed = set()
    for row in range(table.shape[0]):
        inside = [int(p) for p in positions[row] if 0 <= p < table.shape[1] * bs]
        slot = int(slot_id[row])
        if not (0 <= slot < bs and (not inside or slot == inside[0] % bs)):
            continue
        for p in inside:
            block = int(table[row, p // bs])
            if 0 < block < num_pool:
                allowed.add((block, p % bs))
    return allowed


def zero_rows_are_zero(pool_after: np.ndarray) -> bool:
    """The null block's zero row (its last row, every head) after a call is +0.0: every paged
    write sets it, which is what makes invalid reads return zeros whatever block 0 held before."""
    zero_row = pool_after[0, :, -1]
    return bool(np.array_equal(zero_row, np.zeros_like(zero_row)) and not np.signbit(zero_row).any())
