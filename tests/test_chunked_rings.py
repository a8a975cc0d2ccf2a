"""Llama 4's chunked attention: a full-length cache written as a ring (``ring_writes.py``).

The ``llama4_text`` feature export has three chunked layers (0-2) and one global layer (3). A
chunked layer writes position ``p`` at slot ``p % 32`` of a cache as long as the context and reads
only the slots its chunk has filled, so it needs a ring of 32 slots, not the context: the rewrite
gives those caches the ring group ``block_table_w32`` (``ceil(32 / kv_block_size)`` columns, pool
dim ``total_num_kv_blocks_w32``) while the graph keeps seeing a cache as long as the context.
Expected layouts below are worked out by hand from that rule. (An oversubscribed ring pool:
``test_window_groups.py``; a prefix hit: ``test_prefix_caching.py``.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import feature_fixture_model
from contract import adversarial_ring_call, contract_writes, zero_rows_are_zero
from derived_models import (
    chunk_writes_bounded,
    chunk_writes_reshaped,
    chunk_writes_without_padding_test,
    layer_writes_at_positions,
    writes_in_a_function,
)

from paged_rewrite import rewrite
from paged_rewrite.errors import UnsupportedPatternError
from paged_rewrite.runtime.block_manager import BlockManager
from paged_rewrite.runtime.geometry import PagedGeometry
from paged_rewrite.runtime.runners import PagedRunner, unexpected_writes
from paged_rewrite.runtime.verify import verify

LLAMA4 = "llama4_text"
CHUNK, CTX_LEN = 32, 128
CHUNKED = ["past_key.0", "past_value.0", "past_key.1", "past_value.1", "past_key.2", "past_value.2"]
GLOBAL = ["past_key.3", "past_value.3"]


def _shapes(model: onnx.ModelProto) -> dict[str, list[str | int]]:
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }


@pytest.mark.parametrize(("kv_block_size", "ring_columns"), [(16, 2), (32, 1), (8, 4)])
def test_chunked_layers_get_a_ring_table_and_pool(
    tmp_path: Path, kv_block_size: int, ring_columns: int
) -> None:
    out = tmp_path / "paged.onnx"
    rewrite(feature_fixture_model(LLAMA4), out, kv_block_size, ctx_len=CTX_LEN, dims={"batch_size": 4})
    model = onnx.load(out)
    shapes = _shapes(model)
    assert shapes["block_table"] == ["batch_size", "num_kv_blocks"]
    assert shapes["block_table_w32"] == ["batch_size", ring_columns]
    for name in CHUNKED:
        assert shapes[name] == ["total_num_kv_blocks_w32", 2, kv_block_size, 16], name
    for name in GLOBAL:
        assert shapes[name] == ["total_num_kv_blocks", 2, kv_block_size, 16], name
    groups = json.loads(out.with_name("paged.onnx.json").read_text())["groups"]
    assert [(g["table"], g["window"], g["window_addressing"], g["caches"]) for g in groups] == [
        ("block_table", None, None, GLOBAL),
        ("block_table_w32", CHUNK, "ring", CHUNKED),
    ]
    # The chunked layers address their ring, but every Shape of their caches still sees the
    # context: the logical shape of block_table, as the original's cache length was ctx_len.
    operands = {(n.op_type, n.input[1]) for n in model.graph.node if n.op_type.startswith("Paged")}
    assert ("PagedWriteIndex", "block_table_w32") in operands
    assert ("PagedReadIndexCCL", "block_table_w32") in operands
    # one logical shape for both groups (it reads heads, head_dim and block_table's width only),
    # on a pool of block_table's own group
    logical = [(n.input[0], n.input[1]) for n in model.graph.node if n.op_type == "PagedLogicalShape"]
    assert logical == [("past_key.3", "block_table")]
    assert not [op for op, _ in operands if op == "PagedWindowShape"]
    # 4 rows: the global layer a full context each (4 * 128 / bs + 1), the chunks a ring each.
    for entry in json.loads(out.with_name("paged.specializations.json").read_text())["specializations"]:
        assert entry["symbols"]["total_num_kv_blocks"] == str(4 * CTX_LEN // kv_block_size + 1)
        assert entry["symbols"]["total_num_kv_blocks_w32"] == str(4 * ring_columns + 1)
    # A runtime knows the ring by its group: none is left in block_table.
    assert PagedGeometry.of(out).ring_lengths == []
    report = verify(feature_fixture_model(LLAMA4), out)
    assert report.ok and report.bit_exact, report.summary()


def test_a_block_size_that_does_not_divide_the_chunk_keeps_full_caches(tmp_path: Path) -> None:
    """At kv_block_size 128 a ring table would end at slot 128, past the chunk's 32: slots no write
    ever fills. The chunked layers stay in block_table, recorded as wrapping at 32 (their caches
    named), and verify compares only the slots they write: 83 decode steps reach position 127,
    whose slot holds the original's padding, and still nothing differs."""
    out = tmp_path / "paged.onnx"
    report = rewrite(feature_fixture_model(LLAMA4), out, 128, ctx_len=CTX_LEN)
    assert [g["table"] for g in report.kv_groups] == ["block_table"]
    (warning,) = report.warnings  # the user hears that this layout saves no memory, and why
    assert "kept at full-context memory" in warning and "does not divide 32" in warning
    assert all(cache in warning for cache in CHUNKED)
    geometry = PagedGeometry.of(out)
    assert geometry.ring_lengths == [CHUNK]
    assert geometry.exact_rings == dict.fromkeys(CHUNKED, CHUNK)
    result = verify(feature_fixture_model(LLAMA4), out, num_decode=83)
    assert result.ok and result.bit_exact and result.kv_max_abs_diff == 0.0, result.summary()
    # The runtime's other sources say so too: the manifest, the report, and (for a model rewritten
    # before the metadata recorded it) the graph itself.
    manifest = json.loads(out.with_name("paged.onnx.json").read_text())
    assert manifest["wrapping_caches"] == {cache: {"modulus": CHUNK, "ring": True} for cache in CHUNKED}
    assert f"written at p % {CHUNK} through block_table" in report.summary()
    model = onnx.load(out)
    kept = [p for p in model.metadata_props if p.key != "paged_rewrite.wrapping_caches"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, tmp_path / "older.onnx")
    older = PagedGeometry.of(tmp_path / "older.onnx")
    assert older.ring_lengths == [CHUNK] and older.exact_rings == {} and older.wrapping_caches is None


def test_shared_window_table_keeps_chunked_layers_in_block_table(tmp_path: Path) -> None:
    """The layout before chunked layers had a ring of their own, still available: every cache
    in the one table and pool dim, the chunks wrapping in its first columns (a ring of
    block_table a runtime must know), and bit-exact."""
    out = tmp_path / "paged.onnx"
    rewrite(feature_fixture_model(LLAMA4), out, 16, ctx_len=CTX_LEN, shared_window_table=True)
    shapes = _shapes(onnx.load(out))
    assert not any(name.startswith("block_table_w") for name in shapes)
    assert {tuple(shapes[name]) for name in CHUNKED + GLOBAL} == {("total_num_kv_blocks", 2, 16, 16)}
    assert PagedGeometry.of(out).ring_lengths == [CHUNK]
    report = verify(feature_fixture_model(LLAMA4), out)
    assert report.ok and report.bit_exact and report.window_num_blocks == {}, report.summary()


def test_adversarial_tables_on_the_chunk_ring_stay_harmless(tmp_path: Path) -> None:
    """Garbage on both tables (-1, the null block, duplicates, entries past the ring pool but
    inside the full one, past both), wrong slot_ids, padding and out-of-range positions, NaN in
    every null block: a chunked layer writes only block 0 and ring slot ``p % 32`` of its own
    ring table row, the global layer only its own positions; the zero rows stay zeros; the
    well-formed row keeps finite logits."""
    out = tmp_path / "paged.onnx"
    rewrite(feature_fixture_model(LLAMA4), out, 16, ctx_len=CTX_LEN)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(31)
    full_pool, ring_pool, bs = 24, 9, 16
    for _ in range(30):
        call = adversarial_ring_call(rng, bs, full_pool, CTX_LEN)
        pools = {
            name: rng.standard_normal((ring_pool if name in CHUNKED else full_pool, 2, bs, 16)).astype(
                np.float32
            )
            for name in CHUNKED + GLOBAL
        }
        for pool in pools.values():
            pool[0] = np.nan
        positions, slot_id = call["position_ids"], call["slot_id"]
        ring, full = call["block_table_w32"], call["block_table"]
        feeds = {**call, **pools}
        got = dict(zip(names, session.run(None, feeds), strict=True))
        ring_slots = np.where(positions >= 0, positions % CHUNK, -1)
        allowed = {
            "chunked": contract_writes(ring, ring_slots, slot_id, bs, ring_pool),
            "global": contract_writes(full, positions, slot_id, bs, full_pool),
        }
        for name, before in pools.items():
            after = got[f"{name}_RetainedState"]
            kind = "chunked" if name in CHUNKED else "global"
            assert unexpected_writes(before, after, allowed[kind]) == [], name
            assert zero_rows_are_zero(after), name
        assert np.isfinite(got["logits"][0]).all(), "NaN leaked into the valid row"


@pytest.mark.parametrize("derive", [chunk_writes_bounded, chunk_writes_without_padding_test])
def test_a_write_that_is_not_exactly_a_ring_keeps_full_caches(
    tmp_path: Path, derive: Callable[..., Path]
) -> None:
    """Chunked layers whose write is ``p % 32`` below position 64 and ``p`` from there on, or
    ``Mod(p, 32)`` with no padding test (padding then writes slot 31, as in the original): derived
    exports, no ring, so no ring table; the loose modulus still makes a runtime treat the first
    columns as a ring (recorded as wrapping at 32, not as exactly a ring), and the model stays
    bit-exact."""
    source = derive(feature_fixture_model(LLAMA4), tmp_path / "derived.onnx")
    out = tmp_path / "paged.onnx"
    report = rewrite(source, out, 16, ctx_len=CTX_LEN)
    assert [g["table"] for g in report.kv_groups] == ["block_table"]
    assert report.wrapping_caches == {cache: {"modulus": CHUNK, "ring": False} for cache in CHUNKED}
    geometry = PagedGeometry.of(out)
    assert geometry.ring_lengths == [CHUNK] and geometry.exact_rings == {}
    result = verify(source, out, num_decode=60)
    assert result.ok and result.bit_exact, result.summary()


@pytest.mark.parametrize("kv_block_size", [16, 128])
def test_writes_in_a_layer_function(tmp_path: Path, kv_block_size: int) -> None:
    """The writes moved into one function per kind of use (a derived export): a function serving
    the chunked layers only is followed out to its calls' positions and its caches get the ring;
    one serving all four layers cannot take two tables, so every cache stays in block_table,
    recorded as wrapping, with the slot guard's period the chunk's for every call (at 128 a period
    from the global layer's call would drop the chunked layers' writes). Both bit-exact."""
    source = feature_fixture_model(LLAMA4)
    chunked_only = writes_in_a_function(source, tmp_path / "chunked_only.onnx", [0, 1, 2])
    shared = writes_in_a_function(source, tmp_path / "shared.onnx", [0, 1, 2, 3])
    rings = {16: [CHUNKED], 128: []}[kv_block_size]  # 128 does not divide the chunk: no ring table
    for derived, expected in ((chunked_only, rings), (shared, [])):
        out = derived.with_name(f"{derived.stem}_paged.onnx")
        report = rewrite(derived, out, kv_block_size, ctx_len=CTX_LEN)
        assert report.functions == ["ChunkWrites"]
        assert [g["caches"] for g in report.kv_groups if g["window"]] == expected
        # kept at full context, the user is told why: the block size first, else the shared body
        full_memory = [w for w in report.warnings if "full-context memory" in w]
        if expected:
            assert full_memory == []
        else:
            (warning,) = full_memory
            assert ("does not divide" if kv_block_size == 128 else "layer function") in warning
        geometry = PagedGeometry.of(out)
        assert geometry.exact_rings == ({} if expected else dict.fromkeys(CHUNKED, CHUNK))
        result = verify(derived, out, num_decode=40)
        assert result.ok and result.bit_exact, result.summary()
        if not expected:  # wrapping in block_table: blocks are no function of their tokens
            with pytest.raises(UnsupportedPatternError, match="ring"):
                PagedRunner(
                    out, BlockManager(20, kv_block_size, prefix_caching=True), CTX_LEN // kv_block_size
                )


@pytest.mark.parametrize("kv_block_size", [16, 128])
def test_a_wrapping_write_in_another_form_is_still_known_to_wrap(tmp_path: Path, kv_block_size: int) -> None:
    """Positions through an ``Unsqueeze``/``Squeeze`` after the ``Where`` (a derived export): no
    ring table (the strict structure does not take it), but recorded as wrapping at 32, so a
    runtime copies the first columns on write and refuses prefix caching; bit-exact."""
    source = chunk_writes_reshaped(feature_fixture_model(LLAMA4), tmp_path / "reshaped.onnx")
    out = tmp_path / "paged.onnx"
    report = rewrite(source, out, kv_block_size, ctx_len=CTX_LEN)
    assert [g["table"] for g in report.kv_groups] == ["block_table"]
    assert report.wrapping_caches == {cache: {"modulus": CHUNK, "ring": False} for cache in CHUNKED}
    assert PagedGeometry.of(out).ring_lengths == [CHUNK]
    result = verify(source, out, num_decode=83)
    assert result.ok and result.bit_exact, result.summary()
    with pytest.raises(UnsupportedPatternError, match="ring"):
        PagedRunner(out, BlockManager(20, kv_block_size, prefix_caching=True), CTX_LEN // kv_block_size)


def test_a_context_no_longer_than_the_chunk_needs_no_ring() -> None:
    """At a context of 32 the chunked layers cannot wrap: full caches, and no warning (nothing
    is lost)."""
    report = rewrite(feature_fixture_model(LLAMA4), None, 16, ctx_len=CHUNK)
    assert [g["table"] for g in report.kv_groups] == ["block_table"]
    assert report.warnings == []


def test_a_shared_write_body_takes_the_period_of_every_call(tmp_path: Path) -> None:
    """One layer function writes all four layers, and its first call (layer 0, made to write at
    ``position_ids``: a derived export) is no ring while layers 1 and 2 are. At block 128 the slot
    guard's period must be the ring's 32 for every call: the first call's 128 would drop the
    chunked layers' writes from position 32 on (logits 0.43 off when measured)."""
    derived = layer_writes_at_positions(feature_fixture_model(LLAMA4), tmp_path / "first_global.onnx", 0)
    shared = writes_in_a_function(derived, tmp_path / "shared.onnx", [0, 1, 2, 3])
    out = tmp_path / "paged.onnx"
    rewrite(shared, out, 128, ctx_len=CTX_LEN)
    result = verify(shared, out, num_decode=40)
    assert result.ok and result.bit_exact, result.summary()
