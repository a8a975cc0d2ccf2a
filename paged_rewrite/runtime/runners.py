"""Run one model step for a batch of sequences, with the cache kept per sequence (original
contiguous exports) or in a shared block pool (paged models).

Both runners take the same rows, feed the model's extra inputs through the same ``ExtraInputs``
policy, keep its non-KV retained states the same way (``states.OtherStates``), and return the
same logits (``kept_logits``), so a driver can run them in lockstep and compare.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from paged_rewrite.runtime.block_manager import NULL_BLOCK, UNALLOCATED, BlockManager
from paged_rewrite.runtime.extra_inputs import RUNNER_INPUTS, ExtraInputs, Phase, infer_phase
from paged_rewrite.runtime.sessions import open_session
from paged_rewrite.runtime.states import RETAINED, CacheIO, OtherStates, SlotMap, cache_io, retained_state_io

__all__ = [
    "RETAINED",
    "CacheIO",
    "ContiguousRunner",
    "IsolationRecord",
    "PagedRunner",
    "Row",
    "cache_io",
    "foreign_changes",
    "kept_logits",
    "unexpected_writes",
]

DEFAULT_FULL_BATCH_SIZE = 4


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


def kept_logits(out: Mapping[str, np.ndarray]) -> np.ndarray:
    """The logits a step returns: ``[B, vocab]`` when the model keeps one position per row (the
    last valid token, the normal case), ``[B, n, vocab]`` when it keeps ``n > 1`` (a TLM decode
    step with ``num_logits_to_keep`` of ``n`` rows)."""
    logits = out["logits"]
    return logits[:, -1] if logits.ndim == 3 and logits.shape[1] == 1 else logits


class ModelRunError(RuntimeError):
    """onnxruntime refused a call of one model; ``reason`` is the first line of its message."""

    def __init__(self, model_path: str, error: Exception) -> None:
        lines = str(error).strip().splitlines()
        self.model_path = model_path
        self.reason = lines[0] if lines else type(error).__name__
        super().__init__(f"{model_path}: {self.reason}")


class _Runner:
    def __init__(
        self,
        model_path: str | os.PathLike[str],
        patch_sentinels: bool,
        dims: Mapping[str, int],
        extra_inputs: ExtraInputs | None,
    ) -> None:
        self.model_path = os.fspath(model_path)
        self.session = open_session(model_path, patch_sentinels=patch_sentinels)
        self.caches = cache_io(self.session)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.dims = dict(dims)
        self.slots: SlotMap | None = None
        if "batch_index" in self.input_names:
            self.slots = SlotMap(self.dims.setdefault("full_batch_size", DEFAULT_FULL_BATCH_SIZE))
        batch_dim = inputs["input_ids"].shape[0] if "input_ids" in inputs else "batch_size"
        self.states = OtherStates(retained_state_io(self.session), batch_dim, self.dims)
        kept = {c.input for c in self.caches} | {s.input for s in self.states.per_row + self.states.shared_io}
        self.extra_names = sorted(self.input_names - kept - RUNNER_INPUTS)
        self.extra_inputs = extra_inputs or ExtraInputs()
        self.extra_inputs.check(self.extra_names, os.fspath(model_path))

    @property
    def context_len(self) -> int:
        raise NotImplementedError

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as exc:  # onnxruntime's own error types: name the model that failed
            raise ModelRunError(self.model_path, exc) from exc
        return dict(zip(self.output_names, outputs, strict=True))

    def _inputs(self, rows: Sequence[Row], phase: Phase | None) -> dict[str, np.ndarray]:
        """Everything but the KV caches: tokens, the CB slots, extra inputs, other states."""
        seqs = [row.seq for row in rows]
        feeds = {
            "input_ids": np.stack([r.input_ids for r in rows]).astype(np.int64),
            "position_ids": np.stack([r.position_ids for r in rows]).astype(np.int64),
        }
        if self.slots is not None:
            feeds["batch_index"] = self.slots.batch_index(seqs)
        phase = phase or infer_phase(rows)
        feeds.update(self.extra_inputs.feeds(self.extra_names, rows, phase, self.context_len))
        feeds.update(self.states.feeds(seqs))
        return feeds

    def _release_state(self, seq: Hashable) -> None:
        self.states.release(seq)
        if self.slots is not None:
            self.slots.release(seq)


class ContiguousRunner(_Runner):
    """An original export, its INT32_MAX sentinels patched for onnxruntime.

    Plain exports: each sequence owns a ``[1, heads, ctx_len, head_dim]`` cache; a step stacks
    the rows' caches into one batch and splits the retained state back. Continuous-batching
    exports (a ``batch_index`` input): one shared ``[full_batch_size, ...]`` cache, each sequence
    in its own slot (``slots``, else the lowest free one), idle rows on the remaining slots.
    ``dims`` gives the symbolic dims (``ctx_len``, ``sliding_window``, ``full_batch_size``, and
    those of non-KV states such as ``vision_size``).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        dims: Mapping[str, int],
        slots: Mapping[Hashable, int] | None = None,
        extra_inputs: ExtraInputs | None = None,
    ) -> None:
        super().__init__(model_path, True, dims, extra_inputs)
        self.continuous_batching = self.slots is not None
        if self.slots is not None:
            self.slots.slots.update(slots or {})
            self._shared = {c.input: np.zeros(c.sized(self.dims), c.dtype) for c in self.caches}
        self._cache: dict[Hashable, dict[str, np.ndarray]] = {}

    @property
    def context_len(self) -> int:
        return max(c.sized(self.dims, a0=1)[2] for c in self.caches)

    def step(self, rows: Sequence[Row], phase: Phase | None = None) -> np.ndarray:
        feeds = self._inputs(rows, phase)
        seqs = [row.seq for row in rows]
        if self.continuous_batching:
            out = self._run({**feeds, **self._shared})
            self._shared = {c.input: out[c.output] for c in self.caches}
        else:
            caches = [self._own_cache(seq) for seq in seqs]
            for c in self.caches:
                feeds[c.input] = np.concatenate([cache[c.input] for cache in caches])
            out = self._run(feeds)
            for index, cache in enumerate(caches):
                for c in self.caches:
                    cache[c.input] = out[c.output][index : index + 1]
        self.states.keep(seqs, out)
        return kept_logits(out)

    def _own_cache(self, seq: Hashable | None) -> dict[str, np.ndarray]:
        fresh = {c.input: np.zeros(c.sized(self.dims, a0=1), c.dtype) for c in self.caches}
        return fresh if seq is None else self._cache.setdefault(seq, fresh)

    def kv_view(self, seq: Hashable) -> dict[str, np.ndarray]:
        """``seq``'s caches as the model holds them, ``[1, heads, length, head_dim]`` each."""
        if self.slots is not None:
            slot = self.slots.slot_for(seq)
            return {c.input: self._shared[c.input][slot : slot + 1] for c in self.caches}
        return dict(self._cache[seq])

    def release(self, seq: Hashable) -> None:
        self._cache.pop(seq, None)
        self._release_state(seq)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """``child`` continues from a copy of ``parent``'s cache (a contiguous cache cannot share)."""
        if self.slots is not None:
            source, target = self.slots.slot_for(parent), self.slots.slot_for(child)
            for c in self.caches:
                self._shared[c.input][target] = self._shared[c.input][source]
        else:
            self._cache[child] = {name: cache.copy() for name, cache in self._cache[parent].items()}
        self.states.fork(parent, child)


@dataclass
class IsolationRecord:
    """Blocks that changed during one step although no row of that step owned them."""

    step: int
    foreign_blocks_changed: list[int] = field(default_factory=list)


class PagedRunner(_Runner):
    """A paged model: one block pool per cache tensor, shared by all sequences, addressed through
    ``block_table`` / ``slot_id`` from a ``BlockManager``. Every step also checks isolation, slot
    by slot: outside block 0, a pool slot may change only if some row of the step wrote that
    logical position through its own table row, or lies in that row's ring columns; any other
    change is recorded with its block, so a row writing into another row's block is caught even
    within one batch. ``dims`` and ``extra_inputs`` serve the non-KV inputs, as for
    ``ContiguousRunner``."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        manager: BlockManager,
        num_kv_blocks: int,
        dims: Mapping[str, int] | None = None,
        extra_inputs: ExtraInputs | None = None,
    ) -> None:
        super().__init__(model_path, False, dims or {}, extra_inputs)
        self.manager = manager
        self.num_kv_blocks = num_kv_blocks
        self.pools = {
            c.input: np.zeros(c.sized({}, a0=manager.num_blocks, a2=manager.kv_block_size), c.dtype)
            for c in self.caches
        }
        self.isolation: list[IsolationRecord] = []
        self.blocks_in_use: list[int] = []  # distinct pool blocks held after each step

    @property
    def context_len(self) -> int:
        return self.num_kv_blocks * self.manager.kv_block_size

    def step(self, rows: Sequence[Row], phase: Phase | None = None) -> np.ndarray:
        manager = self.manager
        for row in rows:
            valid = row.position_ids[row.position_ids >= 0]
            if row.seq is not None:
                manager.prepare_write(row.seq, int(valid.max()) + 1 if valid.size else 0)
        for source, copy in manager.take_copies():  # copy on write of shared blocks
            for pool in self.pools.values():
                pool[copy] = pool[source]
        seqs = [row.seq for row in rows]
        feeds = self._inputs(rows, phase)
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
        self.states.keep(seqs, out)
        for row in rows:
            if row.seq is not None:
                manager.append(row.seq, row.num_valid)
        self.blocks_in_use.append(manager.num_used_blocks)
        return kept_logits(out)

    def _expected_writes(self, rows: Sequence[Row], table: np.ndarray) -> set[tuple[int, int]]:
        """``(block, offset)`` of every position the rows write, by the contract's address rule,
        and every slot of their ring columns. A ring's slots are rewritten in an order the model
        chooses (ring order ``p % window``, or, in a prefill-only graph, the last ``window``
        tokens in order), so only the row that owns a ring block may change it, anywhere."""
        size = self.manager.kv_block_size
        allowed: set[tuple[int, int]] = set()
        for index, row in enumerate(rows):
            if row.seq is None:
                continue  # an idle row writes nothing but the null block
            for position in (int(p) for p in row.position_ids if 0 <= p < table.shape[1] * size):
                block = int(table[index, position // size])
                if block > NULL_BLOCK:
                    allowed.add((block, position % size))
            for ring in self.manager.ring_lengths:
                for block in (int(b) for b in table[index, : -(-ring // size)] if b > NULL_BLOCK):
                    allowed.update((block, offset) for offset in range(size))
        return allowed

    def kv_view(self, seq: Hashable, lengths: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        """``seq``'s caches read back through its table: ``[1, heads, length, head_dim]`` each, the
        logical view (logical position ``p`` at index ``p``; a ring's slot ``p % window`` at index
        ``p % window``, with ``lengths[cache] = window``). ``lengths`` default to the table's
        context. Unallocated columns read as zeros."""
        size = self.manager.kv_block_size
        row = self.manager.block_table([seq], self.num_kv_blocks)[0]
        views = {}
        for c in self.caches:
            length = (lengths or {}).get(c.input, self.context_len)
            pool = self.pools[c.input]
            blocks = [
                pool[b] if b != UNALLOCATED else np.zeros_like(pool[NULL_BLOCK])
                for b in row[: -(-length // size)]
            ]
            views[c.input] = np.concatenate(blocks, axis=1)[None, :, :length]
        return views

    def release(self, seq: Hashable) -> None:
        self.manager.free(seq)
        self._release_state(seq)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """``child`` shares ``parent``'s blocks (prefix sharing, copy on write)."""
        self.manager.fork(parent, child)
        self.states.fork(parent, child)


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
