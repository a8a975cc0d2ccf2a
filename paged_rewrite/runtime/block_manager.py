"""A reference KV block manager for paged models written by paged-rewrite.

It owns the bookkeeping a serving runtime needs: a pool of ``num_blocks`` physical blocks of
``kv_block_size`` token slots, block 0 reserved as the null block, a free list, per-sequence
block lists and lengths, an optional prefix cache, and per call the ``block_table`` and
``slot_id`` inputs of the model.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from paged_rewrite.runtime.prefix_cache import PrefixCache, block_hashes

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

    Prefix sharing: ``fork(parent, child)`` gives the child the parent's blocks by reference
    (reference counts). Before a sequence writes into a block it shares, ``prepare_write`` makes
    it private — copy on write — and queues the ``(source, copy)`` pair; the runtime applies
    ``take_copies()`` to its pools before the model call. Full shared blocks are never copied.

    Prefix caching (``prefix_caching=True``): ``cache_prompt(seq, prompt)`` names the full blocks
    of a prefilled prompt by content (``prefix_cache.block_hashes``); the cache holds a reference
    to each, so they outlive their sequence. ``match_prefix(seq, prompt)`` starts a new sequence
    on the cached blocks its prompt begins with. When the free list is empty, the least recently
    used cached block no sequence holds is evicted and reused.

    Window groups (``window=W``): the manager of the pools of a ring-buffer layer group, addressed
    by its own table ``block_table_w<W>``. A sequence holds at most ``ceil(W / kv_block_size)``
    blocks, allocated as its ring first fills and then reused as the ring turns (ring slot
    ``p % W`` lives at column ``(p % W) // kv_block_size``); its table has exactly that many
    columns; ``fork`` shares them until either side writes (copy on write). Prefix caching in a
    ring group (``W`` a multiple of the block size) follows the layer type, as in vLLM: a full
    block is named by the same hash chain as in the full group while its ring column still holds
    it (``cache_prompt``; the cache's reference makes the ring's next lap copy it on write), and a
    hit of ``k`` blocks needs only the blocks inside the window at ``k``, ``[k - W/size, k)``,
    placed at their ring columns (``prefix_blocks``, ``match_prefix(limit=k)``).

    Logical-position windows (``window=W, logical=True``): the manager of a full-length cache that
    the model reads only over ``[p0 - W, p0 + S)`` (QEfficient's chunked and disaggregated
    sliding-window exports). Its table spans the context like ``block_table``; once a sequence
    has filled ``length`` positions, every block wholly before ``length - W + 1`` is never attended
    to again (a query at ``q`` sees ``(q - W, q]``; the read's extra position ``q - W`` is masked)
    and goes back to the free list, its table entry ``-1`` (reads of it return the null block's
    zeros). A sequence thus holds the blocks of ``[length - W + 1, length)`` between calls, and
    during a call those of ``[p0 - W + 1, p0 + S)`` (``logical_window_blocks``).
    """

    def __init__(
        self,
        num_blocks: int,
        kv_block_size: int,
        block_order: Sequence[int] | None = None,
        ring_lengths: Sequence[int] = (),
        prefix_caching: bool = False,
        window: int | None = None,
        logical: bool = False,
    ) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be at least 2 (block {NULL_BLOCK} is reserved), got {num_blocks}"
            )
        if kv_block_size < 1:
            raise ValueError(f"kv_block_size must be positive, got {kv_block_size}")
        if window is not None and window < 1:
            raise ValueError(f"window must be positive, got {window}")
        if logical and window is None:
            raise ValueError("a logical-position window needs its length: window=W")
        if window is not None and prefix_caching and (logical or window % kv_block_size):
            raise ValueError(
                "prefix caching in a window group needs a ring whose length is a multiple of "
                "kv_block_size (its ring columns then hold whole blocks of positions)"
            )
        order = list(block_order) if block_order is not None else list(range(1, num_blocks))
        if sorted(order) != list(range(1, num_blocks)):
            raise ValueError(
                "block_order must be a permutation of 1..num_blocks-1 (block 0 is the null block)"
            )
        self.num_blocks = num_blocks
        self.kv_block_size = kv_block_size
        self._free = list(reversed(order))  # pop() hands out order[0] first
        self._sequences: dict[Hashable, _Sequence] = {}
        self._references: dict[int, int] = {}
        self._copies: list[tuple[int, int]] = []
        # Ring-buffer (sliding-window) layers write position p at ring slot p % ring, inside
        # the first columns of the table: copy on write must cover those columns too.
        self.window = window
        self.logical = logical
        self.ring_lengths = (window,) if window is not None and not logical else tuple(ring_lengths)
        self.prefix_cache = PrefixCache() if prefix_caching else None

    @property
    def prefix_caching(self) -> bool:
        return self.prefix_cache is not None

    @property
    def max_blocks_per_sequence(self) -> int | None:
        """A ring group's blocks per sequence (its table width); None for the other groups."""
        if self.window is None or self.logical:
            return None
        return -(-self.window // self.kv_block_size)

    def blocks_for(self, length: int, chunk: int = 1) -> int:
        """Blocks a sequence of ``length`` positions holds at most, while a call writes ``chunk``
        positions. A logical-position window holds, during a call at ``p0``, the blocks of
        ``[p0 - W + 1, p0 + chunk)`` (``first_attended``): ``W + chunk - 1`` positions, which
        touch at most ``ceil((W + chunk - 2) / kv_block_size) + 1`` blocks."""
        needed = -(-length // self.kv_block_size)
        ring = self.max_blocks_per_sequence
        if self.logical and self.window is not None:
            return min(needed, logical_window_blocks(self.window, chunk, self.kv_block_size))
        return needed if ring is None else min(needed, ring)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation can get: free ones and cached ones no sequence holds."""
        return len(self._free) + (self.prefix_cache.num_idle if self.prefix_cache else 0)

    @property
    def num_used_blocks(self) -> int:
        """Distinct physical blocks held (a block shared by several sequences counts once)."""
        return len(self._references)

    def blocks_of(self, seq: Hashable) -> list[int]:
        """Physical blocks of ``seq``, in logical order (``-1`` where a logical-position window freed one)."""
        return list(self._sequences[seq].blocks)

    def length_of(self, seq: Hashable) -> int:
        return self._sequences[seq].length

    def ensure_capacity(self, seq: Hashable, length: int) -> None:
        """Allocate blocks so that logical positions ``[0, length)`` of ``seq`` have a home (a
        logical-position window's freed columns stay ``-1``)."""
        state = self._sequences.setdefault(seq, _Sequence())
        needed = -(-length // self.kv_block_size) if self.logical else self.blocks_for(length)
        while len(state.blocks) < needed:
            state.blocks.append(self._allocate())

    def prepare_write(self, seq: Hashable, length: int) -> None:
        """Make room for positions ``[length_of(seq), length)`` and make every block they touch
        private to ``seq`` (copy on write of a shared, partially filled block)."""
        self.ensure_capacity(seq, length)
        state = self._sequences[seq]
        size = self.kv_block_size
        # The columns the write touches, as in the full group; a ring group's writes land at ring
        # columns instead (below). A logical-position window is addressed like the full group.
        ring_only = self.window is not None and not self.logical
        columns = set() if ring_only else set(range(state.length // size, -(-length // size)))
        for ring in self.ring_lengths:
            if length - state.length >= ring:  # the write goes round the whole ring
                columns |= set(range(-(-ring // size)))
            else:
                columns |= {(p % ring) // size for p in range(state.length, length)}
        for column in sorted(columns):
            block = state.blocks[column]
            if block != UNALLOCATED and self._references[block] > 1:
                private = self._allocate()
                self._release(block)
                state.blocks[column] = private
                self._copies.append((block, private))

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """``child`` starts as ``parent``: same length, same blocks, shared by reference."""
        if child in self._sequences:
            raise ValueError(f"sequence {child!r} already exists")
        source = self._sequences[parent]
        for block in source.blocks:
            if block != UNALLOCATED:
                self._references[block] += 1
        self._sequences[child] = _Sequence(list(source.blocks), source.length)

    def take_copies(self) -> list[tuple[int, int]]:
        """Pending ``(source, copy)`` block copies the runtime must apply to every pool."""
        copies, self._copies = self._copies, []
        return copies

    def match_prefix(self, seq: Hashable, prompt: np.ndarray, limit: int | None = None) -> int:
        """Start ``seq`` on the cached blocks ``prompt`` begins with (at most ``limit`` blocks of
        positions); return how many positions they hold (the first position left to prefill). At
        least the prompt's last token is left out: its logits are the first output, and it must
        be written into a block of its own."""
        if seq in self._sequences:
            raise ValueError(f"sequence {seq!r} already exists")
        cache = self._require_cache()
        hit = self.prefix_blocks(prompt, limit)
        blocks = self.cached_prefix(prompt, hit)
        for block in blocks:
            self._references[block] += 1
            cache.mark_busy(block)
        self._sequences[seq] = _Sequence(blocks, hit * self.kv_block_size)
        return hit * self.kv_block_size

    def prefix_blocks(self, prompt: np.ndarray, limit: int | None = None) -> int:
        """How many blocks of positions a hit on ``prompt`` covers (at most ``limit``): the cached
        run of its first blocks, or in a ring group the largest ``k`` whose window blocks
        ``[k - W/size, k)`` are all cached."""
        size, cache = self.kv_block_size, self._require_cache()
        reusable = (len(prompt) - 1) // size if limit is None else min(limit, (len(prompt) - 1) // size)
        digests = list(block_hashes(prompt[: reusable * size], size))
        ring = self.max_blocks_per_sequence
        if ring is None:
            return next((k for k, d in enumerate(digests) if cache.lookup(d) is None), len(digests))
        for hit in range(reusable, 0, -1):
            if all(cache.lookup(digests[j]) is not None for j in range(max(0, hit - ring), hit)):
                return hit
        return 0

    def cached_prefix(self, prompt: np.ndarray, limit: int | None = None) -> list[int]:
        """The cached blocks ``match_prefix`` would start ``prompt`` on, without taking them: no
        reference, no change to the eviction order (an admission check may still say no). In a
        ring group, the window blocks of the hit in ring-column order."""
        cache = self._require_cache()
        ring = self.max_blocks_per_sequence
        if ring is not None:
            hit = self.prefix_blocks(prompt, limit)
            digests = list(block_hashes(prompt[: hit * self.kv_block_size], self.kv_block_size))
            columns = [UNALLOCATED] * min(hit, ring)
            for j in range(max(0, hit - ring), hit):
                columns[j % ring] = cache.lookup(digests[j]) or UNALLOCATED
            return columns
        reusable = (len(prompt) - 1) // self.kv_block_size
        if limit is not None:
            reusable = min(reusable, limit)
        blocks = []
        for digest in block_hashes(prompt[: reusable * self.kv_block_size], self.kv_block_size):
            block = cache.lookup(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def num_idle_among(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` only the prefix cache holds (taking them makes them unavailable)."""
        cache = self.prefix_cache
        return 0 if cache is None else sum(cache.is_idle(block) for block in set(blocks))

    def cache_prompt(self, seq: Hashable, prompt: np.ndarray) -> None:
        """Name the full blocks of ``seq``'s prefilled ``prompt`` by content. A block whose content
        is cached already (under another block) stays private to ``seq``."""
        cache = self._require_cache()
        state = self._sequences[seq]
        size = self.kv_block_size
        filled = min(len(prompt), state.length) // size
        digests = list(block_hashes(prompt[: filled * size], size))
        pairs = list(zip(state.blocks[:filled], digests, strict=False))
        ring = self.max_blocks_per_sequence
        if ring is not None:  # the blocks its ring columns still hold: none a later lap began
            oldest = max(0, -(-state.length // size) - ring)
            pairs = [(state.blocks[j % ring], digests[j]) for j in range(oldest, filled)]
        for block, digest in pairs:
            if cache.lookup(digest) is None and not cache.holds(block):
                cache.insert(digest, block)
                self._references[block] += 1  # the cache's own reference

    def _require_cache(self) -> PrefixCache:
        if self.prefix_cache is None:
            raise ValueError("prefix caching is off: create the BlockManager with prefix_caching=True")
        return self.prefix_cache

    def _allocate(self) -> int:
        if not self._free and self.prefix_cache is not None and self.prefix_cache.num_idle:
            self._release(self.prefix_cache.evict())  # drop the cache's reference: freed
        if not self._free:
            raise OutOfBlocksError(f"pool of {self.num_blocks} blocks is exhausted")
        block = self._free.pop()
        self._references[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._references[block] -= 1
        if self._references[block] == 0:
            del self._references[block]
            self._free.append(block)
        elif (
            self._references[block] == 1 and self.prefix_cache is not None and self.prefix_cache.holds(block)
        ):
            self.prefix_cache.mark_idle(block)  # only the cache holds it now

    def append(self, seq: Hashable, num_tokens: int) -> None:
        """Record that ``num_tokens`` more tokens of ``seq`` were written (allocating as needed)."""
        state = self._sequences.setdefault(seq, _Sequence())
        self.ensure_capacity(seq, state.length + num_tokens)
        state.length += num_tokens
        if self.logical and self.window is not None:
            self._free_behind(state, self.first_attended(state.length))

    def first_attended(self, length: int) -> int:
        """A logical-position window's first position any later call of a sequence of ``length``
        positions attends to: a query at ``q`` sees ``(q - W, q]`` (the mask; the read also
        fetches ``q - W``, masked), and every later query is at ``length`` or beyond."""
        assert self.window is not None
        return max(length - self.window + 1, 0)

    def _free_behind(self, state: _Sequence, first_attended: int) -> None:
        """Release the blocks wholly before position ``first_attended``: no later call attends
        to them (it may read them, masked: a freed entry reads the null block's zero row)."""
        for column in range(first_attended // self.kv_block_size):
            if state.blocks[column] != UNALLOCATED:
                self._release(state.blocks[column])
                state.blocks[column] = UNALLOCATED

    def free(self, seq: Hashable) -> None:
        """Drop ``seq``; blocks no other sequence shares go back to the free list."""
        state = self._sequences.pop(seq)
        for block in reversed(state.blocks):
            if block != UNALLOCATED:
                self._release(block)

    def block_table(
        self, seqs: Sequence[Hashable | None], num_columns: int, truncate: bool = False
    ) -> np.ndarray:
        """int64 ``[len(seqs), num_columns]``; ``-1`` where unallocated. ``None`` is an empty row.
        A sequence holding more blocks than the table has columns is an error, unless
        ``truncate``: then its first ``num_columns`` blocks are listed (a narrowed table)."""
        table = np.full((len(seqs), num_columns), UNALLOCATED, dtype=np.int64)
        for row, seq in enumerate(seqs):
            if seq is None:
                continue
            blocks = self._sequences[seq].blocks
            if len(blocks) > num_columns and not truncate:
                raise ValueError(
                    f"sequence {seq!r} holds {len(blocks)} blocks, the table has {num_columns} columns"
                )
            blocks = blocks[:num_columns]
            table[row, : len(blocks)] = blocks
        return table

    def slot_id(self, seqs: Sequence[Hashable | None]) -> np.ndarray:
        """int64 ``[len(seqs)]``: entries of each row's active block already filled (0 for empty rows)."""
        return np.array(
            [0 if seq is None else self._sequences[seq].length % self.kv_block_size for seq in seqs],
            dtype=np.int64,
        )


def logical_window_blocks(window: int, chunk: int, kv_block_size: int) -> int:
    """The most blocks a sequence holds in a logical-position window group while a call writes
    ``chunk`` positions: those touched by the ``window + chunk - 1`` positions ``[p0 - W + 1,
    p0 + chunk)`` at the worst alignment."""
    span = window + max(chunk, 1) - 1
    return -(-(span - 1) // kv_block_size) + 1


def shuffled_order(num_blocks: int, seed: int) -> list[int]:
    """A seeded random permutation of the allocatable blocks ``1..num_blocks-1``."""
    return [int(b) for b in np.random.default_rng(seed).permutation(np.arange(1, num_blocks))]
