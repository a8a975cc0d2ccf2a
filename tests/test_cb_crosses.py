"""Continuous batching crossed with subfunctions and sliding-window rings (issue 9), run the way
``test_cb_blockedkv.py`` runs CB × BlockedKV: the builder makes each cross (the corpus has none),
the rewrite pages it at block sizes 16 and 32, and original and paged model go in lockstep through
a CB serving scenario (interleaved padded prefill chunks, then decode in a 4-row batch with idle
rows) in one shared shuffled pool. Logits must match bit for bit at every step, no foreign block
may change, and the report must say what the rewrite did. Each half alone runs the same way, as a
control, and so does everything at once (CB × subfunctions × ring × BlockedKV).

The ring is 24 slots long, a multiple of neither page size: prompts stay shorter than the ring
(the originals write padding into the ring's last slot, see README) and decode wraps it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import pytest

from paged_rewrite import rewrite
from paged_rewrite.builder import ExportSpec, build_qeff_export
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import Runner, Scenario, SequenceScript, drive
from paged_rewrite.runtime.geometry import PagedGeometry
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner
from paged_rewrite.runtime.verify import verify

CTX_LEN = 128
FULL_BATCH_SIZE = 4
WINDOW = 24
LAYER_DOMAIN = "QEfficient.transformers.models.llama.modeling_llama"
# A's second 16-token chunk is padded and, at page size 16, starts a new page; both prompts are
# shorter than the ring, and 24 decode steps wrap it (A ends at position 44, B at 32).
PROMPTS = {"A": 21, "B": 9}
CHUNK_LEN = 16
NUM_DECODE = 24
DECODE_ROWS = [None, "A", None, "B"]
DIMS = {"ctx_len": CTX_LEN, "full_batch_size": FULL_BATCH_SIZE, "sliding_window": WINDOW}

CB: dict[str, Any] = {"continuous_batching": True}
SUB: dict[str, Any] = {"subfunctions": True}
RING: dict[str, Any] = {"sliding_window": WINDOW}
KINDS: dict[str, dict[str, Any]] = {
    "cb_subfunctions": CB | SUB,
    "cb_ring": CB | RING,
    "subfunctions_ring": SUB | RING,
    "cb_subfunctions_ring_blockedkv": CB | SUB | RING | {"blocked_kv_num_blocks": 3},
    "cb": CB,
    "subfunctions": SUB,
    "ring": RING,
}


def _scenario(seed: int) -> Scenario:
    rng = np.random.default_rng(seed)
    scripts = [
        SequenceScript(name, rng.integers(0, 256, size=n).astype(np.int64), NUM_DECODE)
        for name, n in PROMPTS.items()
    ]
    return Scenario(scripts, chunk_len=CHUNK_LEN, decode_rows=DECODE_ROWS)


def _ops(model: onnx.ModelProto) -> Counter[str]:
    """Op types of the main graph and every function body."""
    return Counter(n.op_type for body in [model.graph, *model.functions] for n in body.node)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kind built once (weights of one seed), plus the plain decode graph as a reference."""
    folder = tmp_path_factory.mktemp("cb_crosses")
    paths = {}
    for name, kind in {**KINDS, "plain": {}}.items():
        paths[name] = folder / f"{name}.onnx"
        onnx.save(build_qeff_export(ExportSpec(seed=3, **kind)), paths[name])
    return paths


def test_builder_emits_layer_functions_and_ring(exports: dict[str, Path]) -> None:
    """The crosses look like QEfficient's exports: one shared function per layer kind, called once
    per layer, cache ops only inside it; layer 0's cache a ring of symbolic length."""
    model = onnx.load(exports["cb_subfunctions"])
    onnx.checker.check_model(model, full_check=True)
    layer_fn = model.functions[0]
    assert (layer_fn.domain, layer_fn.name) == (LAYER_DOMAIN, "QEffLlamaDecoderLayer")
    assert layer_fn.input[:7] == [
        "hidden_states", "cos_cached", "sin_cached", "past_key.0", "batch_index", "position_ids", "past_value.0",
    ]  # fmt: skip
    assert layer_fn.output[:2] == ["past_key.0_InternalRetainedState", "past_value.0_InternalRetainedState"]
    assert Counter(n.op_type for n in layer_fn.node)["CtxScatterCB"] == 2
    calls = [n for n in model.graph.node if n.domain == LAYER_DOMAIN]
    assert [n.output[0] for n in calls] == ["past_key.0_RetainedState", "past_key.1_RetainedState"]
    assert not [n for n in model.graph.node if n.op_type.startswith("Ctx")]

    model = onnx.load(exports["cb_subfunctions_ring_blockedkv"])
    onnx.checker.check_model(model, full_check=True)
    assert [f.name for f in model.functions if f.domain == LAYER_DOMAIN] == [
        "QEffLlamaSlidingDecoderLayer",
        "QEffLlamaDecoderLayer",
    ]
    shapes = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert shapes["past_key.0"] == ["full_batch_size", 2, "sliding_window", 16]
    assert shapes["past_value.1"] == ["full_batch_size", 2, "ctx_len", 16]
    assert {p.key: p.value for p in model.metadata_props} == {"paged_rewrite.builder.sliding_window": "24"}
    for name, kind in KINDS.items():  # deterministic
        again = build_qeff_export(ExportSpec(seed=3, **kind)).SerializeToString()
        assert again == exports[name].read_bytes(), name


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("kv_block_size", [16, 32])
def test_paged_matches_original(
    exports: dict[str, Path], tmp_path: Path, kind: str, kv_block_size: int
) -> None:
    spec = KINDS[kind]
    ring = "sliding_window" in spec
    paged = tmp_path / "paged.onnx"
    report = rewrite(exports[kind], paged, kv_block_size, ctx_len=CTX_LEN, dims=RING if ring else None)
    onnx.checker.check_model(str(paged), full_check=True)
    before, after = _ops(onnx.load(exports[kind])), _ops(onnx.load(paged))
    assert not [op for op in after if op.startswith("Ctx")], after
    write_op = "CtxScatterCB" if spec.get("continuous_batching") else "CtxScatter"
    assert report.rewritten[f"{write_op} -> PagedCtxScatter"] == before[write_op]
    assert report.windows == ({"sliding_window": WINDOW} if ring else {})
    layer_functions = ["QEffLlamaDecoderLayer"]
    if ring:
        layer_functions.insert(0, "QEffLlamaSlidingDecoderLayer")
    assert report.functions == (layer_functions if spec.get("subfunctions") else [])

    needed = sum(-(-(n + NUM_DECODE) // kv_block_size) for n in PROMPTS.values())
    num_blocks = 1 + needed + 3  # spare blocks that must stay untouched
    order = shuffled_order(num_blocks, seed=kv_block_size)
    # the ring has its own table (block_table_w32): the full manager wraps no ring
    manager = BlockManager(
        num_blocks, kv_block_size, order, ring_lengths=PagedGeometry.of(paged).ring_lengths
    )
    paged_runner = PagedRunner(paged, manager, CTX_LEN // kv_block_size)
    slots: dict[Hashable, int] = {name: DECODE_ROWS.index(name) for name in PROMPTS}
    reference = ContiguousRunner(exports["ring" if ring else "plain"], DIMS)
    runners: list[Runner] = [
        ContiguousRunner(exports[kind], DIMS, slots),
        paged_runner,
        reference,
    ]
    steps = drive(runners, _scenario(seed=kv_block_size))

    for step in steps:
        want, got, same_model = step.logits
        for row, seq in enumerate(step.sequences):
            if seq:  # idle rows carry no sequence and meaningless logits
                assert np.array_equal(want[row], got[row]), f"step {step.index} ({step.kind}) row {seq}"
                # The kind changes how the cache is laid out and addressed, not what the model computes.
                np.testing.assert_allclose(want[row], same_model[row], rtol=0, atol=1e-5)
    assert [r.foreign_blocks_changed for r in paged_runner.isolation] == [[]] * len(steps)
    assert sum(step.kind == "decode" for step in steps) == NUM_DECODE


@pytest.mark.parametrize(
    "kind",
    ["cb", "cb_ring", "cb_subfunctions"],
)
def test_cb_rewrite_removes_batch_index(exports: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """The paged interface has no ``batch_index``: the table row identifies the sequence."""
    paged = tmp_path / "paged.onnx"
    dims = RING if "sliding_window" in KINDS[kind] else None
    report = rewrite(exports[kind], paged, 16, ctx_len=CTX_LEN, dims=dims)
    assert report.removed_inputs == ["batch_index"]
    assert "batch_index" not in [i.name for i in onnx.load(paged).graph.input]


def test_ring_is_a_window(exports: dict[str, Path]) -> None:
    """The ring layer attends over the window only: the ring export agrees with the plain one
    while every position is inside the window, and departs from it once decode wraps the ring."""
    steps = drive([ContiguousRunner(exports[k], DIMS) for k in ("ring", "plain")], _scenario(seed=0))
    for step in steps:
        rows = [row for row, seq in enumerate(step.sequences) if seq]  # idle rows are meaningless
        ring, plain = step.logits[0][rows], step.logits[1][rows]
        if step.kind != "decode":
            np.testing.assert_allclose(ring, plain, rtol=0, atol=1e-5)
    assert (np.abs(ring - plain).max(axis=-1) > 1e-3).all()  # the last step: every row departs


@pytest.mark.parametrize("kind", [SUB, RING, SUB | RING, CB | SUB | RING])
def test_prefill_only_crosses_rewrite(tmp_path: Path, kind: dict[str, Any]) -> None:
    """The prefill graph of disaggregated serving combines with both, and pages."""
    source = tmp_path / "prefill.onnx"
    onnx.save(build_qeff_export(ExportSpec(seed=3, prefill_only=True, **kind)), source)
    onnx.checker.check_model(str(source), full_check=True)
    dims = RING if "sliding_window" in kind else None  # a dim the model lacks is refused
    report = rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=CTX_LEN, dims=dims)
    onnx.checker.check_model(str(tmp_path / "paged.onnx"), full_check=True)
    assert report.windows == ({"sliding_window": WINDOW} if "sliding_window" in kind else {})
    assert not [op for op in _ops(onnx.load(tmp_path / "paged.onnx")) if op.startswith("Ctx")]


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="num_layers >= 2"):
        ExportSpec(sliding_window=24, num_layers=1)
    with pytest.raises(ValueError, match="must be a bool"):
        ExportSpec(subfunctions=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sliding_window must be >= 0"):
        ExportSpec(sliding_window=-1)


@pytest.mark.parametrize("kind", ["cb_subfunctions", "cb_subfunctions_ring_blockedkv"])
def test_verify_runs_originals_with_sentinels_inside_layer_functions(
    exports: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    """QEfficient keeps the CB write and BlockedKV read sentinels inside the layer function; the
    runtime must still run such an original in onnxruntime (it inlines the layer functions)."""
    paged = tmp_path / "paged.onnx"
    rewrite(exports[kind], paged, 16, ctx_len=CTX_LEN, dims=RING if "ring" in kind else None)
    report = verify(exports[kind], paged)
    assert report.ok and report.max_abs_diff == 0.0, report.summary()
