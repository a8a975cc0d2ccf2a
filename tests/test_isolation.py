"""The isolation guarantee and the addressing contract of the paged ops, as property tests.

Whatever the inputs — random block tables with -1, duplicate and out-of-pool entries, random
slot_id, positions out of range or -1 — a write lands only in block 0 or in a block listed in
the writer's own block_table row; valid writes land at the contract's address; reads return the
contract's value: zeros for anything invalid and for the null block, whatever block 0 holds."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from contract import contract_writes, zero_rows_are_zero
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from paged_rewrite.custom_ops import PAGED_DOMAIN, paged_function_protos
from paged_rewrite.runtime.runners import foreign_changes, unexpected_writes

HEADS, HEAD_DIM = 2, 3


def _tensor(name: str, dtype: int, dims: list[str | int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


F, I64 = TensorProto.FLOAT, TensorProto.INT64
READ_INPUTS = [
    _tensor("pool", F, ["N", HEADS, "bs", HEAD_DIM]),
    _tensor("block_table", I64, ["B", "nb"]),
    _tensor("ctx_indices", I64, ["B", 1, "C"]),
    _tensor("comp_ctx_len", I64, []),
]


def _session(
    nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
):
    model = helper.make_model(
        helper.make_graph(nodes, "paged_ops", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(PAGED_DOMAIN, 1)],
        functions=paged_function_protos(),
        ir_version=8,
    )
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ops_session() -> ort.InferenceSession:
    """Each cache op as the rewrite emits it: the shared index op, then the per-cache data op;
    the read takes the write's output, as in every QEfficient export."""
    nodes = [
        helper.make_node(
            "PagedWriteIndex",
            ["pool", "block_table", "slot_id", "position_ids", "slot_period"],
            ["write_index", "zeros"],
            domain=PAGED_DOMAIN,
        ),
        helper.make_node(
            "PagedCtxScatter",
            ["pool", "write_index", "updates", "zeros"],
            ["new_pool"],
            domain=PAGED_DOMAIN,
        ),
        helper.make_node(
            "PagedReadIndexCCL",
            ["new_pool", "block_table", "ctx_indices", "comp_ctx_len"],
            ["rows", "row_shape"],
            domain=PAGED_DOMAIN,
        ),
        helper.make_node("PagedCtxGather", ["new_pool", "rows", "row_shape"], ["read"], domain=PAGED_DOMAIN),
    ]
    inputs = [
        *READ_INPUTS,
        _tensor("slot_id", I64, ["B"]),
        _tensor("position_ids", I64, ["B", "S"]),
        _tensor("updates", F, ["B", HEADS, "S", HEAD_DIM]),
        _tensor("slot_period", I64, []),
    ]
    outputs = [
        _tensor("new_pool", F, ["N", HEADS, "bs", HEAD_DIM]),
        _tensor("read", F, ["B", HEADS, "C", HEAD_DIM]),
    ]
    return _session(nodes, inputs, outputs)


SESSION = _ops_session()


def _address(table: np.ndarray, b: int, p: int, num_pool: int, bs: int) -> tuple[int, int] | None:
    if not 0 <= p < table.shape[1] * bs:
        return None
    entry = int(table[b, p // bs])
    return (entry, p % bs) if 0 <= entry < num_pool else None


@st.composite
def paged_inputs(draw: st.DrawFn) -> dict[str, np.ndarray]:
    bs = draw(st.sampled_from([2, 3, 4]))
    num_pool, batch, nb, seq = (
        draw(st.integers(2, 9)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 6)),
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    entries = [-1, *range(num_pool), num_pool, num_pool + 5, 2**31 - 1]
    positions = [-1, -7, nb * bs, 2**31 - 1, *range(nb * bs)]
    position_ids = rng.choice(positions, size=(batch, seq))
    slot_id = np.where(
        rng.random(batch) < 0.6, np.mod(position_ids[:, 0], bs), rng.integers(-2, bs + 2, batch)
    )
    return {
        "pool": rng.standard_normal((num_pool, HEADS, bs, HEAD_DIM)).astype(np.float32),
        "block_table": rng.choice(entries, size=(batch, nb)).astype(np.int64),
        "slot_id": slot_id.astype(np.int64),
        "position_ids": position_ids.astype(np.int64),
        "updates": rng.standard_normal((batch, HEADS, seq, HEAD_DIM)).astype(np.float32),
        "ctx_indices": rng.choice(positions, size=(batch, 1, nb * bs)).astype(np.int64),
        "comp_ctx_len": np.array(nb * bs, dtype=np.int64),
        "slot_period": np.array(draw(st.sampled_from([d for d in (1, 2, 4) if bs % d == 0])), dtype=np.int64),
    }


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(paged_inputs())
def test_writes_stay_in_own_blocks_and_land_at_the_contract_address(feeds: dict[str, np.ndarray]) -> None:
    new_pool, read = SESSION.run(None, feeds)
    pool, table, pos = feeds["pool"], feeds["block_table"], feeds["position_ids"]
    num_pool, bs = pool.shape[0], pool.shape[2]

    own = {int(e) for e in table.ravel() if 0 <= e < num_pool} | {0}
    assert foreign_changes(pool, new_pool, own) == []
    # The null block: invalid writes land on its row 0 only; its last row is the zero row.
    assert np.array_equal(new_pool[0, :, 1:-1], pool[0, :, 1:-1])
    assert (
        np.array_equal(new_pool[0, :, -1], np.zeros((HEADS, HEAD_DIM)))
        and not np.signbit(new_pool[0, :, -1]).any()
    )

    writes: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for b in range(pos.shape[0]):
        slot, period = int(feeds["slot_id"][b]), int(feeds["slot_period"])
        inside = [int(p) for p in pos[b] if 0 <= p < table.shape[1] * bs]
        if not (0 <= slot < bs and (not inside or slot % period == inside[0] % period)):
            continue  # broken slot_id: every write of the row goes to the null block
        for s in range(pos.shape[1]):
            address = _address(table, b, int(pos[b, s]), num_pool, bs)
            if address is not None:
                writes.setdefault(address, []).append((b, s))
    for (block, offset), sources in writes.items():
        if block != 0 and len(sources) == 1:
            b, s = sources[0]
            assert np.array_equal(new_pool[block, :, offset], feeds["updates"][b, :, s])
    untouched = np.ones(pool.shape[:1] + pool.shape[2:3], bool)
    untouched[0] = False
    for block, offset in writes:
        untouched[block, offset] = False
    assert np.array_equal(new_pool.transpose(0, 2, 1, 3)[untouched], pool.transpose(0, 2, 1, 3)[untouched])

    for b in range(pos.shape[0]):
        for k, p in enumerate(feeds["ctx_indices"][b, 0]):
            block, offset = _address(table, b, int(p), num_pool, bs) or (0, 0)
            want = new_pool[block, :, offset] if block != 0 else np.zeros((HEADS, HEAD_DIM), np.float32)
            assert np.array_equal(read[b, :, k], want)


def test_rewritten_model_keeps_rows_apart(paged_fixture) -> None:
    """Whole-model steps on a rewritten fixture with adversarial tables, slots and positions.

    Positions stay inside the model's own rope table (256 rows, which the original model
    indexes too); beyond the 128-token context they are out of range for the cache. Huge
    positions are covered at the op level above."""
    _, paged, _ = paged_fixture("llama_default", 16)
    session = ort.InferenceSession(str(paged), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    num_pool, nb, bs = 12, 8, 16
    for _ in range(40):
        batch, seq = int(rng.integers(1, 4)), int(rng.choice([1, 5, 32]))
        pools = {
            f"past_{kind}.{layer}": rng.standard_normal((num_pool, 2, bs, 16)).astype(np.float32)
            for kind in ("key", "value")
            for layer in range(2)
        }
        table = rng.choice([-1, *range(num_pool), num_pool + 3], size=(batch, nb)).astype(np.int64)
        feeds = {
            "input_ids": rng.integers(0, 256, (batch, seq)).astype(np.int64),
            "position_ids": rng.choice([-1, -7, 130, 255, *range(128)], size=(batch, seq)).astype(np.int64),
            "block_table": table,
            "slot_id": rng.integers(-1, bs + 1, batch).astype(np.int64),
            **pools,
        }
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        allowed = contract_writes(table, feeds["position_ids"], feeds["slot_id"], bs, num_pool)
        for name, before in pools.items():
            assert unexpected_writes(before, out[f"{name}_RetainedState"], allowed) == [], name
            assert zero_rows_are_zero(out[f"{name}_RetainedState"]), name


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -1e30])
def test_invalid_reads_are_exact_zeros_whatever_block_0_holds(garbage: float) -> None:
    """Padding, INT32_MAX sentinels, positions beyond the table, unallocated (-1), out-of-pool and
    null-block (0) entries all read +0.0 — not block 0's contents, which here are NaN, inf or
    huge in every row, the zero row included — while valid positions read their block. So a
    model need not mask V to stay finite."""
    pool = np.arange(5 * HEADS * 2 * HEAD_DIM, dtype=np.float32).reshape(5, HEADS, 2, HEAD_DIM) + 1
    pool[0] = garbage
    feeds = {
        "pool": pool,
        "block_table": np.array([[2, -1, 99, 0, 4]], np.int64),
        "slot_id": np.array([0], np.int64),
        "position_ids": np.array([[-1]], np.int64),  # padding: written to the null block only
        "updates": np.full((1, HEADS, 1, HEAD_DIM), garbage, np.float32),
        "ctx_indices": np.array([[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1, 10, 2**31 - 1, -7]]], np.int64),
        "comp_ctx_len": np.array(14, np.int64),
        "slot_period": np.array(2, np.int64),
    }
    new_pool, read = SESSION.run(None, feeds)
    assert np.array_equal(new_pool[1:], pool[1:])
    valid = {0: (2, 0), 1: (2, 1), 8: (4, 0), 9: (4, 1)}  # position -> (block, offset)
    for k, position in enumerate(feeds["ctx_indices"][0, 0]):
        if int(position) in valid:
            block, offset = valid[int(position)]
            assert np.array_equal(read[0, :, k], pool[block, :, offset]), position
        else:
            assert np.array_equal(read[0, :, k], np.zeros((HEADS, HEAD_DIM))), position
            assert not np.signbit(read[0, :, k]).any(), position


@pytest.mark.parametrize("comp_ctx_len", [1, 3, 6])
def test_gather_reads_comp_ctx_len_positions(comp_ctx_len: int) -> None:
    """``comp_ctx_len`` (QEfficient's compute-context length) bounds the read, and a single index
    per row is broadcast to it, as in ``CtxGather``."""
    rng = np.random.default_rng(comp_ctx_len)
    pool = rng.standard_normal((5, HEADS, 2, HEAD_DIM)).astype(np.float32)
    table = np.array([[3, 1, 4, -1]], np.int64)
    for indices in (np.arange(comp_ctx_len).reshape(1, 1, -1), np.array([[[2]]])):
        feeds = {
            "pool": pool, "block_table": table, "slot_id": np.array([0], np.int64),
            "position_ids": np.array([[-1]], np.int64), "updates": np.zeros((1, HEADS, 1, HEAD_DIM), np.float32),
            "ctx_indices": indices.astype(np.int64), "comp_ctx_len": np.array(comp_ctx_len, np.int64),
            "slot_period": np.array(2, np.int64),
        }  # fmt: skip
        new_pool, read = SESSION.run(None, feeds)
        assert read.shape == (1, HEADS, comp_ctx_len, HEAD_DIM)
        for k, position in enumerate(np.broadcast_to(indices[0, 0], (comp_ctx_len,))):
            block = table[0, position // 2]
            assert np.array_equal(read[0, :, k], new_pool[block, :, position % 2])


def test_slot_level_isolation_check_catches_a_write_into_another_rows_block() -> None:
    before = np.zeros((4, 1, 2, 1), np.float32)
    after = before.copy()
    after[2, 0, 1] = 1.0  # block 2, offset 1 changed
    assert unexpected_writes(before, after, {(2, 1)}) == []
    assert unexpected_writes(before, after, {(2, 0)}) == [2]  # the block is a row's, the slot is not
    after[0, 0, 0] = 1.0
    assert unexpected_writes(before, after, {(2, 1)}) == []  # the null block may change anywhere
