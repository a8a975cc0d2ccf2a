"""A reference KV block manager for paged models written by paged-rewrite.

It owns the bookkeeping a serving runtime needs: a pool of ``num_blocks`` physical blocks of
``kv_block_size`` token slots, block 0 reserved as the null block, a free list, per-sequence
block lists and lengths, and per call the ``block_table`` and ``slot_id`` inputs of the model.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

NULL_BLOCK = 0
UNALLOCATED = -1


class OutOfBlocksError(RuntimeError):
    """The pool has no free block left for an allocation."""


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # logical positions [0, length) are filled


class BlockManager:
    """Allocate pool blocks to sequences and produce the paged model's addressing inputs.

    ``block_order`` fixes the order in which free blocks are handed out; by default
    ``1, 2, ...``. Pass a shuffled order (see ``shuffled_order``) to prove that nothing depends
    on physical contiguity.
    """

    def __init__(self, num_blocks: int, kv_block_size: int, block_order: Sequence[int] | None = None) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be at least 2 (block {NULL_BLOCK} is reserved), got {num_blocks}"
            )
        if kv_block_size < 1:
            raise ValueError(f"kv_block_size must be positive, got {kv_block_size}")
        order = list(block_order) if block_order is not None else list(range(1, num_blocks))
        if sorted(order) != list(range(1, num_blocks)):
            raise ValueError(
                "block_order must be a permutation of 1..num_blocks-1 (block 0 is the null block)"
            )
        self.num_blocks = num_blocks
        self.kv_block_size = kv_block_size
        self._free = list(reversed(order))  # pop() hands out order[0] first
        self._sequences: dict[Hashable, _Sequence] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return sum(len(s.blocks) for s in self._sequences.values())

    def blocks_of(self, seq: Hashable) -> list[int]:
        """Physical blocks of ``seq``, in logical order."""
        return list(self._sequences[seq].blocks)

    def length_of(self, seq: Hashable) -> int:
        return self._sequences[seq].length

    def ensure_capacity(self, seq: Hashable, length: int) -> None:
        """Allocate blocks so that logical positions ``[0, length)`` of ``seq`` have a home."""
        state = self._sequences.setdefault(seq, _Sequence())
        needed = -(-length // self.kv_block_size)
        while len(state.blocks) < needed:
            if not self._free:
                raise OutOfBlocksError(f"pool of {self.num_blocks} blocks is exhausted")
            state.blocks.append(self._free.pop())

    def append(self, seq: Hashable, num_tokens: int) -> None:
        """Record that ``num_tokens`` more tokens of ``seq`` were written (allocating as needed)."""
        state = self._sequences.setdefault(seq, _Sequence())
        self.ensure_capacity(seq, state.length + num_tokens)
        state.length += num_tokens

    def free(self, seq: Hashable) -> None:
        """Return every block of ``seq`` to the free list."""
        state = self._sequences.pop(seq)
        self._free.extend(reversed(state.blocks))

    def block_table(self, seqs: Sequence[Hashable | None], num_columns: int) -> np.ndarray:
        """int64 ``[len(seqs), num_columns]``; ``-1`` where unallocated. ``None`` is an empty row."""
        table = np.full((len(seqs), num_columns), UNALLOCATED, dtype=np.int64)
        for row, seq in enumerate(seqs):
            if seq is None:
                continue
            blocks = self._sequences[seq].blocks
            if len(blocks) > num_columns:
                raise ValueError(
                    f"sequence {seq!r} holds {len(blocks)} blocks, the table has {num_columns} columns"
                )
            table[row, : len(blocks)] = blocks
        return table

    def slot_id(self, seqs: Sequence[Hashable | None]) -> np.ndarray:
        """int64 ``[len(seqs)]``: entries of each row's active block already filled (0 for empty rows)."""
        return np.array(
            [0 if seq is None else self._sequences[seq].length % self.kv_block_size for seq in seqs],
            dtype=np.int64,
        )


def shuffled_order(num_blocks: int, seed: int) -> list[int]:
    """A seeded random permutation of the allocatable blocks ``1..num_blocks-1``."""
    return [int(b) for b in np.random.default_rng(seed).permutation(np.arange(1, num_blocks))]
