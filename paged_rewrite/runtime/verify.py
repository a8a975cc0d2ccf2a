"""``verify``: drive an original export and its paged rewrite through the same scenario and
prove they agree — per step max abs logit difference, greedy-token agreement, and isolation
(no pool block outside the step's own rows and the null block ever changes)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from paged_rewrite.errors import PagedRewriteError, UnsupportedPatternError, VerificationError
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import Scenario, drive, random_scenario
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner

DEFAULT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class PagedGeometry:
    """What a runtime must know of a paged model: page size, table width, vocabulary, and the
    dims the rewrite bound (ring lengths among them), read from the model's metadata."""

    kv_block_size: int
    num_kv_blocks: int | None
    vocab_size: int
    dims: dict[str, int] = field(default_factory=dict)
    windows: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, paged_path: str | os.PathLike[str]) -> PagedGeometry:
        model = onnx.load(os.fspath(paged_path), load_external_data=False)
        graph = model.graph
        metadata = {p.key: p.value for p in model.metadata_props}
        dims = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]
        }
        if "block_table" not in dims:
            raise UnsupportedPatternError(f"{paged_path}: not a paged model (no block_table input)")
        pools = [shape for name, shape in dims.items() if len(shape) == 4 and f"{name}_RetainedState" in dims]
        block_size = pools[0][2] if pools else None
        vocab = dims.get("logits", [None])[-1]
        if not block_size or not vocab:
            raise UnsupportedPatternError(f"{paged_path}: needs a static kv_block_size and vocab size")
        return cls(
            block_size,
            dims["block_table"][1] or None,
            vocab,
            json.loads(metadata.get("paged_rewrite.dims", "{}")),
            json.loads(metadata.get("paged_rewrite.windows", "{}")),
        )


@dataclass
class StepCheck:
    step: int
    kind: str
    sequences: list[str]
    max_abs_diff: float
    greedy_agree: bool
    foreign_blocks_changed: list[int]


@dataclass
class VerifyReport:
    """Per-step comparison of the paged model against the original, and the verdict."""

    kv_block_size: int
    ctx_len: int
    num_blocks: int
    block_order: str
    tolerance: float
    steps: list[StepCheck] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((s.max_abs_diff for s in self.steps), default=0.0)

    @property
    def ok(self) -> bool:
        return all(
            s.max_abs_diff <= self.tolerance and s.greedy_agree and not s.foreign_blocks_changed
            for s in self.steps
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff, "ok": self.ok}

    def summary(self) -> str:
        bad = [s for s in self.steps if s.max_abs_diff > self.tolerance or not s.greedy_agree]
        breaches = [s for s in self.steps if s.foreign_blocks_changed]
        lines = [
            f"{len(self.steps)} steps, kv_block_size={self.kv_block_size}, ctx_len={self.ctx_len}, "
            f"pool={self.num_blocks} blocks ({self.block_order})",
            f"max abs logit diff {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}); "
            f"greedy tokens agree on {sum(s.greedy_agree for s in self.steps)}/{len(self.steps)} steps; "
            f"isolation breaches: {len(breaches)}",
        ]
        lines += [
            f"  step {s.step} ({s.kind}, {','.join(s.sequences)}): diff {s.max_abs_diff:.3g}" for s in bad[:5]
        ]
        lines += [f"  step {s.step}: foreign blocks changed {s.foreign_blocks_changed}" for s in breaches[:5]]
        lines.append("OK" if self.ok else "MISMATCH")
        return "\n".join(lines)


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
) -> VerifyReport:
    """Drive both models through ``scenario``; the pool has ``spare_blocks`` never-used blocks
    beyond what the sequences need, so isolation is checked against untouched neighbours too."""
    geometry = geometry or PagedGeometry.of(paged)
    bs = geometry.kv_block_size
    num_kv_blocks = geometry.num_kv_blocks or math.ceil(ctx_len / bs)
    if num_kv_blocks * bs != ctx_len:
        raise UnsupportedPatternError(
            f"ctx_len {ctx_len} must equal num_kv_blocks*kv_block_size = {num_kv_blocks}*{bs} "
            "for a like-for-like run"
        )
    needed = sum(math.ceil((len(s.prompt) + s.num_decode) / bs) for s in scenario.sequences)
    num_blocks = 1 + needed + spare_blocks
    order = shuffled_order(num_blocks, seed) if block_order == "shuffled" else None
    manager = BlockManager(num_blocks, bs, order, ring_lengths=list(geometry.windows.values()))
    paged_runner = PagedRunner(paged, manager, num_kv_blocks)
    dims = {**geometry.dims, "ctx_len": ctx_len}
    try:
        steps = drive([ContiguousRunner(original, dims), paged_runner], scenario)
    except PagedRewriteError:
        raise
    except Exception as exc:  # onnxruntime refused a call: the models do not agree on their interface
        first = str(exc).strip().splitlines()
        reason = first[0] if first else type(exc).__name__
        raise VerificationError(f"{paged}: running the scenario failed: {reason}") from None
    report = VerifyReport(bs, ctx_len, num_blocks, block_order, tolerance)
    for step, isolation in zip(steps, paged_runner.isolation, strict=True):
        want, got = step.logits
        diff = np.abs(want.astype(np.float64) - got.astype(np.float64))
        report.steps.append(
            StepCheck(
                step=step.index,
                kind=step.kind,
                sequences=step.sequences,
                max_abs_diff=float(np.nan_to_num(diff, nan=np.inf).max()),
                greedy_agree=bool((want.argmax(-1) == got.argmax(-1)).all()),
                foreign_blocks_changed=isolation.foreign_blocks_changed,
            )
        )
    return report


def verify(
    original: str | os.PathLike[str],
    paged: str | os.PathLike[str],
    block_order: str = "shuffled",
    seed: int = 0,
    ctx_len: int | None = None,
    num_decode: int = 16,
    chunk_len: int = 32,
    tolerance: float = DEFAULT_TOLERANCE,
) -> VerifyReport:
    """The default check: two sequences of different lengths, padded prefill chunks that cross
    block boundaries (for blocks smaller than the chunk), then ``num_decode`` batched steps."""
    geometry = PagedGeometry.of(paged)
    bs = geometry.kv_block_size
    if ctx_len is None:
        ctx_len = geometry.num_kv_blocks * bs if geometry.num_kv_blocks else max(128, bs)
    # A ring buffer must not see a padded prefill chunk once it is full: the originals write
    # padding into the ring's last slot (a fault the paged model does not copy), so prompts stay
    # shorter than the smallest window; decode then wraps the ring.
    longest = min([ctx_len - num_decode, *(w - 1 for w in geometry.windows.values())])
    long_prompt = max(2, min(longest, chunk_len + chunk_len // 2 - 3))
    short_prompt = max(1, min(long_prompt - 1, 7))
    scenario = random_scenario(geometry.vocab_size, [long_prompt, short_prompt], num_decode, chunk_len, seed)
    if scenario.max_length > ctx_len:
        raise UnsupportedPatternError(
            f"ctx_len {ctx_len} is too short for a {scenario.max_length}-token scenario"
        )
    return compare(original, paged, scenario, ctx_len, block_order, seed, tolerance, geometry=geometry)
