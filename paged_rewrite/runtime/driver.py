"""Drive models through a serving scenario: chunked prefill with ``-1`` padding, then decode.

Two schedules: ``interleaved`` (the default: prefill chunks of the sequences interleaved call by
call, then all sequences decoded together in one batch) and ``sequential`` (each sequence alone,
batch 1: its chunks, then its decode steps, as QEfficient's ``generate()`` without continuous
batching runs them, and as the fixture corpora's references were made).

Several runners are driven in lockstep on identical inputs, so their logits can be compared
step by step. Decode inputs are teacher-forced when the scenario gives them, otherwise the
greedy token of the first runner (the reference) is fed to every runner. A teacher-forced
decode step may carry several tokens per row (a TLM verifying draft tokens); its positions
follow on from the previous step's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from paged_rewrite.runtime.extra_inputs import Phase
from paged_rewrite.runtime.runners import Row

PAD_ID = 0
PAD_POSITION = -1


class Runner(Protocol):
    def step(self, rows: Sequence[Row], phase: Phase | None = None) -> np.ndarray: ...

    def fork(self, parent: str, child: str) -> None: ...


@dataclass(frozen=True)
class SequenceScript:
    """One sequence: its prompt and either its decode inputs (teacher-forced: ``[num_decode]``, or
    ``[num_decode, k]`` for ``k`` tokens per step) or a step count (greedy, one token per step)."""

    name: str
    prompt: np.ndarray
    num_decode: int
    decode_tokens: np.ndarray | None = None
    fork_of: str | None = None  # shares this sequence's prompt: forked after its prefill

    @property
    def decode_width(self) -> int:
        """Tokens per decode step."""
        return (
            1 if self.decode_tokens is None or self.decode_tokens.ndim == 1 else self.decode_tokens.shape[1]
        )

    @property
    def length(self) -> int:
        """Positions the sequence fills by the end of the scenario."""
        return len(self.prompt) + self.num_decode * self.decode_width

    def decode_row(self, t: int, greedy_token: int) -> Row:
        """Decode step ``t``: the scenario's tokens, or ``greedy_token``."""
        width = self.decode_width
        tokens = self.decode_tokens[t] if self.decode_tokens is not None else greedy_token
        start = len(self.prompt) + t * width
        return Row(self.name, np.atleast_1d(tokens).astype(np.int64), np.arange(start, start + width))


@dataclass(frozen=True)
class Scenario:
    """Sequences, the prefill chunk length, the schedule, and optionally the row layout of each
    decode batch (sequence names, ``None`` for an idle all-padding row); by default the active
    sequences. ``decode_rows`` applies to the interleaved schedule only."""

    sequences: Sequence[SequenceScript]
    chunk_len: int = 32
    decode_rows: Sequence[str | None] | None = None
    schedule: Literal["interleaved", "sequential"] = "interleaved"

    @property
    def max_length(self) -> int:
        return max(s.length for s in self.sequences)


@dataclass
class Step:
    """One model call: its kind, the sequences of its rows, and each runner's logits (``[B, vocab]``,
    or ``[B, n, vocab]`` when the model keeps ``n > 1`` positions per row; see ``kept_logits``)."""

    index: int
    kind: str
    sequences: list[str]
    logits: list[np.ndarray]


def prefill_rows(script: SequenceScript, chunk_len: int) -> list[Row]:
    """The prompt cut into chunks of ``chunk_len``, the last one right-padded (id 0, position -1)."""
    return [
        chunk_row(script.name, script.prompt, start, chunk_len)
        for start in range(0, len(script.prompt), chunk_len)
    ]


def chunk_row(seq: str, prompt: np.ndarray, start: int, chunk_len: int) -> Row:
    """The ``chunk_len`` prompt tokens from position ``start``, right-padded (id 0, position -1).
    A chunk may start anywhere: after a prefix-cache hit, at the first uncached position."""
    ids = np.full(chunk_len, PAD_ID, dtype=np.int64)
    pos = np.full(chunk_len, PAD_POSITION, dtype=np.int64)
    chunk = prompt[start : start + chunk_len]
    ids[: len(chunk)] = chunk
    pos[: len(chunk)] = np.arange(start, start + len(chunk))
    return Row(seq, ids, pos)


def greedy_token(logits: np.ndarray, row: int) -> int:
    """The greedy next token of batch row ``row``: the argmax of its last kept logits row."""
    return int(np.argmax(logits[row].reshape(-1, logits.shape[-1])[-1]))


def drive(runners: Sequence[Runner], scenario: Scenario) -> list[Step]:
    """Run every runner through ``scenario`` in lockstep and collect their logits per step."""
    steps: list[Step] = []

    def call(kind: Phase, rows: list[Row]) -> Step:
        step = Step(
            len(steps),
            kind,
            [str(r.seq) if r.seq is not None else "" for r in rows],
            [runner.step(rows, kind) for runner in runners],
        )
        steps.append(step)
        return step

    last_token: dict[str, int] = {}
    if scenario.schedule == "sequential":
        for script in scenario.sequences:
            if script.fork_of is not None:
                raise ValueError(f"sequence {script.name!r}: forks need the interleaved schedule")
            for chunk in prefill_rows(script, scenario.chunk_len):
                last_token[script.name] = greedy_token(call("prefill", [chunk]).logits[0], 0)
            for t in range(script.num_decode):
                step = call("decode", [script.decode_row(t, last_token[script.name])])
                last_token[script.name] = greedy_token(step.logits[0], 0)
        return steps

    chunks = {s.name: prefill_rows(s, scenario.chunk_len) for s in scenario.sequences if s.fork_of is None}
    for round_index in range(max(len(c) for c in chunks.values())):
        for script in scenario.sequences:
            if script.name in chunks and round_index < len(chunks[script.name]):
                step = call("prefill", [chunks[script.name][round_index]])
                last_token[script.name] = greedy_token(step.logits[0], 0)

    for script in scenario.sequences:
        if script.fork_of is not None:
            parent = next(s for s in scenario.sequences if s.name == script.fork_of)
            assert np.array_equal(parent.prompt, script.prompt), "a fork shares its parent's prompt"
            for runner in runners:
                runner.fork(parent.name, script.name)
            last_token[script.name] = last_token[parent.name]

    by_name = {s.name: s for s in scenario.sequences}
    widths = {s.decode_width for s in scenario.sequences if s.num_decode}
    if len(widths) > 1:
        raise ValueError(f"sequences decoded in one batch need one decode width, got {sorted(widths)}")
    width = widths.pop() if widths else 1
    for t in range(max(s.num_decode for s in scenario.sequences)):
        layout = scenario.decode_rows or [s.name for s in scenario.sequences]
        rows = []
        for name in layout:
            found = by_name.get(name) if name is not None else None
            if found is None or t >= found.num_decode:
                rows.append(Row.idle(width))
            else:
                rows.append(found.decode_row(t, last_token.get(found.name, 0)))
        if scenario.decode_rows is None:
            rows = [row for row in rows if row.seq is not None]
        if not rows:
            continue
        step = call("decode", rows)
        for index, row in enumerate(rows):
            if row.seq is not None:
                last_token[str(row.seq)] = greedy_token(step.logits[0], index)
    return steps


def random_scenario(
    vocab_size: int,
    prompt_lengths: Sequence[int],
    num_decode: int,
    chunk_len: int,
    seed: int,
    decode_width: int = 1,
) -> Scenario:
    """Seeded random prompts; free-running greedy decode (tokens from the reference runner), or
    with ``decode_width > 1`` seeded random decode tokens, ``decode_width`` per step (the draft
    tokens a TLM verifies need not be its own greedy choices for two models to be compared)."""
    rng = np.random.default_rng(seed)
    names = [chr(ord("A") + i) for i in range(len(prompt_lengths))]
    scripts = []
    for name, n in zip(names, prompt_lengths, strict=True):
        prompt = rng.integers(0, vocab_size, size=n).astype(np.int64)
        forced = rng.integers(0, vocab_size, size=(num_decode, decode_width)) if decode_width > 1 else None
        scripts.append(SequenceScript(name, prompt, num_decode, forced))
    return Scenario(scripts, chunk_len=chunk_len)
