"""Hybrid models (issue 12): every ring length W gets its own table ``block_table_w<W>`` and pool
dim ``total_num_kv_blocks_w<W>``, so a sliding-window layer holds window-sized memory.

The gpt-oss fixtures alternate a 32-slot ring layer (layer 0, ``--dim sliding_window=32``) with a
full-context layer (layer 1). Expected shapes and sizes below are worked out by hand from the
contract: with ``kv_block_size`` 16 the ring needs ``ceil(32 / 16) = 2`` columns, the full
context of 128 needs 8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import feature_fixture_model, feature_manifest, fixture_model
from contract import adversarial_ring_call, contract_writes, zero_rows_are_zero

from paged_rewrite import rewrite
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import Scenario, SequenceScript, chunk_row, drive, random_scenario
from paged_rewrite.runtime.runners import (
    ContiguousRunner,
    PagedRunner,
    Row,
    agreed_prefix_hit,
    unexpected_writes,
)
from paged_rewrite.runtime.serving import Request, Server
from paged_rewrite.runtime.verify import verify

WINDOW = 32
CTX_LEN = 128
DIMS = {"sliding_window": WINDOW}


def _shapes(model: onnx.ModelProto) -> dict[str, list[str | int]]:
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }


def test_each_window_length_gets_its_own_table_and_pool(tmp_path: Path) -> None:
    out = tmp_path / "paged.onnx"
    rewrite(fixture_model("gpt_oss_swa_moe"), out, 16, ctx_len=CTX_LEN, dims={**DIMS, "batch_size": 4})
    model = onnx.load(out)
    shapes = _shapes(model)
    assert shapes["block_table"] == ["batch_size", "num_kv_blocks"]  # bound dims stay named
    assert shapes["block_table_w32"] == ["batch_size", 2]
    assert shapes["slot_id"] == ["batch_size"]
    for name in ("past_key.0", "past_value.0", "past_key.0_RetainedState", "past_value.0_RetainedState"):
        assert shapes[name] == ["total_num_kv_blocks_w32", 2, 16, 16], name
    for name in ("past_key.1", "past_value.1", "past_key.1_RetainedState", "past_value.1_RetainedState"):
        assert shapes[name] == ["total_num_kv_blocks", 2, 16, 16], name
    # Every index op reads a pool of its own group and that group's table: a window pool's block
    # count bounds the entries of the window table (the representative is the group's first pool).
    index_ops = {
        "PagedWriteIndex",
        "PagedReadIndex",
        "PagedReadIndexCCL",
        "PagedWindowShape",
        "PagedLogicalShape",
    }
    operands = {(n.op_type, n.input[0], n.input[1]) for n in model.graph.node if n.op_type in index_ops}
    assert operands == {
        ("PagedWriteIndex", "past_key.0", "block_table_w32"),
        ("PagedReadIndexCCL", "past_key.0", "block_table_w32"),
        ("PagedWindowShape", "past_key.0", "block_table_w32"),
        ("PagedWriteIndex", "past_key.1", "block_table"),
        ("PagedReadIndexCCL", "past_key.1", "block_table"),
        ("PagedLogicalShape", "past_key.1", "block_table"),
    }
    manifest = json.loads((tmp_path / "paged.onnx.json").read_text())
    assert manifest["groups"] == [
        {
            "table": "block_table",
            "num_kv_blocks": None,
            "pool_dim": "total_num_kv_blocks",
            "total_num_kv_blocks": None,
            "window": None,
            "window_addressing": None,
            "caches": ["past_key.1", "past_value.1"],
        },
        {
            "table": "block_table_w32",
            "num_kv_blocks": 2,
            "pool_dim": "total_num_kv_blocks_w32",
            "total_num_kv_blocks": None,
            "window": 32,
            "window_addressing": "ring",
            "caches": ["past_key.0", "past_value.0"],
        },
    ]
    # 4 rows: a full context of 8 blocks each (4 * 8 + 1) and a ring of 2 blocks each (4 * 2 + 1).
    entries = json.loads((tmp_path / "paged.specializations.json").read_text())["specializations"]
    assert {e["name"] for e in entries} >= {"prefill_ctx128", "decode_ctx16"}
    for entry in entries:
        assert entry["symbols"]["total_num_kv_blocks"] == "33"
        assert entry["symbols"]["total_num_kv_blocks_w32"] == "9"


def test_shared_window_table_keeps_the_single_table_layout(tmp_path: Path) -> None:
    out = tmp_path / "paged.onnx"
    rewrite(fixture_model("gpt_oss_swa_moe"), out, 16, ctx_len=CTX_LEN, dims=DIMS, shared_window_table=True)
    shapes = _shapes(onnx.load(out))
    assert not any(name.startswith("block_table_w") for name in shapes)
    for layer in (0, 1):
        assert shapes[f"past_key.{layer}"] == ["total_num_kv_blocks", 2, 16, 16]
    manifest = json.loads((tmp_path / "paged.onnx.json").read_text())
    assert manifest["flags"]["shared_window_table"] is True
    assert manifest["groups"] == [
        {
            "table": "block_table",
            "num_kv_blocks": None,
            "pool_dim": "total_num_kv_blocks",
            "total_num_kv_blocks": None,
            "window": None,
            "window_addressing": None,
            "caches": ["past_key.0", "past_value.0", "past_key.1", "past_value.1"],
        }
    ]
    assert manifest["windows"] == {"sliding_window": 32}
    report = verify(fixture_model("gpt_oss_swa_moe"), out, dims=DIMS)
    assert report.ok and report.bit_exact and report.window_num_blocks == {}


@pytest.mark.parametrize("kv_block_size", [16, 32])
def test_ring_groups_are_bit_exact_with_window_sized_pools(tmp_path: Path, kv_block_size: int) -> None:
    """verify's scenario (a 31- and a 7-token prompt, 16 decode steps: lengths 47 and 23) with the
    ring pools sized to the rings: a ring of ceil(32 / bs) blocks per sequence, at most as many
    as the sequence has, plus verify's 3 spare blocks and the null block."""
    out = tmp_path / "paged.onnx"
    rewrite(fixture_model("gpt_oss_swa_moe"), out, kv_block_size, ctx_len=CTX_LEN, dims=DIMS)
    report = verify(fixture_model("gpt_oss_swa_moe"), out, dims=DIMS)
    assert report.ok and report.bit_exact, report.summary()
    expected = {16: 1 + 2 + 2 + 3, 32: 1 + 1 + 1 + 3}[kv_block_size]
    assert report.window_num_blocks == {"block_table_w32": expected}
    # the single-table layout needs ceil(47/bs) + ceil(23/bs) blocks in every pool
    assert report.num_blocks == {16: 1 + 3 + 2 + 3, 32: 1 + 2 + 1 + 3}[kv_block_size]


@pytest.mark.parametrize("name", ["gpt_oss_kv_prefix", "gpt_oss_prefill_only"])
def test_feature_ring_groups_are_bit_exact(tmp_path: Path, name: str) -> None:
    """The other windowed exports of the corpora: ``_llm`` cache names, and a prefill-only graph
    whose ring layer writes the last 32 tokens in order (one 64-token chunk per sequence)."""

    original = feature_fixture_model(name)
    ctx_len = feature_manifest(name)["scenario"]["ctx_len"]
    out = tmp_path / "paged.onnx"
    report = rewrite(original, out, 16, ctx_len=ctx_len, dims=DIMS)
    assert report.added_inputs == ["block_table", "block_table_w32", "slot_id"]
    checked = verify(original, out, dims=DIMS)
    assert checked.ok and checked.bit_exact, checked.summary()
    assert list(checked.window_num_blocks) == ["block_table_w32"]


def test_ring_blocks_are_allocated_once_and_reused() -> None:
    manager = BlockManager(8, 16, window=WINDOW)
    manager.append("a", 10)
    assert len(manager.blocks_of("a")) == 1
    manager.append("a", 30)  # 40 positions: the ring's two blocks
    ring = manager.blocks_of("a")
    assert len(ring) == 2
    manager.append("a", 160)  # 200 positions: the ring turned six times over the same blocks
    assert manager.blocks_of("a") == ring
    assert manager.num_free_blocks == 7 - 2
    table = manager.block_table(["a", None], 2)
    assert table.tolist() == [ring, [-1, -1]]
    assert manager.slot_id(["a"]).tolist() == [200 % 16]
    # A fork shares the ring until it writes: position 200 is ring slot 8, column 0.
    manager.fork("a", "b")
    manager.prepare_write("b", 201)
    copies = manager.take_copies()
    assert len(copies) == 1 and copies[0][0] == ring[0]
    assert manager.blocks_of("b") == [copies[0][1], ring[1]]
    manager.free("a")
    manager.free("b")
    assert manager.num_free_blocks == 7


def test_adversarial_tables_on_every_group_stay_harmless(tmp_path: Path) -> None:
    """Garbage on both tables at once: -1, the null block, duplicates, entries past the window
    pool that are still inside the (larger) full pool, entries past both, wrong slot_ids, padding
    and out-of-range positions, NaN in both null blocks. In either group, no slot changes but
    block 0 and those the contract gives each row's own positions (ring slot ``p % 32`` through
    its ring table, a broken slot_id writing nothing), onnxruntime never sees an index out of range, and the
    well-formed row keeps finite logits."""
    out = tmp_path / "paged.onnx"
    rewrite(fixture_model("gpt_oss_swa_moe"), out, 16, ctx_len=CTX_LEN, dims=DIMS)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(12)
    full_pool, window_pool, bs = 24, 9, 16
    for _ in range(40):
        call = adversarial_ring_call(rng, bs, full_pool, CTX_LEN)
        pools = _random_pools(rng, window_pool, full_pool, bs)
        for pool in pools.values():
            pool[0] = np.nan
        positions, slot_id = call["position_ids"], call["slot_id"]
        ring, full = call["block_table_w32"], call["block_table"]
        feeds = {**call, **pools}
        got = dict(zip(names, session.run(None, feeds), strict=True))
        allowed = {
            # ring slot p % 32 through the row's own ring table, as the contract says for p
            "0": contract_writes(
                ring, np.where(positions >= 0, positions % WINDOW, -1), slot_id, bs, window_pool
            ),
            "1": contract_writes(full, positions, slot_id, bs, full_pool),
        }
        for name, before in pools.items():
            assert unexpected_writes(before, got[f"{name}_RetainedState"], allowed[name[-1]]) == [], name
            assert zero_rows_are_zero(got[f"{name}_RetainedState"]), name  # whatever block 0 held
        assert np.isfinite(got["logits"][0]).all(), "NaN leaked into the valid row"


def test_runner_flags_a_write_into_another_rows_ring_slot(tmp_path: Path) -> None:
    """The runner's own isolation check holds a ring group to the contract slot by slot: A and B
    decode positions 20, 21, 22, 23 (ring slots 20-23: column 1, offsets 4-7). A change at
    offset 12 of A's column-1 block — listed in A's ring table, but no row of the step writes
    it — is flagged, as is one in B's column-0 block at the step's offset; the real writes and a
    change in a slot the step writes are not."""
    out = tmp_path / "paged.onnx"
    rewrite(fixture_model("gpt_oss_swa_moe"), out, 16, ctx_len=CTX_LEN, dims=DIMS)
    rings = BlockManager(9, 16, shuffled_order(9, 2), window=WINDOW)
    paged = PagedRunner(out, BlockManager(12, 16), 8, DIMS, window_managers={"block_table_w32": rings})
    rng = np.random.default_rng(4)
    for name in ("A", "B"):
        prompt = rng.integers(0, 256, 20)
        for first in (0, 16):
            paged.step([chunk_row(name, prompt, first, 16)], "prefill")
    real_run = paged._run
    tamper: list[tuple[int, int]] = []

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        got = real_run(feeds)
        for block, offset in tamper:
            got["past_value.0_RetainedState"][block, :, offset] += 1.0
        return got

    paged._run = run  # type: ignore[method-assign]
    a, b = rings.blocks_of("A"), rings.blocks_of("B")
    cases = [([], []), ([(a[1], 5)], []), ([(a[1], 12)], [a[1]]), ([(b[0], 7), (b[1], 7)], [b[0]])]
    for position, (changed, flagged) in enumerate(cases, start=20):
        tamper[:] = changed
        decode = [Row(name, rng.integers(0, 256, 1), np.array([position])) for name in ("A", "B")]
        paged.step(decode, "decode")
        assert paged.isolation[-1].foreign_blocks_changed == flagged, changed


@pytest.mark.parametrize(("name", "dims"), [("gpt_oss_swa_moe", DIMS), ("llama4_text", {})])
def test_oversubscribed_window_pool_matches_the_original(
    tmp_path: Path, name: str, dims: dict[str, int]
) -> None:
    """Three waves of two sequences (prompts of 31 and 20 tokens, 40 decode steps: the 32-slot
    ring turns twice) through one runner whose ring pool holds two rings only: 1 + 2 * 2 = 5
    blocks, where the single-table layout needs the full pool of 1 + 2 * ceil(71 / 16) = 11 in
    every layer. The six sequences' histories would take 2 * (5 + 4) * 3 = 54 ring-layer blocks;
    the rings reuse 4. Logits equal the original's bit for bit, wave after wave: for gpt_oss's
    sliding layer and for Llama 4's chunked layers (test_chunked_rings.py)."""
    out = tmp_path / "paged.onnx"
    original = fixture_model(name) if name == "gpt_oss_swa_moe" else feature_fixture_model(name)
    rewrite(original, out, 16, ctx_len=CTX_LEN, dims=dims)
    rings = BlockManager(5, 16, shuffled_order(5, 1), window=WINDOW)
    full = BlockManager(11, 16, shuffled_order(11, 2))
    paged = PagedRunner(out, full, 8, dims, window_managers={"block_table_w32": rings})
    reference = ContiguousRunner(original, {"ctx_len": CTX_LEN, **dims})
    peak = 0
    for wave in range(3):
        scenario = random_scenario(256, [31, 20], num_decode=40, chunk_len=16, seed=wave)
        steps = drive([reference, paged], scenario)
        for step in steps:
            assert np.array_equal(step.logits[0], step.logits[1]), (wave, step.index)
        peak = max(peak, rings.num_used_blocks)
        for sequence in ("A", "B"):
            paged.release(sequence)
            reference.release(sequence)
    assert peak == 4 and rings.num_free_blocks == 4
    assert all(not record.foreign_blocks_changed for record in paged.isolation)


# Logical-position windows: QEfficient's disaggregated decode export of gpt-oss (retain_full_kv)
# keeps the sliding layer's cache at full length and reads [p0 - 32, p0 + S) from it.
RETAIN = "ort_failing/gpt_oss_decode_retain_full_kv"


def _runnable_retain(tmp_path: Path) -> Path:
    """The export with its value_info removed: onnxruntime refuses it only because one stale
    annotation says the sliding layer's gather returns ctx_len positions (it returns S + 32; see
    the corpus README). The computation is untouched."""
    model = onnx.load(feature_fixture_model(RETAIN))
    del model.graph.value_info[:]
    path = tmp_path / "retain.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("name", "corpus", "dims"),
    [
        (RETAIN, "features", {}),
        ("gpt_oss_swa_moe", "qeff", DIMS),
        ("llama4_text", "features", {}),
        ("gemma2_ctx256", "features", {}),
        ("ort_failing/qwen3_moe_prefill_chunked", "features", {}),
        ("llama_default", "qeff", {}),
        ("llama_subfunctions", "qeff", {}),
        ("qwen2_cb", "features", {}),
    ],
)
def test_windows_and_rings_are_found_by_structure(name: str, corpus: str, dims: dict[str, int]) -> None:
    """Only the retain_full_kv export reads a window of logical positions (its layer 0, window
    32); the ring of gpt_oss_swa_moe stays a ring, Llama 4's chunks (p % 32 into a full cache)
    are rings, Gemma 2 (the whole cache) and the rest have neither."""
    source = feature_fixture_model(name) if corpus == "features" else fixture_model(name)
    ctx_len = 256 if name == "gemma2_ctx256" else CTX_LEN
    report = rewrite(source, None, 16, ctx_len=ctx_len, dims=dims)
    logical = [g for g in report.kv_groups if g["window_addressing"] == "logical_positions"]
    if name == RETAIN:
        assert logical == [
            {
                "table": "block_table_w32",
                "num_kv_blocks": None,
                "pool_dim": "total_num_kv_blocks_w32",
                "total_num_kv_blocks": None,
                "window": 32,
                "window_addressing": "logical_positions",
                "caches": ["past_key.0", "past_value.0"],
            }
        ]
    else:
        assert logical == []
    # Rings are what the original writes as rings: gpt_oss's sliding layer (a cache of the
    # window's length) and Llama 4's chunked layers (p % 32 into a full cache; test_chunked_rings.py).
    rings = [cache for g in report.kv_groups if g["window_addressing"] == "ring" for cache in g["caches"]]
    chunked = [f"past_{kind}.{layer}" for layer in range(3) for kind in ("key", "value")]
    assert rings == {"gpt_oss_swa_moe": ["past_key.0", "past_value.0"], "llama4_text": chunked}.get(name, [])


def test_logical_window_blocks_behind_the_window_are_freed() -> None:
    manager = BlockManager(12, 16, window=WINDOW, logical=True)
    manager.append("a", 100)  # blocks wholly before 100 - 32 = 68: columns 0-3 (positions 0-63)
    assert manager.blocks_of("a")[:4] == [-1, -1, -1, -1]
    assert -1 not in manager.blocks_of("a")[4:] and len(manager.blocks_of("a")) == 7
    assert manager.num_used_blocks == 3 and manager.num_free_blocks == 11 - 3
    assert manager.block_table(["a"], 8)[0, :4].tolist() == [-1, -1, -1, -1]
    manager.free("a")
    assert manager.num_free_blocks == 11


def test_logical_window_pool_matches_the_original(tmp_path: Path) -> None:
    """Two sequences (prompts of 30 and 20 tokens in 16-token chunks, 80 decode steps: 110 and 100
    positions) with a window pool of 1 + 4 + 4 = 9 blocks — at most ceil((32 + 16) / 16) + 1 = 4 per
    sequence — against the full layer's 1 + 7 + 7 = 15. Full-width tables: this export reads S + 32
    positions whatever the context, which a narrower table cannot hold (its own index fails)."""
    original = _runnable_retain(tmp_path)
    out = tmp_path / "paged.onnx"
    rewrite(original, out, 16, ctx_len=CTX_LEN)
    window = BlockManager(9, 16, shuffled_order(9, 3), window=WINDOW, logical=True)
    full = BlockManager(15, 16, shuffled_order(15, 4))
    paged = PagedRunner(out, full, 8, full_width=True, window_managers={"block_table_w32": window})
    reference = ContiguousRunner(original, {"ctx_len": CTX_LEN})
    steps = drive([reference, paged], random_scenario(256, [30, 20], num_decode=80, chunk_len=16, seed=5))
    for step in steps:
        assert np.array_equal(step.logits[0], step.logits[1]), step.index
    assert all(not record.foreign_blocks_changed for record in paged.isolation)
    assert window.blocks_of("A")[:4] == [-1] * 4  # 110 - 32 = 78: columns 0-3 freed
    assert window.blocks_of("B")[:4] == [-1] * 4  # 100 - 32 = 68: columns 0-3 freed
    assert window.num_used_blocks == 3 + 3


@pytest.fixture(scope="module")
def retain_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The runnable retain_full_kv export and its rewrite (blocks of 16, context 128)."""
    tmp = tmp_path_factory.mktemp("retain")
    original = _runnable_retain(tmp)
    out = tmp / "paged.onnx"
    rewrite(original, out, 16, ctx_len=CTX_LEN)
    return original, out


def _logical_runner(out: Path, window: BlockManager, full_blocks: int = 24) -> PagedRunner:
    full = BlockManager(full_blocks, 16, shuffled_order(full_blocks, 4))
    return PagedRunner(out, full, 8, full_width=True, window_managers={"block_table_w32": window})


def test_fork_in_a_logical_window_copies_on_write() -> None:
    """A fork shares the partly filled block of positions 16-19; the child's write at 20 must go
    to a private copy of it (the full group's rule: the columns the write touches)."""
    manager = BlockManager(12, 16, window=WINDOW, logical=True)
    manager.append("a", 20)
    parent = manager.blocks_of("a")
    manager.fork("a", "b")
    manager.prepare_write("b", 21)
    copies = manager.take_copies()
    assert len(copies) == 1 and copies[0][0] == parent[1]
    assert manager.blocks_of("b") == [parent[0], copies[0][1]] and manager.blocks_of("a") == parent


def test_fork_in_a_logical_window_matches_the_original(retain_pair: tuple[Path, Path]) -> None:
    """A and B share a 20-token prompt, B forked from A after its prefill; both decode 40 steps
    with their own tokens (lengths 60: the window frees the shared blocks behind it as it moves).
    Logits equal the original's (each sequence its own contiguous cache) bit for bit, every step."""
    original, out = retain_pair
    prompt = np.random.default_rng(9).integers(0, 256, 20)
    scripts = [
        SequenceScript(name, prompt, 40, np.random.default_rng(seed).integers(0, 256, 40), fork_of=parent)
        for name, seed, parent in (("A", 1, None), ("B", 2, "A"))
    ]
    window = BlockManager(12, 16, shuffled_order(12, 3), window=WINDOW, logical=True)
    paged = _logical_runner(out, window)
    reference = ContiguousRunner(original, {"ctx_len": CTX_LEN})
    steps = drive([reference, paged], Scenario(scripts, chunk_len=16))
    assert len(steps) == 2 + 40
    for step in steps:
        assert np.array_equal(step.logits[0], step.logits[1]), step.index
    assert all(not record.foreign_blocks_changed for record in paged.isolation)
    assert (set(window.blocks_of("A")) - {-1}).isdisjoint(window.blocks_of("B"))


def test_the_original_attends_to_the_last_window_positions_only(retain_pair: tuple[Path, Path]) -> None:
    """The export's semantics, which decide what a logical window may free: it reads
    ``[p0 - 32, p0 + S)``, but a query at ``q`` attends to ``(q - 32, q]`` only. With 40 positions
    cached, changing position 8 (= 40 - 32, read) leaves the next call's logits unchanged;
    changing 9 does not, whether the call is one token or seven."""
    original, _ = retain_pair
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 256, 40)
    runner = ContiguousRunner(original, {"ctx_len": CTX_LEN})
    for first in range(0, 40, 16):
        runner.step([chunk_row("a", prompt, first, 16)], "prefill")
    for width in (1, 7):
        tokens = rng.integers(0, 256, width)
        changed = {}
        for position in (None, 7, 8, 9, 10):
            runner.fork("a", "b")
            if position is not None:
                for name in ("past_key.0", "past_value.0"):  # the sliding layer's cache itself
                    runner.kv_view("b")[name][0, :, position] += 3.0
            logits = runner.step([Row("b", tokens, np.arange(40, 40 + width))], "decode")
            runner.release("b")
            changed[position] = logits
        moved = {p: not np.array_equal(changed[p], changed[None]) for p in (7, 8, 9, 10)}
        assert moved == {7: False, 8: False, 9: True, 10: True}, width


class _FreesOnePositionMore(BlockManager):
    """A logical window that frees a block one position too early."""

    def first_attended(self, length: int) -> int:
        return super().first_attended(length) + 1


def test_logical_window_frees_exactly_the_blocks_no_query_attends(retain_pair: tuple[Path, Path]) -> None:
    """One sequence (a 30-token prompt in 16-token chunks, 50 decode steps). After every step of
    length ``L`` the window group holds exactly the blocks of positions ``[L - 31, L)``, the ones
    the next query (at ``L``) attends to: 3 blocks, but 2 where ``L - 31`` starts a block (``L``
    47, 63, 79) or ``L`` ends one (48, 64, 80). Logits equal the original's bit for bit. A manager
    freeing one position more drops position ``L - 31`` when it is the last of its block (first at
    ``L`` 46), and the next call differs."""
    original, out = retain_pair
    scenario = random_scenario(256, [30], num_decode=50, chunk_len=16, seed=8)
    window = BlockManager(6, 16, shuffled_order(6, 3), window=WINDOW, logical=True)
    paged = _logical_runner(out, window)
    held: dict[int, int] = {}
    reference = ContiguousRunner(original, {"ctx_len": CTX_LEN})

    class Recording:  # the paged runner, noting the window group's blocks after each step
        def step(self, rows: list[Row], phase: str | None = None) -> np.ndarray:
            logits = paged.step(rows, phase)  # type: ignore[arg-type]
            held[window.length_of("A")] = window.num_used_blocks
            return logits

        def fork(self, parent: str, child: str) -> None:
            raise AssertionError("no forks here")

    steps = drive([reference, Recording()], scenario)
    for step in steps:
        assert np.array_equal(step.logits[0], step.logits[1]), step.index
    assert sorted(held) == [16, 30, *range(31, 81)]
    for length, count in held.items():
        assert count == len({p // 16 for p in range(max(length - 31, 0), length)}), length
    assert [held[n] for n in (45, 46, 47, 48, 49, 62, 63, 64, 65, 79)] == [3, 3, 2, 2, 3, 3, 2, 2, 3, 2]
    assert max(held.values()) == BlockManager(2, 16, window=WINDOW, logical=True).blocks_for(80) == 3

    eager = _FreesOnePositionMore(6, 16, shuffled_order(6, 3), window=WINDOW, logical=True)
    steps = drive([ContiguousRunner(original, {"ctx_len": CTX_LEN}), _logical_runner(out, eager)], scenario)
    differs = [s.index for s in steps if not np.array_equal(s.logits[0], s.logits[1])]
    # step i (i >= 2) is the decode at position 30 + (i - 2): the first wrong call is the one at
    # L = 46 (the KV it writes is then wrong, so every later call differs too)
    assert differs[0] == 46 - 30 + 2, differs


def test_logical_window_prefill_chunk_longer_than_the_window(retain_pair: tuple[Path, Path]) -> None:
    """48-token prefill chunks, longer than the 32-position window (a chunk attends across its own
    positions and the window before it): prompts of 96 and 60 tokens, 20 decode steps, the window
    pool sized by ``blocks_for`` at that chunk: 6 blocks for the 116 positions of the first (a call
    at ``p0`` holds ``[p0 - 31, p0 + 48)``, 79 positions: 6 blocks when they start at a block's
    last slot), 5 for the 80 of the second (all it has), and the null block. Bit-exact."""
    original, out = retain_pair
    scenario = random_scenario(256, [96, 60], num_decode=20, chunk_len=48, seed=3)
    probe = BlockManager(2, 16, window=WINDOW, logical=True)
    assert [probe.blocks_for(s.length, 48) for s in scenario.sequences] == [6, 5]
    window = BlockManager(12, 16, shuffled_order(12, 3), window=WINDOW, logical=True)
    paged = _logical_runner(out, window, full_blocks=1 + 8 + 5)
    steps = drive([ContiguousRunner(original, {"ctx_len": CTX_LEN}), paged], scenario)
    for step in steps:
        assert np.array_equal(step.logits[0], step.logits[1]), step.index
    assert all(not record.foreign_blocks_changed for record in paged.isolation)


def test_adversarial_logical_window_table_stays_harmless(tmp_path: Path) -> None:
    """Garbage on both full-width tables of the retain_full_kv export (the window pool smaller
    than the full one): writes stay in each row's own listed blocks of each group."""
    out = tmp_path / "paged.onnx"
    rewrite(_runnable_retain(tmp_path), out, 16, ctx_len=CTX_LEN)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(13)
    full_pool, window_pool, bs = 24, 9, 16
    for _ in range(30):
        batch, seq = int(rng.integers(1, 4)), int(rng.choice([1, 7, 16]))
        pools = _random_pools(rng, window_pool, full_pool, bs)
        tables = {
            "0": rng.choice([-1, 0, *range(window_pool + 6), 40], size=(batch, 8)).astype(np.int64),
            "1": rng.choice([-1, 0, *range(full_pool), 40], size=(batch, 8)).astype(np.int64),
        }
        positions = rng.choice([-1, 255, 130, *range(CTX_LEN)], size=(batch, seq)).astype(np.int64)
        slot_id = rng.integers(-1, bs + 1, batch).astype(np.int64)
        feeds = {
            "input_ids": rng.integers(0, 256, (batch, seq)).astype(np.int64),
            "position_ids": positions,
            "block_table": tables["1"],
            "block_table_w32": tables["0"],
            "slot_id": slot_id,
            **pools,
        }
        got = dict(zip(names, session.run(None, feeds), strict=True))
        for name, before in pools.items():
            size = window_pool if name.endswith("0") else full_pool
            allowed = contract_writes(tables[name[-1]], positions, slot_id, bs, size)
            assert unexpected_writes(before, got[f"{name}_RetainedState"], allowed) == [], name


# Prefix sharing per group: a ring group shares only the blocks inside the window of the hit.


def test_ring_prefix_hit_needs_only_the_window_blocks() -> None:
    """A 64-token prompt prefilled in one go and cached at the end: its 32-slot ring (two blocks
    of 16) then holds logical blocks 2 and 3 only — blocks 0 and 1 were overwritten. A hit at 3
    blocks needs the window [1, 3): block 1 is gone, and so are the windows of 2 and 1 blocks; a
    hit at 4 blocks needs [2, 4): both there. The full group would have all four."""
    prompt = np.arange(100, 164)
    ring = BlockManager(8, 16, window=WINDOW, prefix_caching=True)
    full = BlockManager(8, 16, prefix_caching=True)
    for manager in (ring, full):
        manager.append("a", 64)
        manager.cache_prompt("a", prompt)
    longer = np.r_[prompt, 7]  # 65 tokens: four full blocks may be reused
    assert full.prefix_blocks(prompt) == 3 and full.prefix_blocks(longer) == 4
    assert ring.prefix_blocks(prompt) == 0
    assert ring.prefix_blocks(longer) == 4
    held = ring.blocks_of("a")  # column 0 holds logical block 2, column 1 block 3
    ring.free("a")
    assert ring.match_prefix("b", longer) == 64
    assert ring.blocks_of("b") == held


def test_ring_prefix_hit_gives_the_uncached_logits(tmp_path: Path) -> None:
    """A = S + a and B = S + b share a 48-token prefix S (three blocks of 16); both are 64 tokens,
    prefilled in 16-token chunks (no padding, so the original is a fair reference). While A
    prefills, each ring block is named as soon as it is full, so B's hit at 3 blocks finds its
    window [1, 3) in the ring cache and the full group's blocks 0-2: B prefills from 48, and its
    logits equal its uncached run's and the original's from there on, through 8 decode steps that
    turn the ring again."""
    out = tmp_path / "paged.onnx"
    original = fixture_model("gpt_oss_swa_moe")
    rewrite(original, out, 16, ctx_len=CTX_LEN, dims=DIMS)
    rng = np.random.default_rng(21)
    shared = rng.integers(0, 256, 48)
    a, b = np.r_[shared, rng.integers(0, 256, 16)], np.r_[shared, rng.integers(0, 256, 16)]
    decode = rng.integers(0, 256, 8)

    def serve(
        runner: PagedRunner | ContiguousRunner, name: str, prompt: np.ndarray, start: int
    ) -> list[np.ndarray]:
        logits = [
            runner.step([chunk_row(name, prompt, first, 16)], "prefill") for first in range(start, 64, 16)
        ]
        for t, token in enumerate(decode):
            logits.append(runner.step([Row(name, np.array([token]), np.array([64 + t]))], "decode"))
        return logits

    rings = BlockManager(12, 16, shuffled_order(12, 7), window=WINDOW, prefix_caching=True)
    full = BlockManager(20, 16, shuffled_order(20, 8), prefix_caching=True)
    cached = PagedRunner(out, full, 8, DIMS, window_managers={"block_table_w32": rings})
    assert cached.start("A", a) == 0
    serve(cached, "A", a, 0)
    cached.cache_prompt("A", a)
    full_blocks = full.blocks_of("A")[:3]
    cached.release("A")
    assert cached.start("B", b) == 48
    assert full.blocks_of("B") == full_blocks and len(rings.blocks_of("B")) == 2
    hit = serve(cached, "B", b, 48)
    cold = serve(PagedRunner(out, BlockManager(20, 16), 8, DIMS), "B", b, 0)
    reference = serve(ContiguousRunner(original, {"ctx_len": CTX_LEN, **DIMS}), "B", b, 0)
    assert len(hit) == len(cold) - 3
    for got, want, expected in zip(hit, cold[3:], reference[3:], strict=True):
        assert np.array_equal(got, want) and np.array_equal(got, expected)
    assert all(not record.foreign_blocks_changed for record in cached.isolation)


def test_prefix_caching_is_refused_for_windows_it_cannot_name() -> None:
    with pytest.raises(ValueError, match="multiple of kv_block_size"):
        BlockManager(8, 16, window=24, prefix_caching=True)
    with pytest.raises(ValueError, match="multiple of kv_block_size"):
        BlockManager(8, 16, window=WINDOW, logical=True, prefix_caching=True)


def test_server_reserves_a_logical_window_for_its_prefill_chunks(retain_pair: tuple[Path, Path]) -> None:
    """Four 100-token requests (8 new tokens each) served in 64-token prefill chunks. A request
    holds up to ``blocks_for(108, 64)`` = 7 window blocks (a call at ``p0`` holds ``[p0 - 31,
    p0 + 64)``: 95 positions, 7 blocks at the worst alignment), so a window pool of 2 * 7 blocks
    and the null block admits two at a time and never runs out; the tokens equal the original's
    served two at a time (the same calls in the same order)."""
    original, out = retain_pair
    rng = np.random.default_rng(6)
    requests = [Request(f"r{i}", rng.integers(0, 256, 100), 8) for i in range(4)]
    assert BlockManager(2, 16, window=WINDOW, logical=True).blocks_for(108, 64) == 7
    window = BlockManager(15, 16, shuffled_order(15, 3), window=WINDOW, logical=True)
    paged = Server(_logical_runner(out, window, full_blocks=1 + 4 * 7), 64, 4)
    served = {s.request.name: s.tokens for s in paged.run(requests)}
    reference = Server(ContiguousRunner(original, {"ctx_len": CTX_LEN}), 64, 2)
    assert served == {s.request.name: s.tokens for s in reference.run(requests)}
    assert paged.peak_running == 2 and window.num_free_blocks == 14
    # 13 blocks: one at a time. Reserving 3 blocks a request (the window alone, chunks of 1) would
    # admit all four, and the fourth one's second chunk would find 13 - 3 * 3 < 5 blocks free.
    window = BlockManager(14, 16, shuffled_order(14, 3), window=WINDOW, logical=True)
    alone = Server(_logical_runner(out, window, full_blocks=1 + 4 * 7), 64, 4)
    assert {s.request.name: s.tokens for s in alone.run(requests)} == served
    assert alone.peak_running == 1 and window.num_free_blocks == 13


def _window_pool_sizes(tmp_path: Path, source: Path, **options: object) -> set[str]:
    out = tmp_path / "sized.onnx"
    rewrite(source, out, 16, ctx_len=CTX_LEN, **options)
    entries = json.loads((tmp_path / "sized.specializations.json").read_text())["specializations"]
    return {entry["symbols"]["total_num_kv_blocks_w32"] for entry in entries}


def test_logical_window_specializations_size_the_pool_for_the_longest_chunk(
    tmp_path: Path, retain_pair: tuple[Path, Path]
) -> None:
    """The window pool of the specializations (one value for every entry), batch_size 4, blocks of
    16, context 128 (8 blocks a row). A call of ``S`` positions at ``p0`` reads ``[p0 - 32, p0 +
    S)``: ``32 + S`` positions, at the worst alignment ``ceil((31 + S) / 16) + 1`` blocks, at most
    the row's 8. Prefill entries without a ``seq_len`` may write a chunk as long as the context:
    8 blocks a row. Four rows prefilling 32-token chunks and decoding in the 21-block pool of
    ``seq_len`` 32 match the original bit for bit."""
    original, out = retain_pair
    sizes = {
        "unbound": _window_pool_sizes(tmp_path, original, dims={"batch_size": 4}),  # prefill: no seq_len
        "32": _window_pool_sizes(tmp_path, original, dims={"batch_size": 4, "seq_len": 32}),
        "1": _window_pool_sizes(tmp_path, original, dims={"batch_size": 4, "seq_len": 1}),
        "128": _window_pool_sizes(tmp_path, original, dims={"batch_size": 4, "seq_len": 128}),
    }
    assert sizes == {
        "unbound": {str(4 * 8 + 1)},
        "32": {str(4 * (4 + 1) + 1)},  # ceil(63 / 16) + 1 = 5
        "1": {str(4 * (2 + 1) + 1)},  # ceil(32 / 16) + 1 = 3
        "128": {str(4 * 8 + 1)},  # ceil(159 / 16) + 1 = 11, capped at the row's 8
    }
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({"specializations": [
        {"name": "prefill", "symbols": {"batch_size": "1", "seq_len": "64", "ctx_len": "128"}},
        {"name": "decode", "symbols": {"batch_size": "4", "seq_len": "1", "ctx_len": "128"}},
    ]}))  # fmt: skip
    # the most rows of any entry (4) times the longest chunk's ceil(95 / 16) + 1 = 7 blocks
    assert _window_pool_sizes(tmp_path, original, specializations=specs) == {str(4 * 7 + 1)}

    window = BlockManager(21, 16, shuffled_order(21, 5), window=WINDOW, logical=True)
    paged = _logical_runner(out, window, full_blocks=1 + 4 * 8)
    scenario = random_scenario(256, [70, 45, 90, 33], num_decode=12, chunk_len=32, seed=11)
    for step in drive([ContiguousRunner(original, {"ctx_len": CTX_LEN}), paged], scenario):
        assert np.array_equal(step.logits[0], step.logits[1]), step.index


def test_two_ring_groups_agree_on_one_prefix_hit() -> None:
    """Rings of 32 and 64 positions (2 and 4 blocks of 16) and the full group, caches seeded by
    prefilling the prompt's first 2, 6 and 4 blocks: the full group holds blocks 0-5, the 32-ring
    blocks 0-1 (a 32-position run) and 4-5 (the ring after 96), the 64-ring blocks 0-3. By hand:
    a hit of 6 needs [4, 6) and [2, 6): the 64-ring lacks 4; of 4, [2, 4) and [0, 4): the
    32-ring lacks 2; of 2, [0, 2) in both. Every group then starts at 32."""
    prompt = np.arange(1000, 1000 + 6 * 16 + 1)
    full = BlockManager(16, 16, prefix_caching=True)
    short = BlockManager(16, 16, window=32, prefix_caching=True)
    long = BlockManager(16, 16, window=64, prefix_caching=True)
    for manager, lengths in ((full, [96]), (short, [32, 96]), (long, [64])):
        for length in lengths:
            manager.append("seed", length)
            manager.cache_prompt("seed", prompt)
            manager.free("seed")
    assert agreed_prefix_hit(full, [short, long], prompt) == 2
    assert agreed_prefix_hit(full, [long, short], prompt) == 2
    assert agreed_prefix_hit(full, [long], prompt) == 4 and agreed_prefix_hit(full, [short], prompt) == 6
    assert [m.match_prefix("s", prompt, 2) for m in (full, short, long)] == [32, 32, 32]


def test_full_manager_refuses_a_ring_that_has_its_own_table(tmp_path: Path) -> None:
    """The 32-ring has its own table: passing its length to the full table's manager (copy on
    write and allowed writes in block_table's first columns) is refused; with
    ``--shared-window-table`` the ring is in those columns, and the same manager is right."""
    out = tmp_path / "paged.onnx"
    rewrite(fixture_model("gpt_oss_swa_moe"), out, 16, ctx_len=CTX_LEN, dims=DIMS)
    with pytest.raises(ValueError, match=r"own table \(block_table_w32"):
        PagedRunner(out, BlockManager(12, 16, ring_lengths=[WINDOW]), 8, DIMS)
    shared = tmp_path / "shared.onnx"
    rewrite(
        fixture_model("gpt_oss_swa_moe"), shared, 16, ctx_len=CTX_LEN, dims=DIMS, shared_window_table=True
    )
    assert PagedRunner(shared, BlockManager(12, 16, ring_lengths=[WINDOW]), 8, DIMS).managers.keys() == {
        "block_table"
    }


def _random_pools(
    rng: np.random.Generator, window_pool: int, full_pool: int, bs: int
) -> dict[str, np.ndarray]:
    """Random K and V pools of layer 0 (its window group) and layer 1 (full context)."""
    pools = {}
    for kind in ("key", "value"):
        pools[f"past_{kind}.0"] = rng.standard_normal((window_pool, 2, bs, 16)).astype(np.float32)
        pools[f"past_{kind}.1"] = rng.standard_normal((full_pool, 2, bs, 16)).astype(np.float32)
    return pools
