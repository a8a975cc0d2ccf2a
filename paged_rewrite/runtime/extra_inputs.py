"""The inputs of QEfficient exports beyond tokens, KV caches and paging, and how a runtime feeds
them on every call.

Some QEfficient features add inputs to the decoder graph. A runtime must feed each of them on
every call, and an original export and its paged rewrite must get the same values, or their
logits cannot be compared. ``KNOWN_EXTRA_INPUTS`` lists the ones this module knows;
``ExtraInputs`` is the per-step policy both runners share:

``comp_ctx_lengths`` (compute-context-length, CCL)
    int64 ``[L]`` of zeros; only ``L`` is read: attention reads cache slots ``[0, L)``, so ``L``
    must reach past the step's last position. A ``CompCtxSchedule`` picks ``L`` per step as
    QEfficient's ``generate()`` does: the smallest length of the phase's list that is at least
    the first position of the step plus its ``seq_len``.
``num_logits_to_keep`` (speculative-decoding target model, TLM)
    int64 ``[n, 1]``; only ``n`` is read: the model returns the logits of the last ``n`` valid
    positions of each row. 1 for a prefill chunk, the step's ``seq_len`` for a decode step (which
    verifies ``seq_len - 1`` draft tokens at once).
``image_idx`` (VLM language decoder, kv_offload)
    int64 ``[1, 1]``: where in ``vision_embeds`` the step's image tokens start; 0 unless given.
``lora_ids`` (LoRA)
    int64 ``[batch, 1]``: the adapter of each row; per sequence from ``ExtraInputs.lora_ids``,
    else 0.

Anything else is fed from ``ExtraInputs.constants`` (the same value every call) or refused by
name with ``UnknownInputError``: feeding a made-up value could make two wrong models agree.
``batch_index`` (continuous batching) is not here: it follows the runner's slot assignment.
Retained states that are not KV caches (``vision_embeds``, sampler penalty buffers) are not here
either: the runners keep them like caches (see ``runners.retained_state_io``).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from paged_rewrite.errors import UnsupportedPatternError

if TYPE_CHECKING:
    from paged_rewrite.runtime.runners import Row

Phase = Literal["prefill", "decode"]

# Inputs a runner feeds itself: tokens, positions, the paged addressing and the CB slot.
RUNNER_INPUTS = frozenset({"input_ids", "position_ids", "block_table", "slot_id", "batch_index"})
WINDOW_TABLE_PREFIX = "block_table_w"  # a window group's table, block_table_w<W> (fed by the runner)

KNOWN_EXTRA_INPUTS: Mapping[str, str] = {
    "comp_ctx_lengths": "CCL: int64 zeros [L], L per step from a CompCtxSchedule",
    "num_logits_to_keep": "TLM: int64 zeros [n, 1], n = 1 for prefill, seq_len for decode",
    "image_idx": "VLM: int64 [1, 1], first image embedding of the step (0 unless given)",
    "lora_ids": "LoRA: int64 [batch, 1], adapter per row (ExtraInputs.lora_ids, else 0)",
}


class UnknownInputError(UnsupportedPatternError):
    """A model input that is neither a token, cache, retained state nor a known extra input."""


def infer_phase(rows: Sequence[Row]) -> Phase:
    """A step of one token per row is a decode step; anything longer, a prefill chunk. Multi-token
    decode steps (TLM) cannot be told from chunks by their shape: their caller must say so."""
    return "decode" if all(len(row.input_ids) == 1 for row in rows) else "prefill"


def step_end(rows: Sequence[Row]) -> int:
    """First valid position plus ``seq_len``, maximised over the rows (1 if no row is valid):
    the context a step needs, counted as QEfficient counts it for a chunk."""
    ends = [int(r.position_ids[r.position_ids >= 0][0]) + len(r.position_ids) for r in rows if r.num_valid]
    return max(ends, default=1)


@dataclass(frozen=True)
class CompCtxSchedule:
    """The compute-context lengths of a CCL export, per phase (QEfficient's
    ``comp_ctx_lengths_prefill`` / ``comp_ctx_lengths_decode``)."""

    prefill: tuple[int, ...]
    decode: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode or min(self.prefill + self.decode) < 1:
            raise ValueError(f"compute-context lengths must be positive and non-empty, got {self}")

    @classmethod
    def spread(cls, ctx_len: int) -> CompCtxSchedule:
        """Quarter, half and full context for both phases: a step's length changes as the
        sequences grow, so a check exercises several lengths."""
        lengths = tuple(sorted({max(1, ctx_len // 4), max(1, ctx_len // 2), ctx_len}))
        return cls(lengths, lengths)

    def length(self, phase: Phase, rows: Sequence[Row]) -> int:
        """The smallest length of the phase's list that covers the step; the largest if none does
        (QEfficient's fallback)."""
        lengths = sorted(self.prefill if phase == "prefill" else self.decode)
        end = step_end(rows)
        return next((length for length in lengths if length >= end), lengths[-1])


@dataclass(frozen=True)
class ExtraInputs:
    """How to feed a model's extra inputs; one instance is shared by the runners compared.

    ``comp_ctx_lengths`` None means the whole context every step. ``constants`` feeds any input
    by name, unchanged, on every call (it also overrides the defaults above)."""

    comp_ctx_lengths: CompCtxSchedule | None = None
    constants: Mapping[str, np.ndarray] = field(default_factory=dict)
    lora_ids: Mapping[Hashable, int] = field(default_factory=dict)

    def check(self, names: Collection[str], model: str) -> None:
        """Raise ``UnknownInputError`` for the first of ``names`` this policy cannot feed."""
        for name in names:
            if name not in KNOWN_EXTRA_INPUTS and name not in self.constants:
                raise UnknownInputError(
                    f"{model}: input {name!r} is not a token, KV cache, retained state or known "
                    f"QEfficient extra input ({', '.join(KNOWN_EXTRA_INPUTS)}); "
                    f"feed it with ExtraInputs(constants={{{name!r}: ...}})"
                )

    def feeds(
        self, names: Collection[str], rows: Sequence[Row], phase: Phase, context_len: int
    ) -> dict[str, np.ndarray]:
        """The values of ``names`` for one call with ``rows``; ``context_len`` is the model's cache
        length (the CCL length when no schedule is given)."""
        feeds: dict[str, np.ndarray] = {}
        for name in names:
            if name in self.constants:
                feeds[name] = np.asarray(self.constants[name])
            elif name == "comp_ctx_lengths":
                length = self.comp_ctx_lengths.length(phase, rows) if self.comp_ctx_lengths else context_len
                feeds[name] = np.zeros(length, np.int64)
            elif name == "num_logits_to_keep":
                keep = 1 if phase == "prefill" else max(len(row.input_ids) for row in rows)
                feeds[name] = np.zeros((keep, 1), np.int64)
            elif name == "image_idx":
                feeds[name] = np.zeros((1, 1), np.int64)
            elif name == "lora_ids":
                ids = [self.lora_ids.get(row.seq, 0) if row.seq is not None else 0 for row in rows]
                feeds[name] = np.array(ids, np.int64).reshape(-1, 1)
        return feeds
