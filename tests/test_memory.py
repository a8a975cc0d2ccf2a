"""Memory on a real paged model: a pool smaller than the contiguous reservation (oversubscribed),
and prefix sharing (forked sequences share full blocks, copy on write) — with logits equal to
the original's and to an unshared run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from models import qeff_export

from paged_rewrite import rewrite
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import Scenario, SequenceScript, drive
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner
from paged_rewrite.runtime.verify import compare

CTX, BLOCK = 128, 16


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("memory")
    original = qeff_export(folder / "model.onnx", num_layers=2)
    rewrite(original, folder / "paged.onnx", BLOCK, ctx_len=CTX)
    return original, folder / "paged.onnx"


def test_oversubscribed_pool_serves_every_sequence_exactly(models: tuple[Path, Path]) -> None:
    rng = np.random.default_rng(3)
    lengths = [45, 7, 20, 33, 3, 60]
    scenario = Scenario(
        [SequenceScript(chr(65 + i), rng.integers(0, 256, n), 12) for i, n in enumerate(lengths)]
    )
    report = compare(*models, scenario, ctx_len=CTX, spare_blocks=0)
    contiguous_blocks = len(lengths) * CTX // BLOCK
    assert report.num_blocks == 18 < contiguous_blocks / 2  # 18 blocks where contiguous reserves 48
    assert report.ok and report.max_abs_diff == 0.0, report.summary()


def _run(paged: Path, original: Path, shared: bool) -> tuple[dict[str, list[np.ndarray]], int]:
    prompt = np.random.default_rng(5).integers(0, 256, 40)  # 2.5 blocks: the third is partial
    a = SequenceScript("A", prompt, 16)
    b = SequenceScript("B", prompt, 16, fork_of="A" if shared else None)
    manager = BlockManager(20, BLOCK, shuffled_order(20, 1))
    runner = PagedRunner(paged, manager, CTX // BLOCK)
    steps = drive([ContiguousRunner(original, {"ctx_len": CTX}), runner], Scenario([a, b]))
    logits: dict[str, list[np.ndarray]] = {"A": [], "B": []}
    for step in steps:
        want, got = step.logits
        assert np.array_equal(want, got)  # and the original agrees, step by step
        for row, seq in enumerate(step.sequences):
            logits[seq].append(got[row])
    assert all(not r.foreign_blocks_changed for r in runner.isolation)
    return logits, max(runner.blocks_in_use)


def test_prefix_sharing_matches_the_unshared_run_with_fewer_blocks(models: tuple[Path, Path]) -> None:
    original, paged = models
    shared, shared_peak = _run(paged, original, shared=True)
    alone, alone_peak = _run(paged, original, shared=False)
    # B's prefill logits come from A's (same prompt): compare every decode step of both sequences.
    for seq in ("A", "B"):
        assert np.array_equal(np.stack(shared[seq][-16:]), np.stack(alone[seq][-16:]))
    per_sequence = math.ceil((40 + 16) / BLOCK)
    assert alone_peak == 2 * per_sequence
    assert shared_peak == alone_peak - 2  # the two full prompt blocks are held once


def test_prefix_sharing_keeps_sliding_window_rings_private(paged_fixture) -> None:  # type: ignore[no-untyped-def]
    """gpt_oss layer 0 is a 32-slot ring with its own table (block_table_w32, the runner's default
    ring manager): once the ring wraps, a fork writes into ring blocks it shares with its parent,
    which copy on write must make private."""
    original, paged, _ = paged_fixture("gpt_oss_swa_moe", 16)
    prompt = np.random.default_rng(9).integers(0, 200, 20)
    tokens = {name: np.random.default_rng(seed).integers(0, 200, 24) for name, seed in (("A", 1), ("B", 2))}

    def run(shared: bool) -> list[np.ndarray]:
        scripts = [SequenceScript("A", prompt, 24, tokens["A"]),
                   SequenceScript("B", prompt, 24, tokens["B"], fork_of="A" if shared else None)]  # fmt: skip
        manager = BlockManager(24, 16, shuffled_order(24, 4))
        runner = PagedRunner(paged, manager, CTX // 16)
        dims = {"ctx_len": CTX, "sliding_window": 32}
        steps = drive([ContiguousRunner(original, dims), runner], Scenario(scripts))
        assert all(not r.foreign_blocks_changed for r in runner.isolation)
        decode = [s for s in steps if s.kind == "decode"]
        for step in decode:
            assert np.array_equal(*step.logits)  # each run matches the original
        return [s.logits[1] for s in decode]

    for shared_logits, alone_logits in zip(run(shared=True), run(shared=False), strict=True):
        assert np.array_equal(shared_logits, alone_logits)
