"""Parity of paged rewrites with their originals and with the fixtures' HF reference logits.

Each fixture's reference scenario (sequences A and B, teacher-forced) runs through the lockstep
driver: prefill chunks of A and B interleaved in one shared, shuffled pool, then A and B decoded
together in one batch. The original runs the same calls with per-sequence contiguous caches.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
from conftest import CONTIGUOUS_FIXTURES, CTX_LEN, FIXTURES

from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import Scenario, SequenceScript, drive, prefill_rows
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner


def reference_scenario(ref: np.lib.npyio.NpzFile, names: list[str]) -> Scenario:
    return Scenario(
        [
            SequenceScript(
                s,
                ref[f"{s}_prompt"],
                len(ref[f"{s}_decode_input_ids"]),
                ref[f"{s}_decode_input_ids"].reshape(-1),
            )
            for s in names
        ],
        chunk_len=ref[f"{names[0]}_prefill_input_ids"].shape[-1],
    )


@pytest.mark.parametrize("name", CONTIGUOUS_FIXTURES)
@pytest.mark.parametrize("kv_block_size", [16, 32, 128])
def test_paged_matches_original_and_reference(paged_fixture, name: str, kv_block_size: int) -> None:
    original, paged, _ = paged_fixture(name, kv_block_size)
    ref = np.load(FIXTURES / name / "reference.npz")
    names = json.loads((FIXTURES / name / "manifest.json").read_text())["scenario"]["sequences"]
    tolerance = json.loads((FIXTURES / "INDEX.json").read_text())["tolerance_used_for_flags"]
    scenario = reference_scenario(ref, names)
    for script in scenario.sequences:  # our chunking reproduces the fixture's inputs exactly
        rows = prefill_rows(script, scenario.chunk_len)
        assert np.array_equal(
            np.stack([r.position_ids for r in rows]), ref[f"{script.name}_prefill_position_ids"][:, 0]
        )
        assert np.array_equal(
            np.stack([r.input_ids for r in rows]), ref[f"{script.name}_prefill_input_ids"][:, 0]
        )

    num_blocks = 1 + 2 * (CTX_LEN // kv_block_size) + 2
    manager = BlockManager(num_blocks, kv_block_size, shuffled_order(num_blocks, seed=kv_block_size))
    paged_runner = PagedRunner(paged, manager, CTX_LEN // kv_block_size)
    steps = drive([ContiguousRunner(original, {"ctx_len": CTX_LEN}), paged_runner], scenario)

    per_sequence: dict[str, list[np.ndarray]] = defaultdict(list)
    for step in steps:
        want, got = step.logits
        assert np.array_equal(want, got), f"step {step.index} ({step.kind}) is not bit-exact"
        for row, seq in enumerate(step.sequences):
            per_sequence[seq].append(got[row])
    assert all(not r.foreign_blocks_changed for r in paged_runner.isolation)
    assert any(len(s.sequences) == 2 for s in steps), "decode must interleave both sequences in one batch"

    for s in names:
        logits = np.stack(per_sequence[s])
        # The corpus ran each sequence alone (batch 1): another batch composition, so a tolerance.
        assert np.abs(logits - ref[f"{s}_ort_logits"]).max() <= 1e-5
        assert np.array_equal(logits.argmax(-1), ref[f"{s}_ort_logits"].argmax(-1))
        faithful = ref[f"{s}_original_matches_hf"]
        target = np.where(faithful[:, None], ref[f"{s}_hf_logits"], ref[f"{s}_ort_logits"])
        assert np.abs(logits - target).max() <= tolerance
        assert np.array_equal(logits[faithful].argmax(-1), ref[f"{s}_hf_argmax"][faithful])
