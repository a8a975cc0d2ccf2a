"""A continuous-batching server loop over one runner: requests arrive, are admitted while the KV
budget allows, prefill in chunks, decode together, and leave.

The same loop drives a paged model (``PagedRunner``; the budget is pool blocks, with prefix
caching if its ``BlockManager`` has it) and an original continuous-batching export
(``ContiguousRunner``; the budget is its ``full_batch_size`` cache rows), so the two can be
compared on one workload. Time is virtual: the clock advances by the measured wall time of each
model call and jumps to the next arrival when there is nothing to do, so a run measures the
model, not the machine's idle time.

Policy, identical for both: first come first served; admission reserves the KV for the whole
request (prompt + ``max_new_tokens``), so no request is ever preempted; each iteration runs one
prefill chunk (batch 1, oldest admitted first) and then one decode step of every request that has
its first token. The original decodes all its cache rows every step (idle rows included), as
QEfficient's continuous batching does; the paged model decodes only the live rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from paged_rewrite.runtime.block_manager import UNALLOCATED, BlockManager
from paged_rewrite.runtime.driver import chunk_row, greedy_token
from paged_rewrite.runtime.extra_inputs import Phase
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner, Row


@dataclass(frozen=True)
class Request:
    name: str
    prompt: np.ndarray
    max_new_tokens: int
    arrival: float = 0.0  # seconds on the server's clock


@dataclass
class Served:
    """What happened to one request: cache hit, first token and finish times, its tokens."""

    request: Request
    admitted_at: float = math.nan
    cached_tokens: int = 0  # prompt positions taken from the prefix cache
    first_token_at: float = math.nan
    finished_at: float = math.nan
    tokens: list[int] = field(default_factory=list)
    next_position: int = 0  # first prompt position not prefilled yet

    @property
    def ttft(self) -> float:
        return self.first_token_at - self.request.arrival

    @property
    def prefilled(self) -> bool:
        return self.next_position >= len(self.request.prompt)


@dataclass(frozen=True)
class StepRecord:
    """One model call: its kind, when it started, its wall time, the rows carrying a request,
    the longest row's context after the call (tokens) and the table width passed (paged)."""

    kind: Phase
    start: float
    seconds: float
    rows: int
    context: int
    table_columns: int | None


class Server:
    """Serve ``requests`` on ``runner``: ``max_running`` requests at most (the paged model's
    batch limit; the original's is its cache rows), ``chunk_len`` tokens per prefill call.
    ``decode_rows``: pad every decode batch of a paged model to that many rows with idle rows (a
    device compiled for one decode batch size; at most ``max_running`` requests then). The
    original always decodes all its cache rows.

    ``prefill_lengths``: the prefill lengths the model is compiled for besides ``chunk_len``
    (``--prefill-lengths``, or a specializations file with one prefill entry per ``seq_len``; by
    default a paged model's own, from its metadata, those up to ``chunk_len``, which must then be
    one of them). A call is padded
    to the shortest that holds the tokens it prefills, so the last chunk of a prompt, or what a
    prefix-cache hit leaves, does not pay for a full chunk of padding. With none, every call is
    ``chunk_len`` long."""

    def __init__(
        self,
        runner: PagedRunner | ContiguousRunner,
        chunk_len: int,
        max_running: int,
        decode_rows: int | None = None,
        prefill_lengths: Sequence[int] | None = None,
    ) -> None:
        if prefill_lengths is None:
            own = runner.geometry.prefill_lengths if isinstance(runner, PagedRunner) else ()
            if own and chunk_len not in own:  # a device runs only the lengths it was compiled for
                raise ValueError(
                    f"chunk_len {chunk_len} is not one of the model's prefill lengths {list(own)}"
                )
            prefill_lengths = [length for length in own if length <= chunk_len]
        if not all(0 < length <= chunk_len for length in prefill_lengths):
            raise ValueError(
                f"prefill lengths {list(prefill_lengths)} must lie in [1, chunk_len={chunk_len}]"
            )
        self.runner = runner
        self.chunk_len = chunk_len
        self.prefill_lengths = sorted({*prefill_lengths, chunk_len})
        self.paged = isinstance(runner, PagedRunner)
        slots = runner.slots.num_slots if isinstance(runner, ContiguousRunner) and runner.slots else None
        self.max_running = min(max_running, slots) if slots else max_running
        if decode_rows is not None and not self.paged:
            raise ValueError("decode_rows is for a paged model; the original decodes all its cache rows")
        if decode_rows is not None and decode_rows < self.max_running:
            raise ValueError(f"decode_rows {decode_rows} is below max_running {self.max_running}")
        self.decode_rows = slots or decode_rows  # the original decodes every cache row
        self.clock = 0.0
        self.steps: list[StepRecord] = []
        self.peak_running = 0

    def run(self, requests: Sequence[Request]) -> list[Served]:
        waiting = [Served(r) for r in sorted(requests, key=lambda r: r.arrival)]
        done: list[Served] = []
        running: list[Served] = []
        while waiting or running:
            self._admit(waiting, running)
            if not running:  # an idle server: wait for the next arrival, or refuse what never fits
                if waiting[0].request.arrival <= self.clock:
                    raise ValueError(
                        f"request {waiting[0].request.name!r} does not fit the KV budget even alone"
                    )
                self.clock = waiting[0].request.arrival
                continue
            self.peak_running = max(self.peak_running, len(running))
            prefilling = [s for s in running if not s.prefilled]
            decoding = [s for s in running if s.prefilled]
            if prefilling:
                self._prefill_chunk(prefilling[0])
            if decoding:
                self._decode(decoding)
            for served in [s for s in running if len(s.tokens) >= s.request.max_new_tokens]:
                served.finished_at = self.clock
                self.runner.release(served.request.name)
                running.remove(served)
                done.append(served)
        return done

    def _admit(self, waiting: list[Served], running: list[Served]) -> None:
        """First come first served, while the request fits the KV budget in full."""
        while waiting and waiting[0].request.arrival <= self.clock and len(running) < self.max_running:
            served = waiting[0]
            request = served.request
            if isinstance(self.runner, PagedRunner):
                if self._blocks_short(served, running) > 0:
                    return  # not now; nothing was taken, so its cache hits stay where they were in the LRU
                served.cached_tokens = self.runner.start(request.name, request.prompt)
            served.next_position = served.cached_tokens
            served.admitted_at = self.clock
            running.append(waiting.pop(0))

    def _blocks_short(self, candidate: Served, running: list[Served]) -> int:
        """Blocks the candidate (not started yet) lacks once every admitted request's reservation
        is honoured, in the table group where it lacks the most (a window group reserves a ring
        per request; a logical-position window the blocks of its window and a prefill chunk). Its prefix-cache hits count as held; those only the cache holds now stop
        being available once it takes them. Asked without taking anything: a refusal must leave
        the cache's eviction order as it was."""
        assert isinstance(self.runner, PagedRunner)
        shortest = -math.inf
        caching = self.runner.manager.prefix_caching
        hit = self.runner.prefix_hit_blocks(candidate.request.prompt) if caching else 0
        for manager in self.runner.managers.values():

            def blocks_for(served: Served, manager: BlockManager = manager) -> int:
                # a logical-position window holds a prefill chunk's blocks and the window's
                length = len(served.request.prompt) + served.request.max_new_tokens
                return manager.blocks_for(length, self.chunk_len)

            held = [sum(b != UNALLOCATED for b in manager.blocks_of(s.request.name)) for s in running]
            reserved = sum(blocks_for(s) - h for s, h in zip(running, held, strict=True))
            hits = manager.cached_prefix(candidate.request.prompt, hit) if caching else []
            available = manager.num_available_blocks - manager.num_idle_among(hits)
            shortest = max(shortest, blocks_for(candidate) - len(hits) - (available - reserved))
        return int(shortest)

    def _call(self, kind: Phase, rows: list[Row]) -> np.ndarray:
        start = time.perf_counter()
        logits = self.runner.step(rows, kind)
        seconds = time.perf_counter() - start
        contexts = [int(r.position_ids.max()) + 1 for r in rows if r.seq is not None]
        columns = self.runner.table_widths[-1].columns if isinstance(self.runner, PagedRunner) else None
        self.steps.append(StepRecord(kind, self.clock, seconds, len(contexts), max(contexts), columns))
        self.clock += seconds
        return logits

    def _prefill_chunk(self, served: Served) -> None:
        request = served.request
        left = len(request.prompt) - served.next_position
        length = next(n for n in self.prefill_lengths if n >= min(left, self.chunk_len))
        chunk = chunk_row(request.name, request.prompt, served.next_position, length)
        logits = self._call("prefill", [chunk])
        served.next_position = int(chunk.position_ids.max()) + 1
        if served.prefilled:
            served.tokens.append(greedy_token(logits, 0))
            served.first_token_at = self.clock
            if isinstance(self.runner, PagedRunner):
                self.runner.cache_prompt(request.name, request.prompt)

    def _decode(self, decoding: list[Served]) -> None:
        rows = [
            Row(
                s.request.name,
                np.array([s.tokens[-1]]),
                np.array([len(s.request.prompt) + len(s.tokens) - 1]),
            )
            for s in decoding
        ]
        if self.decode_rows:
            rows += [Row.idle(1)] * (self.decode_rows - len(rows))
        logits = self._call("decode", rows)
        for index, served in enumerate(decoding):
            served.tokens.append(greedy_token(logits, index))
