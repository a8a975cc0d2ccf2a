"""Run one model step for a batch of sequences, with the cache kept per sequence (original
contiguous exports: ``contiguous_runner``, re-exported here) or in a shared block pool (paged
models: ``PagedRunner``).

Both runners take the same rows, feed the model's extra inputs through the same ``ExtraInputs``
policy, keep its non-KV retained states the same way (``states.OtherStates``), and return the
same logits (``kept_logits``), so a driver can run them in lockstep and compare.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from paged_rewrite.buckets import columns_for, default_ladder, pick_width
from paged_rewrite.errors import UnsupportedPatternError
from paged_rewrite.runtime.block_manager import NULL_BLOCK, UNALLOCATED, BlockManager
from paged_rewrite.runtime.contiguous_runner import ContiguousRunner
from paged_rewrite.runtime.extra_inputs import ExtraInputs, Phase
from paged_rewrite.runtime.geometry import PagedGeometry
from paged_rewrite.runtime.isolation import (
    IsolationRecord,
    TableWidthRecord,
    expected_writes,
    foreign_changes,
    unexpected_writes,
)
from paged_rewrite.runtime.runner_base import (
    DEFAULT_FULL_BATCH_SIZE,
    ModelRunError,
    Row,
    StepRunner,
    kept_logits,
)
from paged_rewrite.runtime.states import RETAINED, CacheIO, cache_io

__all__ = [
    "DEFAULT_FULL_BATCH_SIZE",
    "RETAINED",
    "CacheIO",
    "ContiguousRunner",
    "IsolationRecord",
    "ModelRunError",
    "PagedRunner",
    "Row",
    "TableWidthRecord",
    "agreed_prefix_hit",
    "cache_io",
    "foreign_changes",
    "kept_logits",
    "unexpected_writes",
]


class PagedRunner(StepRunner):
    """A paged model: one block pool per cache tensor, shared by all sequences, addressed through
    ``block_table`` / ``slot_id`` from a ``BlockManager``.

    **Table width.** ``num_kv_blocks`` is the widest table (the full context). Per step the
    runner passes the narrowest table of its buckets that covers the longest row of the batch
    (positions already written and those the step writes): the model then attends over that
    many positions only, where its context length follows the cache shape. The buckets are
    ``ctx_buckets`` (tokens), by default the model's own (its metadata, as the rewrite wrote
    them; a static table width allows only itself). ``full_width=True`` always passes the full
    table. Each step's width is recorded in ``table_widths``, with the rows a too-narrow table
    cut short (buckets that do not reach a row's context).

    **Isolation.** Every step checks, slot by slot: outside block 0, a pool slot may change only
    if some row of the step wrote that logical position through its own table row (in a ring
    group's table, ring slot ``p % W``), or lies in that row's ring columns of a ring the model
    orders itself (a shared table's, a prefill-only graph's); any other change is recorded with its block, so a row writing into
    another row's block is caught even within one batch (``check_isolation=False`` skips it: it
    compares every pool byte). ``in_place=True`` updates the pools in place (``in_place.py``).

    **Prefix caching** (a ``BlockManager`` with ``prefix_caching=True``): ``start(seq, prompt)``
    takes the cached full blocks the prompt starts with and returns the first position left to
    prefill; ``cache_prompt(seq, prompt)`` offers the full blocks of a prefilled prompt to later
    requests. Refused for models whose cache content is not a function of the tokens alone
    (ring layers, non-KV retained states, LoRA ids). ``dims`` and ``extra_inputs`` serve the
    non-KV inputs, as for ``ContiguousRunner``.

    **Window groups.** A model whose window layers have tables of their own
    (``block_table_w<W>``, see ``PagedGeometry.groups``: rings, or windows over logical positions)
    gets one ``BlockManager(window=W)`` (``logical=True`` for the latter) per window, with its own
    free list and pools of its own size: ``window_managers`` by table name, by default one as large
    as ``manager`` (equal capacity; pass smaller ones to save memory). Each step passes every
    table; each group's copies, isolation and pools stay its own. With prefix caching, every
    group takes part (``prefix_hit_blocks``)."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        manager: BlockManager,
        num_kv_blocks: int,
        dims: Mapping[str, int] | None = None,
        extra_inputs: ExtraInputs | None = None,
        ctx_buckets: Sequence[int] | None = None,
        full_width: bool = False,
        check_isolation: bool = True,
        in_place: bool = False,
        window_managers: Mapping[str, BlockManager] | None = None,
    ) -> None:
        super().__init__(model_path, False, dims or {}, extra_inputs, in_place)
        self.geometry = PagedGeometry.of(model_path)
        self.check_isolation = check_isolation
        self.manager = manager
        _refuse_foreign_rings(self.geometry, manager)
        self.managers = {"block_table": manager, **_window_managers(self.geometry, manager, window_managers)}
        for table, group in self.managers.items():
            static = self.geometry.pool_blocks.get(table)
            if static is not None and group.num_blocks != static:
                raise ValueError(
                    f"{model_path}: the pools of {table} hold {static} blocks (a static pool, --num-blocks); "
                    f"its BlockManager has {group.num_blocks}"
                )
        self.table_of = {c.input: self.geometry.table_of(c.input) for c in self.caches}
        self.num_kv_blocks = num_kv_blocks
        self.pools = {
            c.input: np.zeros(
                c.sized({}, a0=self.managers[self.table_of[c.input]].num_blocks, a2=manager.kv_block_size),
                c.dtype,
            )
            for c in self.caches
        }
        self.widths = [num_kv_blocks] if full_width else self._bucket_widths(ctx_buckets)
        self.isolation: list[IsolationRecord] = []
        self.table_widths: list[TableWidthRecord] = []
        self.blocks_in_use: list[int] = []  # distinct pool blocks held after each step
        self._prompts: dict[Hashable, np.ndarray] = {}  # with ring groups and prefix caching
        if manager.prefix_caching:
            self._refuse_prefix_caching()

    @property
    def context_len(self) -> int:
        return self.num_kv_blocks * self.manager.kv_block_size

    def _bucket_widths(self, ctx_buckets: Sequence[int] | None) -> list[int]:
        """Table widths (columns) this runner may pass, ascending. The model's own buckets and
        the default ladder end at the full width; ``ctx_buckets`` given are taken as they are
        (capped at ``num_kv_blocks``): a runtime configured with buckets that stop short of a
        row's context cuts it, which ``table_widths`` records."""
        geometry = self.geometry
        if geometry.num_kv_blocks is not None:
            return [geometry.num_kv_blocks]  # a static width: the model was compiled for this one only
        size = self.manager.kv_block_size
        if ctx_buckets is None:
            if not geometry.ctx_buckets and geometry.write_only:
                return [self.num_kv_blocks]  # a prefill-only graph: see add_paged_inputs._buckets
            ctx_buckets = [
                *(geometry.ctx_buckets or default_ladder(self.context_len, size)),
                self.context_len,
            ]
        return sorted({min(columns_for(b, size), self.num_kv_blocks) for b in ctx_buckets})

    def table_width(self, needed_tokens: int) -> int:
        """The narrowest bucket's width holding ``needed_tokens`` positions (the widest if none)."""
        return pick_width(needed_tokens, self.widths, self.manager.kv_block_size)

    def step(self, rows: Sequence[Row], phase: Phase | None = None) -> np.ndarray:
        manager = self.manager
        needed: dict[Hashable, int] = {}
        for row in rows:
            valid = row.position_ids[row.position_ids >= 0]
            if row.seq is not None:
                end = int(valid.max()) + 1 if valid.size else 0
                for group in self.managers.values():
                    group.prepare_write(row.seq, end)
                needed[row.seq] = max(end, manager.length_of(row.seq))
        for table, group in self.managers.items():
            for source, copy in group.take_copies():  # copy on write of shared blocks, in its pools
                for name, pool in self.pools.items():
                    if self.table_of[name] == table:
                        pool[copy] = pool[source]
        seqs = [row.seq for row in rows]
        width = self.table_width(max(needed.values(), default=1))
        feeds = self._inputs(rows, phase)
        feeds["block_table"] = manager.block_table(seqs, width, truncate=True)
        for table, group in self.managers.items():
            if table != "block_table":  # a ring's own width; a logical window's spans the context too
                feeds[table] = group.block_table(seqs, group.max_blocks_per_sequence or width, truncate=True)
        feeds["slot_id"] = manager.slot_id(seqs)
        feeds.update(self.pools)
        before = (
            {n: p.copy() for n, p in self.pools.items()}
            if self.in_place and self.check_isolation
            else self.pools
        )
        out = self._run(feeds)
        self._check(rows, {t: feeds[t] for t in self.managers}, out, needed, before)
        self.states.keep(seqs, out)
        for row in rows:
            if row.seq is not None:
                for group in self.managers.values():
                    group.append(row.seq, row.num_valid)
                if row.seq in self._prompts:  # name ring blocks before the ring's next lap rewrites them
                    for group in self._window_groups():
                        group.cache_prompt(row.seq, self._prompts[row.seq])
        self.blocks_in_use.append(manager.num_used_blocks)
        return kept_logits(out)

    def _check(
        self,
        rows: Sequence[Row],
        tables: Mapping[str, np.ndarray],
        out: dict[str, np.ndarray],
        needed: Mapping[Hashable, int],
        before: Mapping[str, np.ndarray],
    ) -> None:
        """Record the step's isolation (unless ``check_isolation`` is off: it compares every pool
        byte, which a serving loop should not pay for) and table width; keep the new pools. Each
        pool is checked against the table of its own group."""
        size = self.manager.kv_block_size
        allowed = {
            table: self._expected_writes(rows, tables[table], group) if self.check_isolation else set()
            for table, group in self.managers.items()
        }
        record = IsolationRecord(step=len(self.isolation))
        for c in self.caches:
            after = out[c.output]
            if self.check_isolation:
                record.foreign_blocks_changed += unexpected_writes(
                    before[c.input], after, allowed[self.table_of[c.input]]
                )
            self.pools[c.input] = after
        record.foreign_blocks_changed = sorted(set(record.foreign_blocks_changed))
        self.isolation.append(record)
        columns = tables["block_table"].shape[1]
        cut = tuple(seq for seq, tokens in needed.items() if tokens > columns * size)
        needed_columns = columns_for(max(needed.values(), default=0), size)
        self.table_widths.append(TableWidthRecord(record.step, columns, needed_columns, cut))

    def _expected_writes(
        self, rows: Sequence[Row], table: np.ndarray, group: BlockManager
    ) -> set[tuple[int, int]]:
        """The slots a group's pools may change in this step: each row's positions through its
        own row of the group's table (ring slot ``p % W`` in a ring group's table). A prefill-only
        graph's ring holds the last ``W`` tokens in order, not at ``p % W``: its rows may change
        any slot of their ring blocks."""
        size = self.manager.kv_block_size
        ring = group.window is not None and not group.logical
        if ring and not self.geometry.write_only:
            return expected_writes(rows, table, size, (), window=group.window)
        return expected_writes(rows, table, size, group.ring_lengths)

    def start(self, seq: Hashable, prompt: np.ndarray) -> int:
        """Begin ``seq``: with prefix caching, take the cached blocks its prompt starts with, in
        every table group (a hit every group agrees on: ``prefix_hit_blocks``). Returns the first
        position to prefill (0 without a cache hit)."""
        if self.manager.prefix_caching:
            hit = self.prefix_hit_blocks(prompt)
            if self._window_groups():
                self._prompts[seq] = prompt  # ring blocks are named as the prompt fills them
            starts = {group.match_prefix(seq, prompt, hit) for group in self.managers.values()}
            if len(starts) != 1:
                raise RuntimeError(f"prefix hit of {hit} blocks: the groups start at {sorted(starts)}")
            return starts.pop()
        for group in self.managers.values():
            group.ensure_capacity(seq, 0)  # known to the manager, holding nothing yet
        return 0

    def prefix_hit_blocks(self, prompt: np.ndarray) -> int:
        """Blocks of positions a prefix hit on ``prompt`` covers: the longest every group agrees
        on (``agreed_prefix_hit``)."""
        return agreed_prefix_hit(self.manager, self._window_groups(), prompt)

    def cache_prompt(self, seq: Hashable, prompt: np.ndarray) -> None:
        """``seq`` has prefilled ``prompt``: offer its full blocks to later requests."""
        if self.manager.prefix_caching:
            for group in self.managers.values():
                group.cache_prompt(seq, prompt)

    def _window_groups(self) -> list[BlockManager]:
        return [group for table, group in self.managers.items() if table != "block_table"]

    def _refuse_prefix_caching(self) -> None:
        """A cached block is shared by content: it must hold nothing but its tokens' K/V."""
        reason = None
        windows = self._window_groups()
        if self.manager.ring_lengths or self.geometry.ring_lengths:
            reason = "its ring-buffer layers overwrite the first table columns as a sequence grows"
        elif any(not group.prefix_caching for group in windows):
            reason = (
                "a window group's manager has no prefix cache (its ring length must be a multiple "
                "of kv_block_size, and a logical-position window frees its blocks)"
            )
        elif self.states.per_row or self.states.shared_io:
            reason = "its non-KV retained states (e.g. vision embeddings) shape the KV beyond the tokens"
        elif "lora_ids" in self.extra_names:
            reason = "the KV depends on each row's LoRA adapter, not on the tokens alone"
        if reason:
            raise UnsupportedPatternError(f"prefix caching is not supported for this model: {reason}")

    def kv_view(self, seq: Hashable, lengths: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
        """``seq``'s caches read back through its table: ``[1, heads, length, head_dim]`` each, the
        logical view (logical position ``p`` at index ``p``; a ring's slot ``p % window`` at index
        ``p % window``, with ``lengths[cache] = window``). ``lengths`` default to the table's
        context. Unallocated columns, and columns beyond a ring's table (a full-length cache
        written as a ring), read as zeros, as the model reads them."""
        size = self.manager.kv_block_size
        views = {}
        for c in self.caches:
            group = self.managers[self.table_of[c.input]]
            row = group.block_table([seq], group.max_blocks_per_sequence or self.num_kv_blocks)[0]
            length = (lengths or {}).get(c.input, self.context_len)
            pool = self.pools[c.input]
            columns = [*row, *[UNALLOCATED] * max(0, -(-length // size) - len(row))]
            blocks = [
                pool[b] if b != UNALLOCATED else np.zeros_like(pool[NULL_BLOCK])
                for b in columns[: -(-length // size)]
            ]
            views[c.input] = np.concatenate(blocks, axis=1)[None, :, :length]
        return views

    def release(self, seq: Hashable) -> None:
        self._prompts.pop(seq, None)
        for group in self.managers.values():
            group.free(seq)
        self._release_state(seq)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """``child`` shares ``parent``'s blocks in every group (copy on write)."""
        for group in self.managers.values():
            group.fork(parent, child)
        self.states.fork(parent, child)


def agreed_prefix_hit(full: BlockManager, windows: Sequence[BlockManager], prompt: np.ndarray) -> int:
    """The longest hit ``k`` (blocks of positions) that the full group's cached run covers and
    every ring group holds its window's blocks for (``prefix_blocks(prompt, k) == k`` in each).
    A group's answer below ``k`` may not suit another, so the cut is repeated until no group
    lowers it: every common hit is at most each group's answer, so the fixed point is the
    longest."""
    hit = full.prefix_blocks(prompt)
    while True:
        lowest = min((group.prefix_blocks(prompt, hit) for group in windows), default=hit)
        if lowest == hit:
            return hit
        hit = lowest


def _refuse_foreign_rings(geometry: PagedGeometry, manager: BlockManager) -> None:
    """A ring with a table of its own (``block_table_w<W>``) is no ring of ``block_table``: its
    length in the full manager's ``ring_lengths`` would copy and allow writes in the full
    table's first columns for nothing."""
    own = {g.window for g in geometry.window_groups if g.window and not g.logical} - set(
        geometry.ring_lengths
    )
    foreign = sorted(own & set(manager.ring_lengths))
    if foreign:
        raise ValueError(
            f"ring_lengths {foreign}: the model's ring of {foreign[0]} positions has its own table "
            f"(block_table_w{foreign[0]}, managed by window_managers); the full table's manager "
            f"takes only rings of block_table: PagedGeometry.ring_lengths = {geometry.ring_lengths}"
        )


def _window_managers(
    geometry: PagedGeometry, manager: BlockManager, given: Mapping[str, BlockManager] | None
) -> dict[str, BlockManager]:
    """A manager per window table of the model: the one given, else one as large as ``manager``
    (a ring group's, or a logical-position window's that frees blocks behind the window)."""
    given = dict(given or {})
    unknown = sorted(set(given) - {g.table for g in geometry.window_groups})
    if unknown:
        raise ValueError(f"window_managers: the model has no table {unknown[0]!r}")
    managers = {}
    for group in geometry.window_groups:
        size = manager.kv_block_size
        caching = manager.prefix_caching and not group.logical and (group.window or 0) % size == 0
        found = given.get(group.table) or BlockManager(
            manager.num_blocks, size, window=group.window, prefix_caching=caching, logical=group.logical
        )
        if (found.window, found.logical, found.kv_block_size) != (group.window, group.logical, size):
            raise ValueError(
                f"window_managers[{group.table!r}] must be a BlockManager(window={group.window}, "
                f"logical={group.logical}) with kv_block_size {size}"
            )
        managers[group.table] = found
    return managers
