"""Continuous batching × BlockedKV (issue 9): QEfficient reads a blocked cache with
``CtxGatherBlockedKVCB`` when ``continuous_batching=True``. The corpus has no such export, so the
builder makes one; its rewrite must be bit-exact against the original in a CB serving scenario
(interleaved padded prefill chunks, then decode in a 4-row batch with idle rows), in one shared
shuffled pool, with no isolation breach. Plain BlockedKV and plain CB from the same builder are
run the same way, so a failure points at the cross and not at either half.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from paged_rewrite import rewrite
from paged_rewrite.builder import ExportSpec, build_qeff_export
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import Scenario, SequenceScript, drive
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner

CTX_LEN = 128
FULL_BATCH_SIZE = 4
QEFF = "com.qualcomm.cloud"
# Prompts of 45 and 9 tokens in 32-token chunks: the first chunk of A crosses a 16-token page,
# its second chunk is padded. Decode runs A and B in cache rows 1 and 3 of 4 (rows 0 and 2 idle).
PROMPTS = {"A": 45, "B": 9}
NUM_DECODE = 24
DECODE_ROWS = [None, "A", None, "B"]

KINDS = {
    "cb_blockedkv": {"continuous_batching": True, "blocked_kv_num_blocks": 4},
    "cb_blockedkv_uneven": {"continuous_batching": True, "blocked_kv_num_blocks": 3},  # blocks of 43
    "blockedkv": {"blocked_kv_num_blocks": 4},
    "cb": {"continuous_batching": True},
}


def _scenario(vocab_size: int, seed: int) -> Scenario:
    rng = np.random.default_rng(seed)
    scripts = [
        SequenceScript(name, rng.integers(0, vocab_size, size=n).astype(np.int64), NUM_DECODE)
        for name, n in PROMPTS.items()
    ]
    return Scenario(scripts, chunk_len=32, decode_rows=DECODE_ROWS)


def _ctx_ops(path: Path) -> Counter[str]:
    return Counter(n.op_type for n in onnx.load(path).graph.node if n.domain == QEFF)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kind built once (weights of one seed), plus the plain decode graph as the reference."""
    folder = tmp_path_factory.mktemp("cb_blockedkv")
    paths = {}
    for name, kind in {**KINDS, "plain": {}}.items():
        paths[name] = folder / f"{name}.onnx"
        onnx.save(build_qeff_export(ExportSpec(seed=3, **kind)), paths[name])
    return paths


def test_builder_emits_qeff_cb_blockedkv(exports: dict[str, Path]) -> None:
    path = exports["cb_blockedkv"]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(path)
    assert [f.name for f in model.functions] == ["CustomRMSNorm", "CtxScatterCB", "CtxGatherBlockedKVCB"]
    assert _ctx_ops(path) == {"CtxScatterCB": 4, "CtxGatherBlockedKVCB": 16}  # 2 layers × {K, V} × 4 blocks
    shapes = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert shapes["batch_index"] == ["batch_size", 1]
    assert shapes["past_key.0"] == ["full_batch_size", 2, "ctx_len", 16]
    assert list(shapes)[-1] == "batch_index"  # after the caches, as QEfficient orders them
    again = build_qeff_export(ExportSpec(seed=3, **KINDS["cb_blockedkv"]))
    assert again.SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("kv_block_size", [16, 32])
def test_paged_matches_original(
    exports: dict[str, Path], tmp_path: Path, kind: str, kv_block_size: int
) -> None:
    original = exports[kind]
    paged = tmp_path / "paged.onnx"
    report = rewrite(original, paged, kv_block_size, ctx_len=CTX_LEN)
    before, after = _ctx_ops(original), _ctx_ops(paged)
    assert not [op for op in after if op.startswith("Ctx")], after
    if KINDS[kind].get("blocked_kv_num_blocks"):
        read_op = "CtxGatherBlockedKVCB" if KINDS[kind].get("continuous_batching") else "CtxGatherBlockedKV"
        assert report.rewritten[f"{read_op} -> PagedCtxGather"] == before[read_op]
        assert after["PagedCtxGather"] == before[read_op]
        assert after["PagedReadIndex"] == KINDS[kind]["blocked_kv_num_blocks"]  # per block, all layers
    if KINDS[kind].get("continuous_batching"):
        assert report.removed_inputs == ["batch_index"]

    scenario = _scenario(256, seed=kv_block_size)
    needed = sum(-(-(n + NUM_DECODE) // kv_block_size) for n in PROMPTS.values())
    num_blocks = 1 + needed + 3  # spare blocks that must stay untouched
    manager = BlockManager(num_blocks, kv_block_size, shuffled_order(num_blocks, seed=kv_block_size))
    paged_runner = PagedRunner(paged, manager, CTX_LEN // kv_block_size)
    dims = {"ctx_len": CTX_LEN, "full_batch_size": FULL_BATCH_SIZE}
    slots = {name: DECODE_ROWS.index(name) for name in PROMPTS}
    reference = ContiguousRunner(exports["plain"], dims)
    steps = drive([ContiguousRunner(original, dims, slots), paged_runner, reference], scenario)

    for step in steps:
        want, got, plain = step.logits
        for row, seq in enumerate(step.sequences):
            if seq:  # idle rows carry no sequence and meaningless logits
                assert np.array_equal(want[row], got[row]), f"step {step.index} ({step.kind}) row {seq}"
                # The kind changes how the cache is addressed and read, not what the model computes.
                np.testing.assert_allclose(want[row], plain[row], rtol=0, atol=1e-5)
    assert [r.foreign_blocks_changed for r in paged_runner.isolation] == [[]] * len(steps)
    assert sum(step.kind == "decode" for step in steps) == NUM_DECODE
    assert all(step.sequences == ["", "A", "", "B"] for step in steps if step.kind == "decode")


def test_blocked_kv_needs_a_read() -> None:
    with pytest.raises(ValueError, match="prefill_only"):
        ExportSpec(prefill_only=True, blocked_kv_num_blocks=4)
    with pytest.raises(ValueError, match="must be a bool"):
        ExportSpec(continuous_batching=1)  # type: ignore[arg-type]
