"""Content-addressed full KV blocks, for prefix caching.

A full block of a prompt is named by a hash of its token ids *and of every block before it* (a
hash chain, as vLLM does): two prompts share the block only if they agree on everything up to
its end, which is exactly when its K/V are the same. The ``BlockManager`` keeps the mapping
here, holds one reference per cached block on the cache's behalf, and evicts the least recently
used block no sequence holds when the pool runs dry.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np


def block_hashes(tokens: np.ndarray, kv_block_size: int) -> Iterator[bytes]:
    """The chained hash of each full block of ``tokens``, in order (a partial tail has none)."""
    ids = np.ascontiguousarray(tokens, dtype=np.int64)
    parent = b""
    for start in range(0, len(ids) - kv_block_size + 1, kv_block_size):
        parent = hashlib.sha256(parent + ids[start : start + kv_block_size].tobytes()).digest()
        yield parent


class PrefixCache:
    """``hash -> block`` for cached blocks, and which of them only the cache still holds, least
    recently released first (the eviction order)."""

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._block_of)

    @property
    def num_idle(self) -> int:
        """Cached blocks no sequence holds: reusable once evicted."""
        return len(self._idle)

    def lookup(self, digest: bytes) -> int | None:
        return self._block_of.get(digest)

    def holds(self, block: int) -> bool:
        return block in self._hash_of

    def insert(self, digest: bytes, block: int) -> None:
        self._block_of[digest] = block
        self._hash_of[block] = digest

    def is_idle(self, block: int) -> bool:
        return block in self._idle

    def mark_idle(self, block: int) -> None:
        """No sequence holds ``block`` any more: it becomes the most recently used idle block."""
        self._idle[block] = None

    def mark_busy(self, block: int) -> None:
        """A sequence took ``block`` again."""
        self._idle.pop(block, None)

    def evict(self) -> int:
        """Forget the least recently used idle block and return it (the caller frees it)."""
        block, _ = self._idle.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block
