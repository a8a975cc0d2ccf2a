"""``verify``: drive an original export and its paged rewrite through the same scenario and
prove they agree — per step max abs logit difference, greedy-token agreement, isolation (no pool
block outside the step's own rows and the null block ever changes), the table width the step
passed (narrowed to the smallest context bucket covering the batch by default; a table that
does not cover a row's live context fails the check), and at the end each sequence's KV cache
read back through its block table against the original's cache.

Narrowed tables are bit-exact against the original at its full context where the export's
attention over the narrower context does the same arithmetic (plain, CB, subfunction, CCL,
window exports: the masked positions add exact zeros). BlockedKV exports split the context into
a fixed number of blocks whose length follows the table, so the online softmax sums in another
order: there the logits agree within the tolerance (1e-5) with the same greedy tokens. The
summary says which.

Both models get the same extra inputs (``extra_inputs.ExtraInputs``): CCL lengths that change as
the sequences grow, ``num_logits_to_keep`` for TLM decode steps of several tokens, constants
such as ``image_idx``. Non-KV retained states (``vision_embeds``) are zero-initialised and fed
back by both runners alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from paged_rewrite.errors import PagedRewriteError, UsageError, VerificationError
from paged_rewrite.runtime.block_manager import UNALLOCATED, BlockManager, shuffled_order
from paged_rewrite.runtime.driver import Scenario, drive, random_scenario
from paged_rewrite.runtime.extra_inputs import CompCtxSchedule, ExtraInputs
from paged_rewrite.runtime.geometry import PagedGeometry
from paged_rewrite.runtime.runners import ContiguousRunner, ModelRunError, PagedRunner

__all__ = [
    "DEFAULT_TOLERANCE",
    "PagedGeometry",
    "StepCheck",
    "VerifyReport",
    "compare",
    "final_kv_diff",
    "verify",
]

DEFAULT_TOLERANCE = 1e-5
# QEfficient's TLM verifies num_speculative_tokens (3 by default) draft tokens plus one per step.
TLM_DECODE_WIDTH = 4


@dataclass
class StepCheck:
    step: int
    kind: str
    sequences: list[str]
    max_abs_diff: float
    greedy_agree: bool
    foreign_blocks_changed: list[int]
    table_width: int = 0  # block_table columns the paged model got
    rows_cut: list[str] = field(default_factory=list)  # rows whose live context the table did not cover


@dataclass
class VerifyReport:
    """Per-step comparison of the paged model against the original, the final KV comparison
    (max abs difference over every sequence's written slots), and the verdict."""

    kv_block_size: int
    ctx_len: int
    num_blocks: int
    block_order: str
    tolerance: float
    steps: list[StepCheck] = field(default_factory=list)
    kv_max_abs_diff: float = 0.0
    full_width: bool = False
    window_num_blocks: dict[str, int] = field(default_factory=dict)  # pool size per window table

    @property
    def max_abs_diff(self) -> float:
        return max((s.max_abs_diff for s in self.steps), default=0.0)

    @property
    def ok(self) -> bool:
        return self.kv_max_abs_diff <= self.tolerance and all(
            s.max_abs_diff <= self.tolerance
            and s.greedy_agree
            and not s.foreign_blocks_changed
            and not s.rows_cut
            for s in self.steps
        )

    @property
    def bit_exact(self) -> bool:
        return self.max_abs_diff == 0.0 and self.kv_max_abs_diff == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff, "ok": self.ok}

    def summary(self) -> str:
        bad = [s for s in self.steps if s.max_abs_diff > self.tolerance or not s.greedy_agree]
        breaches = [s for s in self.steps if s.foreign_blocks_changed]
        cut = [s for s in self.steps if s.rows_cut]
        exactness = "bit-exact" if self.bit_exact else f"within tolerance {self.tolerance:g}"
        lines = [
            f"{len(self.steps)} steps, kv_block_size={self.kv_block_size}, ctx_len={self.ctx_len}, "
            f"pool={self.num_blocks} blocks ({self.block_order})"
            + "".join(f", {table}: {n} blocks" for table, n in self.window_num_blocks.items()),
            f"table width per step ({'full width' if self.full_width else 'narrowed to the context in use'}, "
            f"columns): {_runs([s.table_width for s in self.steps])}",
            f"max abs logit diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}); "
            f"greedy tokens agree on {sum(s.greedy_agree for s in self.steps)}/{len(self.steps)} steps; "
            f"isolation breaches: {len(breaches)}; final KV max abs diff {self.kv_max_abs_diff:.3g}; "
            f"steps with a table narrower than a row's context: {len(cut)}",
        ]
        lines += [
            f"  step {s.step} ({s.kind}, {','.join(s.sequences)}): diff {s.max_abs_diff:.3g}" for s in bad[:5]
        ]
        lines += [f"  step {s.step}: foreign blocks changed {s.foreign_blocks_changed}" for s in breaches[:5]]
        lines += [
            f"  step {s.step}: table of {s.table_width} columns cuts the context of {','.join(s.rows_cut)}"
            for s in cut[:5]
        ]
        if self.ok:
            lines.append(f"logits {exactness}")
        lines.append("OK" if self.ok else "MISMATCH")
        return "\n".join(lines)


def _runs(values: list[int]) -> str:
    """``[1, 1, 2, 2, 2, 4]`` -> ``"1 x2, 2 x3, 4 x1"``: per-step widths, run-length encoded."""
    runs: list[list[int]] = []
    for value in values:
        if runs and runs[-1][0] == value:
            runs[-1][1] += 1
        else:
            runs.append([value, 1])
    return ", ".join(f"{value} x{count}" for value, count in runs) or "-"


def _abs_diff(want: np.ndarray, got: np.ndarray) -> float:
    """Max abs difference; NaN in both at the same place counts as equal, NaN in one as inf."""
    want, got = want.astype(np.float64), got.astype(np.float64)
    both_nan = np.isnan(want) & np.isnan(got)
    diff = np.where(both_nan, 0.0, np.abs(want - got))
    return float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0))


def final_kv_diff(original: ContiguousRunner, paged: PagedRunner, scenario: Scenario) -> float:
    """Max abs difference between each sequence's caches in the original and its paged caches
    read back through the block table, over the slots the sequence wrote: ``p % length`` for
    its positions ``p`` (``length`` the ring's length for a ring, a ring buffer's or one written
    in a full-length cache; else the context), except those a logical-position window freed
    (behind the window, never read again). Other slots may differ by design: the original writes
    padding into its last slot, the paged model into the null block."""
    worst = 0.0
    for script in scenario.sequences:
        want = original.kv_view(script.name)
        got = paged.kv_view(script.name, {name: view.shape[2] for name, view in want.items()})
        for name, view in want.items():
            held = paged.managers[paged.table_of[name]].blocks_of(script.name)
            size = paged.manager.kv_block_size
            freed = {
                p for p in range(script.length) if p // size < len(held) and held[p // size] == UNALLOCATED
            }
            slots = sorted(paged.geometry.written_slots(name, view.shape[2], range(script.length)) - freed)
            worst = max(worst, _abs_diff(view[:, :, slots], got[name][:, :, slots]))
    return worst


def compare(
    original: str | os.PathLike[str],
    paged: str | os.PathLike[str],
    scenario: Scenario,
    ctx_len: int,
    block_order: str = "shuffled",
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    spare_blocks: int = 3,
    geometry: PagedGeometry | None = None,
    dims: Mapping[str, int] | None = None,
    extra_inputs: ExtraInputs | None = None,
    ctx_buckets: Sequence[int] | None = None,
    full_width: bool = False,
) -> VerifyReport:
    """Drive both models through ``scenario``; the pool has ``spare_blocks`` never-used blocks
    beyond what the sequences need, so isolation is checked against untouched neighbours too.
    ``dims`` binds symbolic dims the models leave open (e.g. ``vision_size``); ``extra_inputs``
    defaults to CCL lengths of a quarter, half and all of ``ctx_len``. The paged model gets per
    step the narrowest table of ``ctx_buckets`` (tokens; by default its own) covering the batch,
    or always the full table with ``full_width``."""
    geometry = geometry or PagedGeometry.of(paged)
    bs = geometry.kv_block_size
    num_kv_blocks = geometry.num_kv_blocks or math.ceil(ctx_len / bs)
    if num_kv_blocks * bs != ctx_len:
        if geometry.num_kv_blocks:  # a static table: the paged model has exactly one context
            fix = (
                f"pass --ctx-len {num_kv_blocks * bs} (or leave it out), or rewrite with --ctx-len {ctx_len}"
            )
        else:
            fix = f"pass a multiple of the block size, e.g. --ctx-len {num_kv_blocks * bs}"
        raise UsageError(
            f"{paged}: ctx_len {ctx_len} must equal num_kv_blocks*kv_block_size = {num_kv_blocks}*{bs} "
            f"for a like-for-like run; {fix}"
        )
    needed = sum(math.ceil(s.length / bs) for s in scenario.sequences)
    num_blocks = 1 + needed + spare_blocks
    static = geometry.pool_blocks.get("block_table")
    if static is not None:  # the pool is what the model was rewritten with (--num-blocks)
        if static < 1 + needed:
            raise UsageError(
                f"{paged}: its pool holds {static} blocks (--num-blocks); the scenario needs {1 + needed} "
                "(its sequences' blocks and the null block): rewrite with more, or pass fewer --decode-steps"
            )
        num_blocks = static
    order = shuffled_order(num_blocks, seed) if block_order == "shuffled" else None
    manager = BlockManager(num_blocks, bs, order, ring_lengths=geometry.ring_lengths)
    window_managers = {}  # a window group's pool: what its window holds per sequence, and spare blocks
    for offset, group in enumerate(geometry.window_groups, start=1):
        assert group.window is not None
        probe = BlockManager(2, bs, window=group.window, logical=group.logical)
        held = sum(probe.blocks_for(s.length, scenario.chunk_len) for s in scenario.sequences)
        size = 1 + held + spare_blocks
        shuffled = shuffled_order(size, seed + offset) if block_order == "shuffled" else None
        window_managers[group.table] = BlockManager(
            size, bs, shuffled, window=group.window, logical=group.logical
        )
    extra_inputs = extra_inputs or ExtraInputs(comp_ctx_lengths=CompCtxSchedule.spread(ctx_len))
    all_dims = {**geometry.dims, "ctx_len": ctx_len, **(dims or {})}
    try:
        paged_runner = PagedRunner(
            paged,
            manager,
            num_kv_blocks,
            all_dims,
            extra_inputs,
            ctx_buckets=ctx_buckets,
            full_width=full_width,
            window_managers=window_managers,
        )
        original_runner = ContiguousRunner(original, all_dims, extra_inputs=extra_inputs)
        steps = drive([original_runner, paged_runner], scenario)
        kv_diff = final_kv_diff(original_runner, paged_runner, scenario)
    except PagedRewriteError:
        raise
    except ModelRunError as exc:  # onnxruntime refused a call of one of the two models
        raise VerificationError(f"{exc.model_path}: running the scenario failed: {exc.reason}") from None
    except Exception as exc:  # the models do not agree on their interface
        first = str(exc).strip().splitlines()
        reason = first[0] if first else type(exc).__name__
        raise VerificationError(f"{paged}: running the scenario failed: {reason}") from None
    report = VerifyReport(
        bs,
        ctx_len,
        num_blocks,
        block_order,
        tolerance,
        kv_max_abs_diff=kv_diff,
        full_width=full_width,
        window_num_blocks={table: m.num_blocks for table, m in window_managers.items()},
    )
    for step, isolation, width in zip(steps, paged_runner.isolation, paged_runner.table_widths, strict=True):
        want, got = step.logits
        report.steps.append(
            StepCheck(
                step=step.index,
                kind=step.kind,
                sequences=step.sequences,
                max_abs_diff=_abs_diff(want, got),
                greedy_agree=bool((want.argmax(-1) == got.argmax(-1)).all()),
                foreign_blocks_changed=isolation.foreign_blocks_changed,
                table_width=width.columns,
                rows_cut=[str(seq) for seq in width.rows_cut],
            )
        )
    return report


def _refuse_a_paged_original(original: str | os.PathLike[str]) -> None:
    """Swapped arguments are the likely cause of an ORIGINAL with a block table: say so."""
    inputs = {v.name for v in onnx.load(os.fspath(original), load_external_data=False).graph.input}
    if "block_table" in inputs:
        raise UsageError(
            f"{original}: ORIGINAL is already a paged model (it has a block_table input); "
            "verify takes the original export first, then its paged rewrite"
        )


def verify(
    original: str | os.PathLike[str],
    paged: str | os.PathLike[str],
    block_order: str = "shuffled",
    seed: int = 0,
    ctx_len: int | None = None,
    num_decode: int = 16,
    chunk_len: int = 32,
    tolerance: float = DEFAULT_TOLERANCE,
    dims: Mapping[str, int] | None = None,
    extra_inputs: ExtraInputs | None = None,
    ctx_buckets: Sequence[int] | None = None,
    full_width: bool = False,
) -> VerifyReport:
    """The default check: two sequences of different lengths, padded prefill chunks that cross
    block boundaries (for blocks smaller than the chunk), then ``num_decode`` batched steps —
    of ``TLM_DECODE_WIDTH`` tokens each for a TLM (``num_logits_to_keep``). A prefill-only
    (write-only) model gets one whole-context chunk per sequence and no decode: QEfficient
    exports it for ``seq_len = ctx_len``, and its cache is checked at the end. Tables are
    narrowed per step to the model's context buckets (``ctx_buckets`` overrides them) unless
    ``full_width``."""
    _refuse_a_paged_original(original)
    geometry = PagedGeometry.of(paged)
    bs = geometry.kv_block_size
    if ctx_len is None:
        full = geometry.full_num_kv_blocks
        ctx_len = full * bs if full else max(128, bs)
    width = TLM_DECODE_WIDTH if "num_logits_to_keep" in geometry.inputs else 1
    prompt_len = chunk_len + chunk_len // 2 - 3  # two chunks, the second one padded
    if geometry.write_only:
        chunk_len, num_decode, longest = ctx_len, 0, ctx_len - 1
    else:
        # A ring buffer must not see a padded prefill chunk once it is full: the originals write
        # padding into the ring's last slot (a fault the paged model does not copy), so prompts
        # stay shorter than the smallest window; decode then wraps the ring.
        longest = min([ctx_len - num_decode * width, *(w - 1 for w in geometry.windows.values())])
    long_prompt = max(2, min(longest, prompt_len))
    short_prompt = max(1, min(long_prompt - 1, 7))
    scenario = random_scenario(
        geometry.vocab_size, [long_prompt, short_prompt], num_decode, chunk_len, seed, decode_width=width
    )
    if scenario.max_length > ctx_len:  # only the flags can cause this: a usage error naming them
        raise UsageError(
            f"{paged}: ctx_len {ctx_len} is too short for verify's {scenario.max_length}-token scenario; "
            f"pass --ctx-len {scenario.max_length} or more, or fewer --decode-steps"
        )
    return compare(
        original,
        paged,
        scenario,
        ctx_len,
        block_order,
        seed,
        tolerance,
        geometry=geometry,
        dims=dims,
        extra_inputs=extra_inputs,
        ctx_buckets=ctx_buckets,
        full_width=full_width,
    )
