"""A context the block size does not divide: ctx 128 with blocks of 48 (three blocks, 144 slots).

The paged model reads ``num_kv_blocks * kv_block_size`` = 144 positions where the original read
128; the 16 extra ones are masked by the model's own mask. So logits stay bit-exact, except in a
BlockedKV export, which splits the context it reads into its KV blocks: there the split moves, the
rewrite warns, and logits agree within float rounding with the same tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, fixture_model
from test_parity_fixtures import reference_scenario

from paged_rewrite import rewrite
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import drive
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner

CTX_LEN, BLOCK = 128, 48


@pytest.mark.parametrize("name", ["llama_default", "llama_blockedkv"])
def test_a_context_the_block_size_does_not_divide(tmp_path: Path, name: str) -> None:
    paged = tmp_path / "paged.onnx"
    report = rewrite(fixture_model(name), paged, BLOCK, ctx_len=CTX_LEN)
    blocked = name == "llama_blockedkv"
    assert report.ctx_buckets == [48, 96, 128]
    assert len(report.warnings) == int(blocked)
    if blocked:
        assert "reads 144 positions" in report.warnings[0] and "BlockedKV" in report.warnings[0]

    ref = np.load(FIXTURES / name / "reference.npz")
    manifest = json.loads((FIXTURES / name / "manifest.json").read_text())
    scenario = reference_scenario(ref, manifest)
    manager = BlockManager(12, BLOCK, shuffled_order(12, seed=3))
    paged_runner = PagedRunner(paged, manager, 3, full_width=True)  # all 144 slots, every step
    steps = drive([ContiguousRunner(fixture_model(name), {"ctx_len": CTX_LEN}), paged_runner], scenario)
    assert {r.columns for r in paged_runner.table_widths} == {3}
    assert all(not r.foreign_blocks_changed for r in paged_runner.isolation)
    differs = False
    for step in steps:
        original, paged_logits = step.logits
        if blocked:
            assert np.abs(original - paged_logits).max() <= 1e-5, step.index
            differs = differs or not np.array_equal(original, paged_logits)
            assert np.array_equal(original.argmax(-1), paged_logits.argmax(-1)), step.index
        else:
            assert np.array_equal(original, paged_logits), step.index
    assert differs == blocked  # what the warning says: the moved split changes the rounding
