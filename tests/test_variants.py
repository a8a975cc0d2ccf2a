"""Before/after structure per export variant, and refusals: each names the model, the node and
the reason, with the documented exit code, and writes nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import CTX_LEN, fixture_model
from models import concat_cache_model, no_cache_model, with_input_dim, with_renamed_op

from paged_rewrite import NoCacheError, UnsupportedPatternError, UsageError, rewrite
from paged_rewrite.runtime.block_manager import BlockManager
from paged_rewrite.runtime.driver import SequenceScript, prefill_rows
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner
from paged_rewrite.runtime.verify import verify

QEFF = "com.qualcomm.cloud"


def _ops(nodes) -> Counter[str]:  # type: ignore[no-untyped-def]
    return Counter(n.op_type for n in nodes if n.domain == QEFF)


def test_continuous_batching_drops_batch_index(paged_fixture) -> None:
    _, paged_path, report = paged_fixture("llama_cb", 16)
    paged = onnx.load(paged_path)
    assert report.removed_inputs == ["batch_index"]
    assert "batch_index" not in [i.name for i in paged.graph.input]
    assert _ops(paged.graph.node) == {
        "PagedWriteIndex": 1,
        "PagedCtxScatter": 4,
        "PagedReadIndexCCL": 1,
        "PagedCtxGather": 4,
        "PagedLogicalShape": 1,
    }
    assert report.rewritten["CtxScatterCB -> PagedCtxScatter"] == 4


def test_blockedkv_reads_each_block_through_the_table(paged_fixture) -> None:
    original_path, paged_path, report = paged_fixture("llama_blockedkv", 32)
    before, after = _ops(onnx.load(original_path).graph.node), _ops(onnx.load(paged_path).graph.node)
    assert before["CtxGatherBlockedKV"] == 16
    assert after["PagedCtxGather"] == 16 and "CtxGatherBlockedKV" not in after
    assert after["PagedReadIndex"] == 4  # one per KV block, shared by both layers' K and V
    assert report.rewritten["CtxGatherBlockedKV -> PagedCtxGather"] == 16


def test_subfunctions_keep_one_shared_body_and_thread_the_table(paged_fixture) -> None:
    original_path, paged_path, report = paged_fixture("llama_subfunctions", 16)
    original, paged = onnx.load(original_path), onnx.load(paged_path)
    layer = "QEffLlamaDecoderLayer"
    before = next(f for f in original.functions if f.name == layer)
    bodies = [f for f in paged.functions if f.name == layer]
    assert len(bodies) == 1, "the shared decoder-layer body must not be cloned"
    body = bodies[0]
    # The addresses come in from the main graph, computed once per call: block_table and slot_id
    # are no longer read inside the layer, and its read positions moved out with them.
    kept = [name for name in before.input if name != "position_ids"]  # only the cache ops read it
    added = list(body.input)[len(kept) :]
    assert list(body.input)[: len(kept)] == kept
    assert "block_table" not in body.input and "slot_id" not in body.input
    assert [name.split(".")[1] for name in added] == [
        "logical_shape",
        "write_index",
        "zeros",
        "hoisted",
        "rows",
        "row_shape",
    ]  # fmt: skip  (hoisted: the layer's context length, which its mask reads too)
    assert _ops(body.node) == {"PagedCtxScatter": 2, "PagedCtxGather": 2}
    assert _ops(paged.graph.node) == {"PagedWriteIndex": 1, "PagedReadIndexCCL": 1, "PagedLogicalShape": 1}
    assert not [n for n in body.node if n.op_type.startswith("Ctx")]
    calls = [n for n in paged.graph.node if n.op_type == layer]
    assert len(calls) == 2 and all(list(c.input[len(kept) :]) == added for c in calls)
    assert report.functions == [layer]


def test_sliding_window_ring_keeps_its_length(paged_fixture) -> None:
    _, paged_path, report = paged_fixture("gpt_oss_swa_moe", 16)
    paged = onnx.load(paged_path)
    window_shapes = [n for n in paged.graph.node if n.op_type == "PagedWindowShape"]
    assert window_shapes and all("past_key.0" in n.input[0] for n in window_shapes)
    assert report.windows == {"sliding_window": 32}
    metadata = {p.key: p.value for p in paged.metadata_props}
    assert metadata["paged_rewrite.windows"] == '{"sliding_window": 32}'
    table = next(i for i in paged.graph.input if i.name == "block_table")
    assert table.type.tensor_type.shape.dim[1].dim_param == "num_kv_blocks"  # context buckets
    assert report.ctx_buckets == [16, 32, 64, CTX_LEN]  # the ring (32) fits the widest


def test_padding_does_not_overwrite_the_ring_as_the_original_does(paged_fixture) -> None:
    """gpt_oss: a padded prefill chunk after the ring wrapped. The original writes the padding
    into ring slot 31 (live data of position 31); the paged model leaves it alone."""
    original, paged, _ = paged_fixture("gpt_oss_swa_moe", 16)
    prompt = np.arange(1, 46, dtype=np.int64) % 200  # 45 tokens: chunk 1 = positions 32..44 + 19 pads
    rows = prefill_rows(SequenceScript("A", prompt, 0), 32)
    contiguous = ContiguousRunner(original, {"ctx_len": CTX_LEN, "sliding_window": 32})
    manager = BlockManager(20, 16)
    pagedr = PagedRunner(paged, manager, CTX_LEN // 16)
    for runner in (contiguous, pagedr):
        runner.step([rows[0]])
    ring_before = contiguous._cache["A"]["past_key.0"][0, :, 31].copy()
    block = manager.blocks_of("A")[1]  # ring slot 31 = column 1, offset 15
    paged_before = pagedr.pools["past_key.0"][block, :, 15].copy()
    assert np.array_equal(ring_before, paged_before)
    for runner in (contiguous, pagedr):
        runner.step([rows[1]])
    assert not np.array_equal(contiguous._cache["A"]["past_key.0"][0, :, 31], ring_before)  # the fault
    assert np.array_equal(pagedr.pools["past_key.0"][block, :, 15], paged_before)  # the contract


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (lambda d: no_cache_model(d / "relu.onnx"), NoCacheError, ["no KV cache"]),
        (
            lambda d: concat_cache_model(d / "concat.onnx"),
            UnsupportedPatternError,
            ["/layers.0/Concat", "ai.onnx::Concat", "dynamic KV cache"],
        ),
        (
            lambda d: with_renamed_op(
                fixture_model("llama_default"), d / "odd.onnx", "CtxScatter", "CtxScatterV2"
            ),
            UnsupportedPatternError,
            ["/model/layers.0/self_attn/CtxScatter", "com.qualcomm.cloud::CtxScatterV2", "unknown cache op"],
        ),
        (
            lambda d: with_input_dim(
                fixture_model("llama_default"), d / "dims.onnx", "past_key.1", 0, "other_batch"
            ),
            UnsupportedPatternError,
            ["/model/layers.1/self_attn/CtxScatter", "past_key.1", "other_batch"],
        ),
        (
            lambda d: fixture_model("gpt_oss_swa_moe"),
            UsageError,
            ["/model/layers.0/self_attn/CtxScatter", "--dim sliding_window=N"],
        ),
    ],
    ids=["no-cache", "concat-cache", "unknown-ctx-op", "dims-disagree", "ring-without-dim"],
)
def test_refusals_name_model_node_and_reason(tmp_path: Path, make, error, words: list[str]) -> None:  # type: ignore[no-untyped-def]
    model = make(tmp_path)
    with pytest.raises(error) as refused:
        rewrite(model, tmp_path / "out.onnx", 16)
    message = str(refused.value)
    assert message.startswith(str(model)) and "\n" not in message
    for word in words:
        assert word in message
    assert not (tmp_path / "out.onnx").exists()


def test_continuous_batching_table_has_one_row_per_token_row(paged_fixture) -> None:
    _, paged_path, _ = paged_fixture("llama_cb", 16)
    inputs = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in onnx.load(paged_path).graph.input
    }
    assert inputs["block_table"] == ["batch_size", "num_kv_blocks"] and inputs["slot_id"] == ["batch_size"]
    assert inputs["input_ids"][0] == "batch_size"  # not the cache's full_batch_size


def _rewritten_equal(tmp_path: Path, model: onnx.ModelProto, name: str, **flags: object) -> None:
    onnx.save(model, tmp_path / f"{name}.onnx")
    rewrite(tmp_path / f"{name}.onnx", tmp_path / f"{name}_paged.onnx", 16, ctx_len=CTX_LEN, **flags)  # type: ignore[arg-type]
    result = verify(tmp_path / f"{name}.onnx", tmp_path / f"{name}_paged.onnx")
    assert result.ok and result.max_abs_diff == 0.0, result.summary()


@pytest.mark.parametrize("name", ["llama_default", "llama_subfunctions"])
def test_models_without_node_names(tmp_path: Path, name: str) -> None:
    model = onnx.load(fixture_model(name))
    for body in [model.graph.node, *(f.node for f in model.functions)]:
        for node in body:
            node.name = ""  # node names are optional in ONNX
    _rewritten_equal(tmp_path, model, name)


def test_older_default_opset(tmp_path: Path) -> None:
    model = onnx.load(fixture_model("llama_default"))
    for imports in [model.opset_import, *(f.opset_import for f in model.functions)]:
        for entry in imports:
            if entry.domain == "":
                entry.version = 15
    _rewritten_equal(tmp_path, model, "opset15")


def test_static_ring_length_needs_no_flag(tmp_path: Path) -> None:
    model = onnx.load(fixture_model("gpt_oss_swa_moe"))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "sliding_window":
                dim.dim_value = 32
    _rewritten_equal(tmp_path, model, "static_ring")


def test_cache_read_inside_a_subgraph_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    model = onnx.load(fixture_model("llama_default"))
    branch = helper.make_graph(
        [helper.make_node("Shape", ["past_key.0"], ["branch_shape"])], "branch", [],
        [helper.make_tensor_value_info("branch_shape", TensorProto.INT64, [4])],
    )  # fmt: skip
    model.graph.node.append(
        helper.make_node(
            "Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])
        )
    )
    model.graph.node.append(
        helper.make_node(
            "If", ["cond"], ["shape_via_if"], name="/odd/If", then_branch=branch, else_branch=branch
        )
    )
    model.graph.output.append(helper.make_tensor_value_info("shape_via_if", TensorProto.INT64, [4]))
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "if.onnx")
    with pytest.raises(UnsupportedPatternError, match=r"/odd/If.*past_key\.0.*inside a subgraph"):
        rewrite(tmp_path / "if.onnx", tmp_path / "out.onnx", 16)


def test_cache_read_inside_a_subgraph_of_a_layer_function_is_refused(tmp_path: Path) -> None:
    """The same inside the shared layer function: an If there whose branch reads the layer's
    written cache would see a pool no paged read covers (nor its zero row), so it is refused."""
    from onnx import TensorProto, helper

    model = onnx.load(fixture_model("llama_subfunctions"))
    layer = next(f for f in model.functions if any(n.op_type == "CtxScatter" for n in f.node))
    written = next(n for n in layer.node if n.op_type == "CtxScatter").output[0]
    branch = helper.make_graph(
        [helper.make_node("Identity", [written], ["branch_value"])], "branch", [],
        [helper.make_tensor_value_info("branch_value", TensorProto.FLOAT, None)],
    )  # fmt: skip
    layer.node.append(
        helper.make_node(
            "Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])
        )
    )
    layer.node.append(
        helper.make_node("If", ["cond"], ["via_if"], name="/odd/If", then_branch=branch, else_branch=branch)
    )
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "if.onnx")
    with pytest.raises(UnsupportedPatternError) as error:
        rewrite(tmp_path / "if.onnx", tmp_path / "out.onnx", 16)
    assert (
        f"node '/odd/If' (ai.onnx::If) in function {layer.name!r} reads cache {written!r} inside a subgraph"
        in str(error.value)
    )
    assert not (tmp_path / "out.onnx").exists()
