"""What a runner keeps between calls besides token inputs: the model's retained-state pairs (an
input ``X`` whose new value the model returns as ``X_RetainedState``), split into KV caches and
other states, and the slot of each sequence in a continuous-batching buffer.

A KV cache is a rank-4 pair ``[batch | pool blocks, kv_heads, length, head_dim]``; the name does
not matter (``past_key.0_llm`` pairs with ``past_key.0_llm_RetainedState``). Every other pair —
the VLM's ``vision_embeds`` ``[vision_batch_size, vision_size, hidden]``, a sampler's penalty
buffers ``[batch, vocab]`` — is an ``OtherStates`` entry: zero-initialised and fed back every call,
never paged.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RETAINED = "_RetainedState"
KV_RANK = 4

# onnxruntime's type strings; a state of another type cannot be zero-initialised here.
ORT_DTYPES: Mapping[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bool)": np.bool_,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}


@dataclass(frozen=True)
class CacheIO:
    """A retained-state input of a model, its output, and its shape (dims as the model names them)."""

    input: str
    output: str
    shape: tuple[int | str, ...]
    dtype: type[np.generic] = np.float32

    def sized(self, dims: Mapping[str, int], **axes: int) -> tuple[int, ...]:
        """The concrete shape: symbolic dims from ``dims``, axes overridden as ``a0=..``, ``a2=..``."""
        shape = list(self.shape)
        for key, value in axes.items():
            shape[int(key[1:])] = value
        missing = [d for d in shape if isinstance(d, str) and d not in dims]
        if missing:
            raise ValueError(f"state {self.input!r} needs a value for dim {missing[0]!r}")
        return tuple(d if isinstance(d, int) else dims[d] for d in shape)


def retained_pairs(session: object) -> list[CacheIO]:
    """Every input of an onnxruntime session with a ``<name>_RetainedState`` output."""
    outputs = {o.name for o in session.get_outputs()}  # type: ignore[attr-defined]
    pairs = []
    for value in session.get_inputs():  # type: ignore[attr-defined]
        if value.name + RETAINED in outputs:
            if value.type not in ORT_DTYPES:
                raise ValueError(f"retained state {value.name!r} has unsupported type {value.type}")
            shape = tuple(d if isinstance(d, int) else str(d) for d in value.shape)
            pairs.append(CacheIO(value.name, value.name + RETAINED, shape, ORT_DTYPES[value.type]))
    return pairs


def cache_io(session: object) -> list[CacheIO]:
    """The KV caches of a session (paged pools, for a paged model): its rank-4 retained pairs."""
    return [pair for pair in retained_pairs(session) if len(pair.shape) == KV_RANK]


def retained_state_io(session: object) -> list[CacheIO]:
    """The retained states of a session that are not KV caches."""
    return [pair for pair in retained_pairs(session) if len(pair.shape) != KV_RANK]


class SlotMap:
    """Continuous batching: the buffer row (slot) of each sequence — given, or the lowest free one
    on first sight — and spare slots for idle rows."""

    def __init__(self, num_slots: int, slots: Mapping[Hashable, int] | None = None) -> None:
        self.num_slots = num_slots
        self.slots: dict[Hashable, int] = dict(slots or {})

    def slot_for(self, seq: Hashable) -> int:
        if seq not in self.slots:
            taken = set(self.slots.values())
            self.slots[seq] = min(s for s in range(self.num_slots) if s not in taken)
        return self.slots[seq]

    def slots_of(self, seqs: Sequence[Hashable | None]) -> list[int]:
        """One slot per row; idle rows (``None``) take slots no row of the call uses."""
        busy = {self.slot_for(seq) for seq in seqs if seq is not None}
        spare = iter(s for s in range(self.num_slots) if s not in busy)
        return [self.slots[seq] if seq is not None else next(spare) for seq in seqs]

    def batch_index(self, seqs: Sequence[Hashable | None]) -> np.ndarray:
        """The ``batch_index`` input, int64 ``[batch, 1]``."""
        return np.array([[s] for s in self.slots_of(seqs)], dtype=np.int64)

    def release(self, seq: Hashable) -> None:
        self.slots.pop(seq, None)


class OtherStates:
    """Retained states that are not KV caches, zero-initialised and fed back on every call.

    A state whose first dim is the batch dim of ``input_ids`` belongs to the row: it is kept per
    sequence and stacked per call, as a contiguous cache is. Any other state (``vision_embeds``,
    or a ``[full_batch_size, ...]`` buffer addressed by ``batch_index``) is one tensor shared by
    all calls. Dims not in ``dims`` default to 1 (e.g. ``vision_size``: give the real value to feed
    a real image). To start from real values rather than zeros — an image's features — set
    ``shared[name]`` before the first call (a runner's ``states`` attribute is this object)."""

    def __init__(self, states: Iterable[CacheIO], batch_dim: int | str, dims: Mapping[str, int]) -> None:
        states = list(states)
        self.per_row = [s for s in states if s.shape and s.shape[0] == batch_dim]
        self.shared_io = [s for s in states if s not in self.per_row]
        self._dims = {d: dims.get(d, 1) for s in states for d in s.shape if isinstance(d, str)}
        self.shared = {s.input: np.zeros(s.sized(self._dims), s.dtype) for s in self.shared_io}
        self._rows: dict[Hashable, dict[str, np.ndarray]] = {}

    def _row(self, seq: Hashable | None) -> dict[str, np.ndarray]:
        fresh = {s.input: np.zeros(s.sized(self._dims, a0=1), s.dtype) for s in self.per_row}
        return fresh if seq is None else self._rows.setdefault(seq, fresh)

    def feeds(self, seqs: Sequence[Hashable | None]) -> dict[str, np.ndarray]:
        feeds = dict(self.shared)
        if self.per_row:
            rows = [self._row(seq) for seq in seqs]
            feeds.update({s.input: np.concatenate([row[s.input] for row in rows]) for s in self.per_row})
        return feeds

    def keep(self, seqs: Sequence[Hashable | None], out: Mapping[str, np.ndarray]) -> None:
        """Store the call's retained outputs (idle rows' are dropped)."""
        for s in self.shared_io:
            self.shared[s.input] = out[s.output]
        for index, seq in enumerate(seqs):
            if seq is not None:
                row = self._row(seq)
                for s in self.per_row:
                    row[s.input] = out[s.output][index : index + 1]

    def of(self, seq: Hashable) -> dict[str, np.ndarray]:
        """What ``seq`` would be fed now: its own states and the shared ones."""
        return {**self.shared, **self._row(seq)}

    def fork(self, parent: Hashable, child: Hashable) -> None:
        self._rows[child] = {name: value.copy() for name, value in self._row(parent).items()}

    def release(self, seq: Hashable) -> None:
        self._rows.pop(seq, None)
