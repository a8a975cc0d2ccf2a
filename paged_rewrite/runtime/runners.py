"""Run one model step for a batch of sequences, with the cache kept per sequence (original
contiguous exports) or in a shared block pool (paged models).

Both runners take the same rows and return the logits of each row's last valid token, so a
driver can run them in lockstep and compare.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from paged_rewrite.runtime.block_manager import NULL_BLOCK, BlockManager
from paged_rewrite.runtime.sessions import open_session

RETAINED = "_RetainedState"


@dataclass(frozen=True)
class Row:
    """One batch row of a step: ``input_ids`` and ``position_ids`` of shape ``[S]`` (-1 = padding).

    ``seq`` None is an idle row (all padding): it owns no cache and its logits are meaningless.
    """

    seq: Hashable | None
    input_ids: np.ndarray
    position_ids: np.ndarray

    @classmethod
    def idle(cls, length: int) -> Row:
        return cls(None, np.zeros(length, np.int64), np.full(length, -1, np.int64))

    @property
    def num_valid(self) -> int:
        return int((self.position_ids >= 0).sum())


@dataclass(frozen=True)
class CacheIO:
    """A cache input of a model, its retained output, and its shape (dims as the model names them)."""

    input: str
    output: str
    shape: tuple[int | str, ...]
    dtype: type[np.floating] = np.float32

    def sized(self, dims: Mapping[str, int], **axes: int) -> tuple[int, ...]:
        """The concrete shape: symbolic dims from ``dims``, axes overridden as ``a0=..``, ``a2=..``."""
        shape = list(self.shape)
        for key, value in axes.items():
            shape[int(key[1:])] = value
        missing = [d for d in shape if isinstance(d, str) and d not in dims]
        if missing:
            raise ValueError(f"cache {self.input!r} needs a value for dim {missing[0]!r}")
        return tuple(d if isinstance(d, int) else dims[d] for d in shape)


def cache_io(session: object) -> list[CacheIO]:
    """The cache inputs of an onnxruntime session: every input with a ``<name>_RetainedState`` output."""
    outputs = {o.name for o in session.get_outputs()}  # type: ignore[attr-defined]
    caches = []
    for value in session.get_inputs():  # type: ignore[attr-defined]
        if value.name + RETAINED in outputs:
            dtype = np.float16 if "float16" in value.type else np.float32
            caches.append(CacheIO(value.name, value.name + RETAINED, tuple(value.shape), dtype))
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
    """An original export, its INT32_MAX sentinels patched for onnxruntime.

    Plain exports: each sequence owns a ``[1, heads, ctx_len, head_dim]`` cache; a step stacks
    the rows' caches into one batch and splits the retained state back. Continuous-batching
    exports (a ``batch_index`` input): one shared ``[full_batch_size, ...]`` cache, each sequence
    in its own slot (``slots``, else the lowest free one), idle rows on the remaining slots.
    ``dims`` gives the symbolic cache dims (``ctx_len``, ``sliding_window``, ``full_batch_size``).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        dims: Mapping[str, int],
        slots: Mapping[Hashable, int] | None = None,
    ) -> None:
        super().__init__(model_path, patch_sentinels=True)
        self.dims = dict(dims)
        self.continuous_batching = "batch_index" in self.input_names
        self.slots: dict[Hashable, int] = dict(slots or {})
        self._cache: dict[Hashable, dict[str, np.ndarray]] = {}
        if self.continuous_batching:
            self.dims.setdefault("full_batch_size", 4)
            self._shared = {c.input: np.zeros(c.sized(self.dims), c.dtype) for c in self.caches}

    def step(self, rows: Sequence[Row]) -> np.ndarray:
        feeds = self._tokens(rows)
        if self.continuous_batching:
            feeds["batch_index"] = np.array([[s] for s in self._slots_of(rows)], dtype=np.int64)
            out = self._run({**feeds, **self._shared})
            self._shared = {c.input: out[c.output] for c in self.caches}
            return out["logits"][:, -1]
        caches = [self._own_cache(row.seq) for row in rows]
        for c in self.caches:
            feeds[c.input] = np.concatenate([cache[c.input] for cache in caches])
        out = self._run(feeds)
        for index, cache in enumerate(caches):
            for c in self.caches:
                cache[c.input] = out[c.output][index : index + 1]
        return out["logits"][:, -1]

    def _own_cache(self, seq: Hashable | None) -> dict[str, np.ndarray]:
        fresh = {c.input: np.zeros(c.sized(self.dims, a0=1), c.dtype) for c in self.caches}
        return fresh if seq is None else self._cache.setdefault(seq, fresh)

    def _slot_for(self, seq: Hashable) -> int:
        """The cache row of ``seq``: given, or the lowest free one on first sight."""
        if seq not in self.slots:
            taken = set(self.slots.values())
            self.slots[seq] = min(s for s in range(self.dims["full_batch_size"]) if s not in taken)
        return self.slots[seq]

    def _slots_of(self, rows: Sequence[Row]) -> list[int]:
        busy = {self._slot_for(row.seq) for row in rows if row.seq is not None}
        spare = iter(s for s in range(self.dims["full_batch_size"]) if s not in busy)
        return [self.slots[row.seq] if row.seq is not None else next(spare) for row in rows]

    def release(self, seq: Hashable) -> None:
        self._cache.pop(seq, None)
        self.slots.pop(seq, None)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """``child`` continues from a copy of ``parent``'s cache (a contiguous cache cannot share)."""
        if self.continuous_batching:
            source, target = self._slot_for(parent), self._slot_for(child)
            for c in self.caches:
                self._shared[c.input][target] = self._shared[c.input][source]
        else:
            self._cache[child] = {name: cache.copy() for name, cache in self._cache[parent].items()}


@dataclass
class IsolationRecord:
    """Blocks that changed during one step although no row of that step owned them."""

    step: int
    foreign_blocks_changed: list[int] = field(default_factory=list)


class PagedRunner(_Runner):
    """A paged model: one block pool per cache tensor, shared by all sequences, addressed through
    ``block_table`` / ``slot_id`` from a ``BlockManager``. Every step also checks isolation, slot
    by slot: outside block 0, a pool slot may change only if some row of the step wrote that
    logical position (or ring slot) through its own table row; any other change is recorded with
    its block, so a row writing into another row's block is caught even within one batch."""

    def __init__(self, model_path: str | os.PathLike[str], manager: BlockManager, num_kv_blocks: int) -> None:
        super().__init__(model_path, patch_sentinels=False)
        self.manager = manager
        self.num_kv_blocks = num_kv_blocks
        self.pools = {
            c.input: np.zeros(c.sized({}, a0=manager.num_blocks, a2=manager.kv_block_size), c.dtype)
            for c in self.caches
        }
        self.isolation: list[IsolationRecord] = []
        self.blocks_in_use: list[int] = []  # distinct pool blocks held after each step

    def step(self, rows: Sequence[Row]) -> np.ndarray:
        manager = self.manager
        for row in rows:
            valid = row.position_ids[row.position_ids >= 0]
            if row.seq is not None:
                manager.prepare_write(row.seq, int(valid.max()) + 1 if valid.size else 0)
        for source, copy in manager.take_copies():  # copy on write of shared blocks
            for pool in self.pools.values():
                pool[copy] = pool[source]
        seqs = [row.seq for row in rows]
        feeds = self._tokens(rows)
        feeds["block_table"] = manager.block_table(seqs, self.num_kv_blocks)
        feeds["slot_id"] = manager.slot_id(seqs)
        feeds.update(self.pools)
        out = self._run(feeds)
        allowed = self._expected_writes(rows, feeds["block_table"])
        record = IsolationRecord(step=len(self.isolation))
        for c in self.caches:
            after = out[c.output]
            record.foreign_blocks_changed += unexpected_writes(self.pools[c.input], after, allowed)
            self.pools[c.input] = after
        record.foreign_blocks_changed = sorted(set(record.foreign_blocks_changed))
        self.isolation.append(record)
        for row in rows:
            if row.seq is not None:
                manager.append(row.seq, row.num_valid)
        self.blocks_in_use.append(manager.num_used_blocks)
        return out["logits"][:, -1]

    def _expected_writes(self, rows: Sequence[Row], table: np.ndarray) -> set[tuple[int, int]]:
        """``(block, offset)`` of every position the rows write, by the contract's address rule,
        for full-context caches and for each ring length the block manager knows."""
        size = self.manager.kv_block_size
        allowed: set[tuple[int, int]] = set()
        for index, row in enumerate(rows):
            for position in (int(p) for p in row.position_ids if 0 <= p < table.shape[1] * size):
                for slot in {position, *(position % ring for ring in self.manager.ring_lengths)}:
                    block = int(table[index, slot // size])
                    if block > NULL_BLOCK:
                        allowed.add((block, slot % size))
        return allowed

    def release(self, seq: Hashable) -> None:
        self.manager.free(seq)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """``child`` shares ``parent``'s blocks (prefix sharing, copy on write)."""
        self.manager.fork(parent, child)


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
