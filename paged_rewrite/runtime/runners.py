"""Run one model step for a batch of sequences, with the cache kept per sequence (original
contiguous exports) or in a shared block pool (paged models).

Both runners take the same rows and return the logits of each row's last valid token, so a
driver can run them in lockstep and compare.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from paged_rewrite.runtime.block_manager import NULL_BLOCK, BlockManager
from paged_rewrite.runtime.sessions import open_session

RETAINED = "_RetainedState"


@dataclass(frozen=True)
class Row:
    """One batch row of a step: ``input_ids`` and ``position_ids`` of shape ``[S]`` (-1 = padding)."""

    seq: Hashable
    input_ids: np.ndarray
    position_ids: np.ndarray

    @property
    def num_valid(self) -> int:
        return int((self.position_ids >= 0).sum())


@dataclass(frozen=True)
class CacheIO:
    """A cache input of a model, its retained output, and its static ``[heads, head_dim]``."""

    input: str
    output: str
    kv_heads: int
    head_dim: int
    dtype: type[np.floating] = np.float32


def cache_io(session: object) -> list[CacheIO]:
    """The cache inputs of an onnxruntime session: every input with a ``<name>_RetainedState`` output."""
    outputs = {o.name for o in session.get_outputs()}  # type: ignore[attr-defined]
    caches = []
    for value in session.get_inputs():  # type: ignore[attr-defined]
        if value.name + RETAINED in outputs:
            dtype = np.float16 if "float16" in value.type else np.float32
            caches.append(
                CacheIO(value.name, value.name + RETAINED, int(value.shape[1]), int(value.shape[3]), dtype)
            )
    return caches


class _Runner:
    def __init__(self, model_path: str | os.PathLike[str], patch_sentinels: bool) -> None:
        self.session = open_session(model_path, patch_sentinels=patch_sentinels)
        self.caches = cache_io(self.session)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds), strict=True))

    @staticmethod
    def _tokens(rows: Sequence[Row]) -> dict[str, np.ndarray]:
        return {
            "input_ids": np.stack([r.input_ids for r in rows]).astype(np.int64),
            "position_ids": np.stack([r.position_ids for r in rows]).astype(np.int64),
        }


class ContiguousRunner(_Runner):
    """An original export: each sequence owns a ``[1, heads, ctx_len, head_dim]`` cache; a step
    stacks the rows' caches into one batch and splits the retained state back."""

    def __init__(self, model_path: str | os.PathLike[str], ctx_len: int) -> None:
        super().__init__(model_path, patch_sentinels=True)
        self.ctx_len = ctx_len
        self._cache: dict[Hashable, dict[str, np.ndarray]] = {}

    def step(self, rows: Sequence[Row]) -> np.ndarray:
        for row in rows:
            if row.seq not in self._cache:
                self._cache[row.seq] = {
                    c.input: np.zeros((1, c.kv_heads, self.ctx_len, c.head_dim), c.dtype) for c in self.caches
                }
        feeds = self._tokens(rows)
        for c in self.caches:
            feeds[c.input] = np.concatenate([self._cache[r.seq][c.input] for r in rows])
        out = self._run(feeds)
        for index, row in enumerate(rows):
            for c in self.caches:
                self._cache[row.seq][c.input] = out[c.output][index : index + 1]
        return out["logits"][:, -1]

    def release(self, seq: Hashable) -> None:
        self._cache.pop(seq, None)


@dataclass
class IsolationRecord:
    """Blocks that changed during one step although no row of that step owned them."""

    step: int
    foreign_blocks_changed: list[int] = field(default_factory=list)


class PagedRunner(_Runner):
    """A paged model: one block pool per cache tensor, shared by all sequences, addressed through
    ``block_table`` / ``slot_id`` from a ``BlockManager``. Every step also checks isolation: each
    pool block that no row of the step owns (block 0 aside) must be byte-identical afterwards."""

    def __init__(self, model_path: str | os.PathLike[str], manager: BlockManager, num_kv_blocks: int) -> None:
        super().__init__(model_path, patch_sentinels=False)
        self.manager = manager
        self.num_kv_blocks = num_kv_blocks
        self.pools = {
            c.input: np.zeros((manager.num_blocks, c.kv_heads, manager.kv_block_size, c.head_dim), c.dtype)
            for c in self.caches
        }
        self.isolation: list[IsolationRecord] = []

    def step(self, rows: Sequence[Row]) -> np.ndarray:
        manager = self.manager
        for row in rows:
            valid = row.position_ids[row.position_ids >= 0]
            manager.ensure_capacity(row.seq, int(valid.max()) + 1 if valid.size else 0)
        seqs = [row.seq for row in rows]
        feeds = self._tokens(rows)
        feeds["block_table"] = manager.block_table(seqs, self.num_kv_blocks)
        feeds["slot_id"] = manager.slot_id(seqs)
        feeds.update(self.pools)
        out = self._run(feeds)
        owned = {int(b) for b in feeds["block_table"].ravel() if b >= 0} | {NULL_BLOCK}
        record = IsolationRecord(step=len(self.isolation))
        for c in self.caches:
            after = out[c.output]
            record.foreign_blocks_changed += foreign_changes(self.pools[c.input], after, owned)
            self.pools[c.input] = after
        record.foreign_blocks_changed = sorted(set(record.foreign_blocks_changed))
        self.isolation.append(record)
        for row in rows:
            manager.append(row.seq, row.num_valid)
        return out["logits"][:, -1]

    def release(self, seq: Hashable) -> None:
        self.manager.free(seq)


def foreign_changes(before: np.ndarray, after: np.ndarray, owned: set[int]) -> list[int]:
    """Blocks (axis 0) outside ``owned`` whose bytes differ between ``before`` and ``after``."""
    differs = (before.view(np.uint8) != after.view(np.uint8)).reshape(before.shape[0], -1).any(axis=1)
    return [int(b) for b in np.nonzero(differs)[0] if int(b) not in owned]
