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


def adversarial_ring_call(
    rng: np.random.Generator, bs: int, full_pool: int, ctx_len: int, vocab: int = 256
) -> dict[str, np.ndarray]:
    """One call's inputs for a model with a 32-slot ring table ``block_table_w32`` (2 columns)
    beside an 8-column ``block_table`` (a context of 128 at block 16), garbage everywhere but row 0: ``-1``, the null block, duplicates, entries past a
    9-block ring pool but inside the full pool, entries past both; wrong ``slot_id``s, padding and
    out-of-range positions, an all-padding last row. Row 0 is well formed: consecutive positions,
    its own blocks, its ring at blocks 1 and 2, a consistent ``slot_id``. Pools are the caller's."""
    batch, seq = int(rng.integers(2, 5)), int(rng.choice([1, 7, 16]))
    start = int(rng.integers(0, ctx_len - seq))
    full = rng.choice([-1, 0, *range(9, full_pool), full_pool + 2], size=(batch, 8)).astype(np.int64)
    ring = rng.choice([-1, 0, *range(3, 24), 40], size=(batch, 2)).astype(np.int64)
    full[0] = -1
    used = (start + seq - 1) // bs + 1
    full[0, :used] = rng.permutation(np.arange(1, 9))[:used]
    ring[0] = [1, 2]
    positions = rng.choice([-1, 255, 130, *range(ctx_len)], size=(batch, seq)).astype(np.int64)
    positions[0] = np.arange(start, start + seq)
    if batch > 2:
        positions[-1] = -1
    slot_id = rng.integers(-1, bs + 1, batch).astype(np.int64)
    slot_id[0] = start % bs
    return {
        "input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
        "position_ids": positions,
        "block_table": full,
        "block_table_w32": ring,
        "slot_id": slot_id,
    }
