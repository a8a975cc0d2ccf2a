"""What the original and the paged runner share: a batch row, the logits a step keeps, the
error onnxruntime's refusals become, and the session with its extra inputs and non-KV states."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from paged_rewrite.errors import UnsupportedPatternError
from paged_rewrite.runtime.extra_inputs import (
    RUNNER_INPUTS,
    WINDOW_TABLE_PREFIX,
    ExtraInputs,
    Phase,
    infer_phase,
)
from paged_rewrite.runtime.in_place import in_place_refusal, run_in_place
from paged_rewrite.runtime.sessions import open_session
from paged_rewrite.runtime.states import OtherStates, SlotMap, cache_io, retained_state_io

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


class StepRunner:
    """What both runners share: the session, the cache I/O, extra inputs and non-KV states."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        patch_sentinels: bool,
        dims: Mapping[str, int],
        extra_inputs: ExtraInputs | None,
        in_place: bool = False,
    ) -> None:
        self.model_path = os.fspath(model_path)
        self.session = open_session(model_path, patch_sentinels=patch_sentinels)
        self.caches = cache_io(self.session)
        # See in_place.py: KV outputs written over their inputs, no copy of the cache per step.
        self.in_place = {c.input: c.output for c in self.caches} if in_place else {}
        refusal = in_place_refusal(model_path, self.in_place) if in_place else None
        if refusal:
            raise UnsupportedPatternError(f"{model_path}: cannot update the KV caches in place: {refusal}")
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
        self.extra_names = sorted(
            name
            for name in self.input_names - kept - RUNNER_INPUTS
            if not name.startswith(WINDOW_TABLE_PREFIX)
        )
        self.extra_inputs = extra_inputs or ExtraInputs()
        self.extra_inputs.check(self.extra_names, os.fspath(model_path))

    @property
    def context_len(self) -> int:
        raise NotImplementedError

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self.input_names}
        try:
            if self.in_place:
                return run_in_place(self.session, feeds, self.in_place, self.output_names)
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
