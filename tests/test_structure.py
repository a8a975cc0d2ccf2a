"""Before/after structure of the rewrite on the five contiguous QEfficient fixtures."""

from __future__ import annotations

import hashlib
from collections import Counter

import onnx
import onnx.inliner
import pytest
from conftest import (
    ALL_FIXTURES,
    CONTIGUOUS_FIXTURES,
    CTX_LEN,
    NARROWING_INEXACT,
    NODE_BOUND,
    ONE_GROUP_BOUND,
    assert_paging_grows_only_its_index_ops,
)

from paged_rewrite.runtime.verify import verify

BLOCK_SIZES = [16, 32, 128]
QEFF = "com.qualcomm.cloud"
# What each QEfficient KV op of the corpus must become (the contract in the README).
PAGED_FORM = {
    "CtxScatter": "PagedCtxScatter",
    "CtxScatterCB": "PagedCtxScatter",
    "CtxGather": "PagedCtxGather",
    "CtxGatherCB": "PagedCtxGather",
    "CtxGatherBlockedKV": "PagedCtxGather",
}


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def _ops(model: onnx.ModelProto) -> Counter[str]:
    """Ops of the main graph and of every function body except the cache ops' own definitions."""
    bodies = [model.graph.node, *(f.node for f in model.functions if f.domain != QEFF)]
    return Counter(f"{n.domain}::{n.op_type}" for body in bodies for n in body)


@pytest.mark.parametrize("name", ALL_FIXTURES)
@pytest.mark.parametrize("kv_block_size", BLOCK_SIZES)
def test_every_cache_op_is_paged(paged_fixture, name: str, kv_block_size: int) -> None:
    original_path, paged_path, _ = paged_fixture(name, kv_block_size)
    before, after = _ops(onnx.load(original_path)), _ops(onnx.load(paged_path))
    expected: Counter[str] = Counter()
    for op, count in before.items():
        if op.startswith(f"{QEFF}::Ctx"):
            expected[f"{QEFF}::{PAGED_FORM[op.split('::')[1]]}"] += count
    assert expected, "the fixture has cache ops"
    for op, count in expected.items():
        assert after[op] == count, op
    assert not [op for op in after if op.startswith(f"{QEFF}::Ctx")]
    onnx.checker.check_model(str(paged_path), full_check=True)


@pytest.mark.parametrize("name", ALL_FIXTURES)
@pytest.mark.parametrize("kv_block_size", BLOCK_SIZES)
def test_verify_passes_on_every_fixture(paged_fixture, name: str, kv_block_size: int) -> None:
    """``paged-rewrite verify``'s own scenario: two sequences, padded prefill crossing blocks,
    16 batched decode steps, shuffled pool, tables narrowed to the context in use; bit-exact
    (BlockedKV: within 1e-5, same greedy tokens; bit-exact at full width) and no foreign block
    touched."""
    original_path, paged_path, _ = paged_fixture(name, kv_block_size)
    report = verify(original_path, paged_path, block_order="shuffled", seed=kv_block_size)
    assert report.ok, report.summary()
    if name in NARROWING_INEXACT:
        assert 0.0 < report.max_abs_diff <= 1e-5 or kv_block_size == CTX_LEN
        full = verify(original_path, paged_path, block_order="shuffled", seed=kv_block_size, full_width=True)
        assert full.ok and full.bit_exact, full.summary()
    else:
        assert report.bit_exact, report.summary()
    assert "logits bit-exact" in report.summary() or name in NARROWING_INEXACT
    assert sum(1 for s in report.steps if s.kind == "decode" and len(s.sequences) == 2) >= 16


@pytest.mark.parametrize("name", CONTIGUOUS_FIXTURES)
@pytest.mark.parametrize("kv_block_size", BLOCK_SIZES)
def test_interface_follows_the_contract(paged_fixture, name: str, kv_block_size: int) -> None:
    original_path, paged_path, report = paged_fixture(name, kv_block_size)
    original, paged = onnx.load(original_path), onnx.load(paged_path)
    inputs = {v.name: v for v in paged.graph.input}
    outputs = {v.name: v for v in paged.graph.output}
    ladder = [b for b in (16, 32, 64, 128) if b >= kv_block_size]  # powers of two blocks up to CTX_LEN
    num_kv_blocks = -(-CTX_LEN // kv_block_size) if len(ladder) == 1 else "num_kv_blocks"

    assert [v.name for v in paged.graph.input] == [v.name for v in original.graph.input] + [
        "block_table",
        "slot_id",
    ]
    assert [v.name for v in paged.graph.output] == [v.name for v in original.graph.output]
    assert inputs["block_table"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert _dims(inputs["block_table"]) == ["batch_size", num_kv_blocks]
    assert _dims(inputs["slot_id"]) == ["batch_size"]
    for value in original.graph.input:
        if value.name.startswith("past_"):
            _, heads, _, head_dim = _dims(value)
            pool = ["total_num_kv_blocks", heads, kv_block_size, head_dim]
            assert _dims(inputs[value.name]) == pool
            assert _dims(outputs[f"{value.name}_RetainedState"]) == pool
    assert report.removed_inputs == []
    assert report.num_kv_blocks == num_kv_blocks
    assert report.ctx_buckets == ladder


def test_shape_of_cache_is_rewired_to_the_logical_view(paged_fixture) -> None:
    """No node reads the pool's physical shape: every former Shape(cache) reads the one logical
    shape the model computes per call."""
    _, paged_path, _ = paged_fixture("llama_default", 16)
    paged = onnx.load(paged_path)
    caches = {v.name for v in paged.graph.input if v.name.startswith("past_")}
    caches |= {f"{c}_RetainedState" for c in caches}
    shape_readers = [n for n in paged.graph.node if set(n.input) & caches and n.op_type == "Shape"]
    (logical,) = [n for n in paged.graph.node if n.op_type == "PagedLogicalShape"]
    readers = [n for n in paged.graph.node if logical.output[0] in n.input]
    assert shape_readers == []
    # the mask's ctx_len (from past_key.0) + one per layer's comp_ctx_len, each now an Identity of it
    assert [n.op_type for n in readers] == ["Identity"] * 3


# Index ops per call, by hand: every fixture's layers write at position_ids and read the same
# recomputed positions, so one of each serves all caches (gpt_oss: its window layers write at
# ring slots and read a window, so two of each, and a window shape beside the logical shape;
# BlockedKV: each of its 4 KV blocks reads its own positions, shared by both layers).
INDEX_OPS = {
    "llama_default": {"PagedWriteIndex": 1, "PagedReadIndexCCL": 1, "PagedLogicalShape": 1},
    "gemma2_default": {"PagedWriteIndex": 1, "PagedReadIndexCCL": 1, "PagedLogicalShape": 1},
    "llama_cb": {"PagedWriteIndex": 1, "PagedReadIndexCCL": 1, "PagedLogicalShape": 1},
    "mistral_default": {"PagedWriteIndex": 1, "PagedReadIndexCCL": 1, "PagedLogicalShape": 1},
    "qwen2_default": {"PagedWriteIndex": 1, "PagedReadIndexCCL": 1, "PagedLogicalShape": 1},
    "gpt2_default": {"PagedWriteIndex": 1, "PagedReadIndexCCL": 1, "PagedLogicalShape": 1},
    "llama_subfunctions": {"PagedWriteIndex": 1, "PagedReadIndexCCL": 1, "PagedLogicalShape": 1},
    "llama_blockedkv": {"PagedWriteIndex": 1, "PagedReadIndex": 4, "PagedLogicalShape": 1},  # per KV block
    "gpt_oss_swa_moe": {
        "PagedWriteIndex": 2,
        "PagedReadIndexCCL": 2,
        "PagedLogicalShape": 1,
        "PagedWindowShape": 1,
    },
}


@pytest.mark.parametrize("name", list(INDEX_OPS))
def test_addresses_are_computed_once_per_call(paged_fixture, name: str) -> None:
    """The index ops sit in the main graph, once per call; each cache keeps only its data op; and
    the inlined paged graph is at most 5% larger than the original's (one address group)."""
    original_path, paged_path, _ = paged_fixture(name, 16)
    original, paged = onnx.load(original_path), onnx.load(paged_path)
    main = Counter(n.op_type for n in paged.graph.node if n.op_type in INDEX_OPS[name])
    assert main == INDEX_OPS[name]
    layer_bodies = [f for f in paged.functions if f.domain != QEFF]
    assert not [n for f in layer_bodies for n in f.node if n.op_type in INDEX_OPS[name]]
    inlined = {
        "original": len(onnx.inliner.inline_local_functions(original).graph.node),
        "paged": len(onnx.inliner.inline_local_functions(paged).graph.node),
    }
    assert inlined["paged"] <= NODE_BOUND.get(name, ONE_GROUP_BOUND) * inlined["original"], inlined


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_paging_grows_only_its_index_ops(paged_fixture, name: str) -> None:
    original_path, paged_path, _ = paged_fixture(name, 16)
    assert_paging_grows_only_its_index_ops(original_path, paged_path)


@pytest.mark.parametrize("kv_block_size", [16, 128])
def test_two_address_groups_cost_less_per_layer_than_the_original(tmp_path, kv_block_size: int) -> None:
    """A ring layer beside full layers (gpt_oss's two address groups): the index ops are paid once
    per group, each layer costs fewer nodes paged than original, so from 8 layers (the builder's
    models; gpt-oss-20b has 24) the paged graph is the smaller one. The 2-layer fixtures show the
    fixed cost instead (BENCHMARKS.md, "Graph size")."""
    from paged_rewrite import rewrite
    from paged_rewrite.builder import ExportSpec, write_qeff_export

    nodes: dict[tuple[str, int], int] = {}
    for layers in (2, 8):
        spec = ExportSpec(num_layers=layers, sliding_window=32, max_position=256)
        source = write_qeff_export(tmp_path / f"l{layers}" / "model.onnx", spec, sparse_weights=True)
        target = tmp_path / f"l{layers}" / "paged.onnx"
        rewrite(source, target, kv_block_size, ctx_len=128, dims={"sliding_window": 32})
        main = Counter(n.op_type for n in onnx.load(target, load_external_data=False).graph.node)
        assert (main["PagedWriteIndex"], main["PagedReadIndexCCL"]) == (2, 2)  # one per group, any depth
        for kind, path in (("original", source), ("paged", target)):
            model = onnx.load(path, load_external_data=False)
            nodes[kind, layers] = len(onnx.inliner.inline_local_functions(model).graph.node)
    per_six_layers = {kind: nodes[kind, 8] - nodes[kind, 2] for kind in ("original", "paged")}
    assert per_six_layers["paged"] < per_six_layers["original"], nodes
    assert nodes["paged", 8] < nodes["original", 8], nodes


def test_static_sizes_from_flags(tmp_path) -> None:
    from conftest import fixture_model

    from paged_rewrite import rewrite

    one_bucket = rewrite(
        fixture_model("qwen2_default"), tmp_path / "p.onnx", 32, ctx_len=100, num_blocks=17, ctx_buckets=[100]
    )
    pool = next(t for t in one_bucket.inputs if t.name == "past_key.0")
    table = next(t for t in one_bucket.inputs if t.name == "block_table")
    assert pool.shape == [17, 2, 32, 16]
    assert table.shape == ["batch_size", 4]  # one bucket: a static width, ceil(100 / 32)
    ladder = rewrite(fixture_model("qwen2_default"), tmp_path / "q.onnx", 32, ctx_len=100)
    assert ladder.ctx_buckets == [32, 64, 100]  # the default ladder ends at the context
    assert next(t for t in ladder.inputs if t.name == "block_table").shape == ["batch_size", "num_kv_blocks"]


@pytest.mark.parametrize("num_blocks", [33, 5])
def test_a_static_pool_is_what_verify_and_the_runner_use(tmp_path, num_blocks: int) -> None:
    """A model rewritten with --num-blocks takes pools of exactly that many blocks: verify runs its
    scenario in that pool (bit-exact), or says it cannot fit; a runner given another size says so
    before onnxruntime would refuse the first call."""
    from conftest import fixture_model

    from paged_rewrite import rewrite
    from paged_rewrite.errors import UsageError
    from paged_rewrite.runtime.block_manager import BlockManager
    from paged_rewrite.runtime.runners import PagedRunner
    from paged_rewrite.runtime.verify import verify

    original = fixture_model("llama_default")
    rewrite(original, tmp_path / "p.onnx", 16, ctx_len=128, num_blocks=num_blocks)
    if num_blocks == 33:
        result = verify(original, tmp_path / "p.onnx")
        assert result.ok and result.bit_exact and result.num_blocks == 33, result.summary()
        with pytest.raises(
            ValueError, match=r"the pools of block_table hold 33 blocks .*its BlockManager has 20"
        ):
            PagedRunner(tmp_path / "p.onnx", BlockManager(20, 16), 8)
    else:
        with pytest.raises(
            UsageError, match=r"its pool holds 5 blocks \(--num-blocks\); the scenario needs 7"
        ):
            verify(original, tmp_path / "p.onnx")


def test_symbolic_sizes_without_flags(tmp_path) -> None:
    from conftest import fixture_model

    from paged_rewrite import rewrite

    report = rewrite(fixture_model("llama_default"), tmp_path / "p.onnx", 16)
    table = next(t for t in report.inputs if t.name == "block_table")
    assert table.shape == ["batch_size", "num_kv_blocks"]
    onnx.checker.check_model(str(tmp_path / "p.onnx"), full_check=True)


def test_input_is_not_modified_and_output_is_deterministic(tmp_path) -> None:
    from conftest import fixture_model

    from paged_rewrite import rewrite

    source = fixture_model("mistral_default")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    rewrite(source, tmp_path / "a.onnx", 16, ctx_len=128)
    rewrite(source, tmp_path / "b.onnx", 16, ctx_len=128)
    assert hashlib.sha256(source.read_bytes()).hexdigest() == digest
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
