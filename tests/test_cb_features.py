"""Continuous batching crossed with compute-context-length (CCL) and the speculative-decoding
target model (TLM) (issue 9), checked the way ``test_cb_crosses.py`` checks the other crosses.

The corpus has ``llama_ccl`` and ``llama_tlm`` but no CB export of either, so the builder makes
them, wired as those exports are: CCL slices the mask to the first ``L = len(comp_ctx_lengths)``
slots and reads those slots only (``comp_ctx_len``, the gathers' last operand); TLM returns the
logits of each row's last ``n = len(num_logits_to_keep)`` positions. Each kind is paged at block
sizes 16 and 32 and driven in lockstep with its original through a CB serving scenario
(interleaved padded prefill chunks, then decode in a 4-row batch with idle rows) in one shared,
shuffled pool, the extra inputs fed by ``ExtraInputs``: ``comp_ctx_lengths`` follows a
``CompCtxSchedule`` whose length changes as the sequences grow (20 to 56 slots, each read ending
inside a page), TLM decode steps carry 4 tokens and keep 4 rows. Logits must match bit for bit
on every kept row, no foreign block may change, the final KV must be equal, and ``verify`` must
pass. CCL and TLM alone run the same way as controls, and so does everything at once
(CB × subfunctions × ring × CCL × TLM).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import feature_fixture_model

from paged_rewrite import rewrite
from paged_rewrite.builder import ExportSpec, build_qeff_export
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import Runner, Scenario, SequenceScript, Step, drive, prefill_rows
from paged_rewrite.runtime.extra_inputs import CompCtxSchedule, ExtraInputs
from paged_rewrite.runtime.geometry import PagedGeometry
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner
from paged_rewrite.runtime.verify import final_kv_diff, verify

CTX_LEN = 128
FULL_BATCH_SIZE = 4
WINDOW = 24
VOCAB = 256
# Prompts shorter than the ring (its originals write chunk padding into the ring's last slot);
# A's second 16-token chunk is padded. 32 decode tokens per sequence, one per step or (TLM) four:
# A ends at position 52, B at 40; decode wraps the 24-slot ring.
PROMPTS = {"A": 21, "B": 9}
CHUNK_LEN = 16
DECODE_TOKENS = 32
TLM_WIDTH = 4
DECODE_ROWS = [None, "A", None, "B"]
DIMS = {"ctx_len": CTX_LEN, "full_batch_size": FULL_BATCH_SIZE, "sliding_window": WINDOW}
# QEfficient's generate() picks the smallest length that covers the step. Prefill chunks get 20
# and 40 slots, decode batches (A's position leads) 24, 40, then 56: none is a multiple of 16, so
# every read ends inside a page at both block sizes.
SCHEDULE = CompCtxSchedule(prefill=(20, 40, 96), decode=(24, 40, 56, 128))
EXTRAS = ExtraInputs(comp_ctx_lengths=SCHEDULE)

CB: dict[str, Any] = {"continuous_batching": True}
CCL: dict[str, Any] = {"ccl": True}
TLM: dict[str, Any] = {"num_logits_to_keep": True}
KINDS: dict[str, dict[str, Any]] = {
    "cb_ccl": CB | CCL,
    "cb_tlm": CB | TLM,
    "cb_ccl_tlm": CB | CCL | TLM,
    "cb_subfunctions_ring_ccl_tlm": CB | CCL | TLM | {"subfunctions": True, "sliding_window": WINDOW},
    "ccl": CCL,
    "tlm": TLM,
}
REFERENCES: dict[str, dict[str, Any]] = {"plain": {}, "ring": {"sliding_window": WINDOW}}


def _ring(kind: str) -> bool:
    return "sliding_window" in KINDS[kind]


def _ring_dims(kind: str) -> dict[str, int] | None:
    """The window to bind, for the kinds that have one (a dim the model lacks is refused)."""
    return {"sliding_window": WINDOW} if _ring(kind) else None


def _scenario(kind: str, seed: int) -> Scenario:
    """The CB scenario; a TLM's decode steps carry 4 teacher-forced tokens (draft tokens to verify)."""
    width = TLM_WIDTH if KINDS[kind].get("num_logits_to_keep") else 1
    rng = np.random.default_rng(seed)
    scripts = []
    for name, n in PROMPTS.items():
        prompt = rng.integers(0, VOCAB, size=n).astype(np.int64)
        tokens = rng.integers(0, VOCAB, size=(DECODE_TOKENS // width, width)).astype(np.int64)
        scripts.append(SequenceScript(name, prompt, len(tokens), tokens if width > 1 else tokens[:, 0]))
    return Scenario(scripts, chunk_len=CHUNK_LEN, decode_rows=DECODE_ROWS)


def _ops(model: onnx.ModelProto) -> Counter[str]:
    """Op types of the main graph and every function body."""
    return Counter(n.op_type for body in [model.graph, *model.functions] for n in body.node)


def _shapes(model: onnx.ModelProto) -> dict[str, list[str | int]]:
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }


def _path(body: onnx.GraphProto | onnx.FunctionProto, value: str, source: str) -> list[str]:
    """Op types on the shortest producer path from ``value`` up to ``source`` (a body input)."""
    producers = {out: node for node in body.node for out in node.output}
    queue: deque[tuple[str, list[str]]] = deque([(value, [])])
    while queue:
        name, ops = queue.popleft()
        if name == source:
            return ops
        node = producers.get(name)
        if node is not None:
            queue.extend((i, [*ops, node.op_type]) for i in node.input if i)
    raise AssertionError(f"{value} does not depend on {source}")


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each kind built once (weights of one seed), plus the references without the features."""
    folder = tmp_path_factory.mktemp("cb_features")
    paths = {}
    for name, kind in {**KINDS, **REFERENCES}.items():
        paths[name] = folder / f"{name}.onnx"
        onnx.save(build_qeff_export(ExportSpec(seed=3, **kind)), paths[name])
    return paths


def test_builder_wires_ccl_and_tlm_as_qeff(exports: dict[str, Path]) -> None:
    """Inputs in QEfficient's order; only their lengths are read; every full-context gather's
    ``comp_ctx_len`` is the length of the mask cut to ``len(comp_ctx_lengths)`` slots, and that
    cut mask is the one attention applies; a ring layer's gather is not bounded."""
    model = onnx.load(exports["cb_ccl_tlm"])
    onnx.checker.check_model(model, full_check=True)
    shapes = _shapes(model)
    assert list(shapes)[6:9] == ["batch_index", "comp_ctx_lengths", "num_logits_to_keep"]
    assert shapes["comp_ctx_lengths"] == ["comp_ctx_lengths"]
    assert shapes["num_logits_to_keep"] == ["num_logits_to_keep", 1]
    assert shapes["logits"] == ["batch_size", "num_logits_to_keep", VOCAB]
    for extra in ("comp_ctx_lengths", "num_logits_to_keep"):
        assert {n.op_type for n in model.graph.node if extra in n.input} == {"Shape"}
    gathers = [n for n in model.graph.node if n.op_type == "CtxGatherCB"]
    assert len(gathers) == 4
    for gather in gathers:
        assert _path(model.graph, gather.input[3], "comp_ctx_lengths") == [
            "Gather", "Shape", "Slice", "Unsqueeze", "Gather", "Shape",
        ]  # fmt: skip
    producers = {node.output[0]: node for node in model.graph.node}
    masked = [producers[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"]  # the scores
    assert [n.op_type for n in masked] == ["Where", "Where"]
    assert [_path(model.graph, n.input[0], "comp_ctx_lengths")[0] for n in masked] == ["Slice", "Slice"]

    model = onnx.load(exports["cb_subfunctions_ring_ccl_tlm"])
    onnx.checker.check_model(model, full_check=True)
    sliding, full = (f for f in model.functions if f.name.endswith("DecoderLayer"))
    assert "comp_ctx_lengths" not in sliding.input  # the ring is read whole
    gather = next(n for n in full.node if n.op_type == "CtxGatherCB")
    assert _path(full, gather.input[3], "comp_ctx_lengths")[:3] == ["Gather", "Shape", "Slice"]
    call = next(n for n in model.graph.node if n.op_type == full.name)
    assert "comp_ctx_lengths" in call.input

    for name, kind in KINDS.items():  # deterministic
        again = build_qeff_export(ExportSpec(seed=3, **kind)).SerializeToString()
        assert again == exports[name].read_bytes(), name
    off = ExportSpec(ccl=False, num_logits_to_keep=False)
    assert build_qeff_export(off).SerializeToString() == build_qeff_export().SerializeToString()


@pytest.mark.parametrize(("fixture", "kind"), [("llama_ccl", "ccl"), ("llama_tlm", "tlm")])
def test_builder_reads_the_inputs_as_the_real_exports(
    exports: dict[str, Path], fixture: str, kind: str
) -> None:
    """The same operand wiring as QEfficient's own exports of the features."""
    real = onnx.load(feature_fixture_model(fixture), load_external_data=False)
    ours = onnx.load(exports[kind])
    extra = "comp_ctx_lengths" if kind == "ccl" else "num_logits_to_keep"
    for model in (real, ours):
        assert _shapes(model)[extra] == _shapes(real)[extra]
        assert {n.op_type for n in model.graph.node if extra in n.input} == {"Shape"}
        assert [f.name for f in model.functions if f.name.startswith("Ctx")] == ["CtxScatter", "CtxGather"]
    if kind == "ccl":
        paths = [
            _path(model.graph, n.input[2], extra)
            for model in (real, ours)
            for n in model.graph.node
            if n.op_type == "CtxGather"
        ]
        assert len(paths) == 8 and all(p == paths[0] for p in paths), paths


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("kv_block_size", [16, 32])
def test_paged_matches_original(
    exports: dict[str, Path], tmp_path: Path, kind: str, kv_block_size: int
) -> None:
    spec = KINDS[kind]
    tlm = bool(spec.get("num_logits_to_keep"))
    paged = tmp_path / "paged.onnx"
    report = rewrite(exports[kind], paged, kv_block_size, ctx_len=CTX_LEN, dims=_ring_dims(kind))
    onnx.checker.check_model(str(paged), full_check=True)
    before, after = _ops(onnx.load(exports[kind])), _ops(onnx.load(paged))
    assert not [op for op in after if op.startswith("Ctx")], after
    read_op = "CtxGatherCB" if spec.get("continuous_batching") else "CtxGather"
    assert report.rewritten[f"{read_op} -> PagedCtxGather"] == before[read_op]
    assert report.removed_inputs == (["batch_index"] if spec.get("continuous_batching") else [])
    shapes = _shapes(onnx.load(paged))
    for extra in ("comp_ctx_lengths", "num_logits_to_keep"):
        assert (extra in shapes) == (extra in _shapes(onnx.load(exports[kind])))
    assert shapes["logits"][1] == ("num_logits_to_keep" if tlm else 1)

    scenario = _scenario(kind, seed=kv_block_size)
    needed = sum(-(-s.length // kv_block_size) for s in scenario.sequences)
    num_blocks = 1 + needed + 3  # spare blocks that must stay untouched
    order = shuffled_order(num_blocks, seed=kv_block_size)
    # a ring has its own table (block_table_w32): the full manager wraps no ring
    manager = BlockManager(
        num_blocks, kv_block_size, order, ring_lengths=PagedGeometry.of(paged).ring_lengths
    )
    paged_runner = PagedRunner(paged, manager, CTX_LEN // kv_block_size, DIMS, EXTRAS)
    slots: dict[Hashable, int] = {name: DECODE_ROWS.index(name) for name in PROMPTS}
    original = ContiguousRunner(exports[kind], DIMS, slots, EXTRAS)
    reference = ContiguousRunner(exports["ring" if _ring(kind) else "plain"], DIMS)
    runners: list[Runner] = [original, paged_runner, reference]
    steps = drive(runners, scenario)

    for step in steps:
        want, got, same_model = step.logits
        assert want.shape == got.shape
        if tlm and step.kind == "decode":  # every token's row is kept
            assert got.shape == (FULL_BATCH_SIZE, TLM_WIDTH, VOCAB)
        else:
            assert got.shape == (len(step.sequences), VOCAB)
        for row, seq in enumerate(step.sequences):
            if seq:  # idle rows carry no sequence and meaningless logits
                assert np.array_equal(want[row], got[row]), f"step {step.index} ({step.kind}) row {seq}"
                # With a context that covers the step, CCL reads what the plain model reads, and
                # TLM's last kept row is the plain model's only one.
                last = want[row].reshape(-1, VOCAB)[-1]
                np.testing.assert_allclose(last, same_model[row], rtol=0, atol=1e-5)
    assert [r.foreign_blocks_changed for r in paged_runner.isolation] == [[]] * len(steps)
    assert sum(step.kind == "decode" for step in steps) == DECODE_TOKENS // (TLM_WIDTH if tlm else 1)
    assert final_kv_diff(original, paged_runner, scenario) == 0.0


@pytest.mark.parametrize(("kind", "lengths"), [("cb_ccl", {20, 24, 40, 56}), ("cb_tlm", {20, 40, 56})])
def test_the_schedule_changes_the_compute_context(kind: str, lengths: set[int]) -> None:
    """The lengths the scenarios' calls get (decode: the batch's, A leading)."""
    scenario = _scenario(kind, seed=0)
    fed = {
        SCHEDULE.length("prefill", [row]) for s in scenario.sequences for row in prefill_rows(s, CHUNK_LEN)
    }
    steps = max(s.num_decode for s in scenario.sequences)
    fed |= {SCHEDULE.length("decode", [s.decode_row(t, 0) for s in scenario.sequences]) for t in range(steps)}
    assert fed == lengths


@pytest.mark.parametrize("kind", ["cb_ccl", "ccl"])
def test_a_short_compute_context_is_honoured(exports: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """CCL lengths too short for the step (16 slots, always): the original attends over its first
    16 slots only, and so must the paged model, bit for bit — a paged read that ignored
    ``comp_ctx_len`` would agree with the plain model instead."""
    paged = tmp_path / "paged.onnx"
    rewrite(exports[kind], paged, 16, ctx_len=CTX_LEN)
    short = ExtraInputs(comp_ctx_lengths=CompCtxSchedule((16,), (16,)))
    scenario = _scenario(kind, seed=5)
    manager = BlockManager(16, 16, shuffled_order(16, seed=5))
    paged_runner = PagedRunner(paged, manager, CTX_LEN // 16, DIMS, short)
    slots: dict[Hashable, int] = {name: DECODE_ROWS.index(name) for name in PROMPTS}
    runners: list[Runner] = [
        ContiguousRunner(exports[kind], DIMS, slots, short),
        paged_runner,
        ContiguousRunner(exports["plain"], DIMS),
    ]
    steps = drive(runners, scenario)
    for step in steps:
        for row, seq in enumerate(step.sequences):
            if seq:
                assert np.array_equal(step.logits[0][row], step.logits[1][row]), f"step {step.index} {seq}"
    final = steps[-1]
    rows = [row for row, seq in enumerate(final.sequences) if seq]
    assert (np.abs(final.logits[0][rows] - final.logits[2][rows]).max(axis=-1) > 1e-3).all()
    assert [r.foreign_blocks_changed for r in paged_runner.isolation] == [[]] * len(steps)


def _decode_rows_by_position(
    steps: list[Step], runner: int, start: dict[str, int]
) -> dict[tuple[str, int], Any]:
    """``(sequence, position) -> logits row`` of every decode step's kept rows."""
    rows: dict[tuple[str, int], Any] = {}
    for step in (s for s in steps if s.kind == "decode"):
        logits = step.logits[runner]
        for row, seq in enumerate(step.sequences):
            if seq:
                for kept in logits[row].reshape(-1, VOCAB):
                    rows[(seq, start[seq])] = kept
                    start[seq] += 1
    return rows


@pytest.mark.parametrize("kind", ["cb_tlm", "tlm"])
def test_tlm_keeps_the_last_positions(exports: dict[str, Path], kind: str) -> None:
    """A TLM decode step of 4 tokens returns, row by row, the logits the plain model gives when
    it is fed the same tokens one at a time: the last ``n`` positions, in order."""
    tlm_scenario = _scenario(kind, seed=7)
    one_by_one = Scenario(
        [
            SequenceScript(s.name, s.prompt, DECODE_TOKENS, np.asarray(s.decode_tokens).reshape(-1))
            for s in tlm_scenario.sequences
        ],
        chunk_len=CHUNK_LEN,
        decode_rows=DECODE_ROWS,
    )
    slots: dict[Hashable, int] = {name: DECODE_ROWS.index(name) for name in PROMPTS}
    tlm_steps = drive([ContiguousRunner(exports[kind], DIMS, slots)], tlm_scenario)
    plain_steps = drive([ContiguousRunner(exports["plain"], DIMS)], one_by_one)
    tlm_rows = _decode_rows_by_position(tlm_steps, 0, dict(PROMPTS))
    plain_rows = _decode_rows_by_position(plain_steps, 0, dict(PROMPTS))
    assert sorted(tlm_rows) == sorted(plain_rows) and len(tlm_rows) == 2 * DECODE_TOKENS
    for key, row in tlm_rows.items():
        np.testing.assert_allclose(row, plain_rows[key], rtol=0, atol=1e-5, err_msg=str(key))


@pytest.mark.parametrize("kind", list(KINDS))
def test_verify_passes(exports: dict[str, Path], tmp_path: Path, kind: str) -> None:
    """``verify`` feeds the CCL lengths and TLM's 4-token steps by itself."""
    paged = tmp_path / "paged.onnx"
    rewrite(exports[kind], paged, 32, ctx_len=CTX_LEN, dims=_ring_dims(kind))
    report = verify(exports[kind], paged)
    assert report.ok, report.summary()
    assert report.max_abs_diff == 0.0 and report.kv_max_abs_diff == 0.0
    assert any(len([s for s in step.sequences if s]) == 2 for step in report.steps)


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match=r"ccl bounds a whole-context read.*prefill_only"):
        ExportSpec(ccl=True, prefill_only=True)
    with pytest.raises(ValueError, match=r"ccl bounds a whole-context read.*blocked_kv_num_blocks"):
        ExportSpec(ccl=True, blocked_kv_num_blocks=4)
    with pytest.raises(ValueError, match="must be a bool"):
        ExportSpec(num_logits_to_keep=1)  # type: ignore[arg-type]
    ExportSpec(num_logits_to_keep=True, prefill_only=True, blocked_kv_num_blocks=0)
