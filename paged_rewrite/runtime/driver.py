"""Drive models through a serving scenario: chunked prefill with ``-1`` padding (sequences
interleaved call by call), then batched decode of all sequences together.

Several runners are driven in lockstep on identical inputs, so their logits can be compared
step by step. Decode inputs are teacher-forced when the scenario gives them, otherwise the
greedy token of the first runner (the reference) is fed to every runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from paged_rewrite.runtime.runners import Row

PAD_ID = 0
PAD_POSITION = -1


class Runner(Protocol):
    def step(self, rows: Sequence[Row]) -> np.ndarray: ...

    def fork(self, parent: str, child: str) -> None: ...


@dataclass(frozen=True)
class SequenceScript:
    """One sequence: its prompt and either its decode inputs (teacher-forced) or a step count."""

    name: str
    prompt: np.ndarray
    num_decode: int
    decode_tokens: np.ndarray | None = None
    fork_of: str | None = None  # shares this sequence's prompt: forked after its prefill


@dataclass(frozen=True)
class Scenario:
    """Sequences, the prefill chunk length, and optionally the row layout of each decode batch
    (sequence names, ``None`` for an idle all-padding row); by default the active sequences."""

    sequences: Sequence[SequenceScript]
    chunk_len: int = 32
    decode_rows: Sequence[str | None] | None = None

    @property
    def max_length(self) -> int:
        return max(len(s.prompt) + s.num_decode for s in self.sequences)


@dataclass
class Step:
    """One model call: its kind, the sequences of its rows, and each runner's logits ``[B, vocab]``."""

    index: int
    kind: str
    sequences: list[str]
    logits: list[np.ndarray]


def prefill_rows(script: SequenceScript, chunk_len: int) -> list[Row]:
    """The prompt cut into chunks of ``chunk_len``, the last one right-padded (id 0, position -1)."""
    rows = []
    for start in range(0, len(script.prompt), chunk_len):
        ids = np.full(chunk_len, PAD_ID, dtype=np.int64)
        pos = np.full(chunk_len, PAD_POSITION, dtype=np.int64)
        chunk = script.prompt[start : start + chunk_len]
        ids[: len(chunk)] = chunk
        pos[: len(chunk)] = np.arange(start, start + len(chunk))
        rows.append(Row(script.name, ids, pos))
    return rows


def drive(runners: Sequence[Runner], scenario: Scenario) -> list[Step]:
    """Run every runner through ``scenario`` in lockstep and collect their logits per step."""
    steps: list[Step] = []

    def call(kind: str, rows: list[Row]) -> Step:
        step = Step(
            len(steps),
            kind,
            [str(r.seq) if r.seq is not None else "" for r in rows],
            [runner.step(rows) for runner in runners],
        )
        steps.append(step)
        return step

    last_token: dict[str, int] = {}
    chunks = {s.name: prefill_rows(s, scenario.chunk_len) for s in scenario.sequences if s.fork_of is None}
    for round_index in range(max(len(c) for c in chunks.values())):
        for script in scenario.sequences:
            if script.name in chunks and round_index < len(chunks[script.name]):
                step = call("prefill", [chunks[script.name][round_index]])
                last_token[script.name] = int(np.argmax(step.logits[0][0]))

    for script in scenario.sequences:
        if script.fork_of is not None:
            parent = next(s for s in scenario.sequences if s.name == script.fork_of)
            assert np.array_equal(parent.prompt, script.prompt), "a fork shares its parent's prompt"
            for runner in runners:
                runner.fork(parent.name, script.name)
            last_token[script.name] = last_token[parent.name]

    by_name = {s.name: s for s in scenario.sequences}
    for t in range(max(s.num_decode for s in scenario.sequences)):
        layout = scenario.decode_rows or [s.name for s in scenario.sequences]
        rows = []
        for name in layout:
            found = by_name.get(name) if name is not None else None
            if found is None or t >= found.num_decode:
                rows.append(Row.idle(1))
                continue
            token = int(found.decode_tokens[t]) if found.decode_tokens is not None else last_token[found.name]
            rows.append(
                Row(found.name, np.array([token], np.int64), np.array([len(found.prompt) + t], np.int64))
            )
        if scenario.decode_rows is None:
            rows = [row for row in rows if row.seq is not None]
        step = call("decode", rows)
        for index, row in enumerate(rows):
            if row.seq is not None:
                last_token[str(row.seq)] = int(np.argmax(step.logits[0][index]))
    return steps


def random_scenario(
    vocab_size: int, prompt_lengths: Sequence[int], num_decode: int, chunk_len: int, seed: int
) -> Scenario:
    """Seeded random prompts, free-running greedy decode (tokens from the reference runner)."""
    rng = np.random.default_rng(seed)
    names = [chr(ord("A") + i) for i in range(len(prompt_lengths))]
    return Scenario(
        [
            SequenceScript(name, rng.integers(0, vocab_size, size=n).astype(np.int64), num_decode)
            for name, n in zip(names, prompt_lengths, strict=True)
        ],
        chunk_len=chunk_len,
    )
