"""The runner of an original (contiguous-cache) export: its KV cache kept per sequence, or in
its continuous-batching rows; the counterpart ``runners.PagedRunner`` is compared with."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

from paged_rewrite.runtime.extra_inputs import ExtraInputs, Phase
from paged_rewrite.runtime.runner_base import Row, StepRunner, kept_logits


class ContiguousRunner(StepRunner):
    """An original export, its INT32_MAX sentinels patched for onnxruntime.

    Plain exports: each sequence owns a ``[1, heads, ctx_len, head_dim]`` cache; a step stacks
    the rows' caches into one batch and splits the retained state back. Continuous-batching
    exports (a ``batch_index`` input): one shared ``[full_batch_size, ...]`` cache, each sequence
    in its own slot (``slots``, else the lowest free one), idle rows on the remaining slots.
    ``dims`` gives the symbolic dims (``ctx_len``, ``sliding_window``, ``full_batch_size``, and
    those of non-KV states such as ``vision_size``). ``in_place``: see ``in_place.py``.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        dims: Mapping[str, int],
        slots: Mapping[Hashable, int] | None = None,
        extra_inputs: ExtraInputs | None = None,
        in_place: bool = False,
    ) -> None:
        super().__init__(model_path, True, dims, extra_inputs, in_place)
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
