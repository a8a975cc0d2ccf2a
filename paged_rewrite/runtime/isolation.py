"""The checks a paged runner makes after every step: which pool slots the step may have changed
(isolation), and whether the table it passed covered every row's live context (width)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from paged_rewrite.runtime.block_manager import NULL_BLOCK

if TYPE_CHECKING:
    from paged_rewrite.runtime.runners import Row


@dataclass
class IsolationRecord:
    """Blocks that changed during one step although no row of that step owned them."""

    step: int
    foreign_blocks_changed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class TableWidthRecord:
    """The ``block_table`` width (columns) one step passed, the width its longest row needed
    (its live context: positions already written and those the step writes), and the rows whose
    live context the table did not cover. Such rows run on a truncated context: the positions
    past the table are not attended to (or read as the null block), their writes go to the null
    block. Harmless to other rows, wrong for them: a runtime must never do it."""

    step: int
    columns: int
    needed_columns: int
    rows_cut: tuple[Hashable, ...] = ()


def expected_writes(
    rows: Sequence[Row],
    table: np.ndarray,
    kv_block_size: int,
    ring_lengths: Sequence[int],
    window: int | None = None,
) -> set[tuple[int, int]]:
    """``(block, offset)`` of every position the rows write, by the contract's address rule
    through each row's own table row: position ``p`` at column ``p // size``, or in a ring
    group's own table (``window=W``) ring slot ``p % W`` at column ``(p % W) // size``.
    ``ring_lengths`` are rings whose slots are rewritten in an order the model chooses (rings in
    the first columns of the full table, rings a model computes itself, or a prefill-only
    graph's ring, which holds the last ``W`` tokens in order): every slot of those columns of
    the row's own table is allowed, so only the row that owns such a block may change it."""
    size = kv_block_size
    allowed: set[tuple[int, int]] = set()
    for index, row in enumerate(rows):
        if row.seq is None:
            continue  # an idle row writes nothing but the null block
        for position in (int(p) for p in row.position_ids if p >= 0):
            slot = position % window if window else position
            if slot < table.shape[1] * size:
                block = int(table[index, slot // size])
                if block > NULL_BLOCK:
                    allowed.add((block, slot % size))
        for ring in ring_lengths:
            for block in (int(b) for b in table[index, : -(-ring // size)] if b > NULL_BLOCK):
                allowed.update((block, offset) for offset in range(size))
    return allowed


def unexpected_writes(before: np.ndarray, after: np.ndarray, allowed: set[tuple[int, int]]) -> list[int]:
    """Blocks with a slot (axis 2) that changed outside ``allowed`` ``(block, offset)`` pairs;
    block 0 (the null block) may change anywhere."""
    blocks, _, size, _ = before.shape
    changed = (before.view(np.uint8) != after.view(np.uint8)).reshape(blocks, before.shape[1], size, -1)
    slots = changed.any(axis=(1, 3))  # [blocks, size]
    return sorted(
        {int(b) for b, o in zip(*np.nonzero(slots), strict=True) if b != NULL_BLOCK and (b, o) not in allowed}
    )


def foreign_changes(before: np.ndarray, after: np.ndarray, owned: set[int]) -> list[int]:
    """Blocks (axis 0) outside ``owned`` whose bytes differ between ``before`` and ``after``."""
    differs = (before.view(np.uint8) != after.view(np.uint8)).reshape(before.shape[0], -1).any(axis=1)
    return [int(b) for b in np.nonzero(differs)[0] if int(b) not in owned]
