"""The paged ops as shipped: flat bodies (no function calls), fewer than 100 nodes each, only ops of
QEfficient's own exports (the vocabulary, derived from the corpus and checked in), and only the
ops a model calls."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ALL_FIXTURES, RUNNABLE_FEATURE_FIXTURES, fixture_model
from onnx import TensorProto, helper

from paged_rewrite import UnsupportedPatternError, rewrite
from paged_rewrite.custom_ops import EMITTED_OPS, MAX_BODY_NODES, PAGED_DOMAIN, paged_function_protos
from paged_rewrite.custom_ops.vocabulary import op_vocabulary


@pytest.mark.parametrize("cache_type", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_every_body_is_flat_small_and_in_the_vocabulary(cache_type: int) -> None:
    protos = paged_function_protos(cache_type=cache_type)
    assert [p.name for p in protos] == list(EMITTED_OPS)
    for proto in protos:
        assert len(proto.node) < MAX_BODY_NODES, proto.name
        assert {n.domain for n in proto.node} <= {""}, proto.name  # no call to any function
        assert {("ai.onnx", n.op_type) for n in proto.node} <= op_vocabulary(), proto.name
        assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
        if proto.name == "PagedWriteIndex":  # the zero rows have the caches' type
            assert cache_type in {a.i for n in proto.node if n.op_type == "Cast" for a in n.attribute}


@pytest.mark.parametrize("kv_block_size", [16, 32, 128])
@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_each_output_ships_only_the_ops_it_calls(paged_fixture, name: str, kv_block_size: int) -> None:
    _, paged_path, report = paged_fixture(name, kv_block_size)
    _assert_ships_what_it_calls(onnx.load(paged_path), report.paged_op_nodes)


@pytest.mark.parametrize("kv_block_size", [16, 32])
@pytest.mark.parametrize("name", RUNNABLE_FEATURE_FIXTURES)
def test_each_feature_output_ships_only_the_ops_it_calls(
    paged_feature_fixture, name: str, kv_block_size: int
) -> None:
    _, paged_path = paged_feature_fixture(name, kv_block_size)
    model = onnx.load(paged_path)
    emitted = {
        f.name: len(f.node) for f in model.functions if f.domain == PAGED_DOMAIN and f.name in EMITTED_OPS
    }
    _assert_ships_what_it_calls(model, emitted)


def test_node_counts_are_in_the_report_and_its_json(tmp_path) -> None:
    report = rewrite(
        fixture_model("gpt_oss_swa_moe"), tmp_path / "p.onnx", 16, ctx_len=128, dims={"sliding_window": 32}
    )
    counts = report.to_dict()["paged_op_nodes"]
    assert set(counts) == {
        "PagedWriteIndex",
        "PagedCtxScatter",
        "PagedReadIndexCCL",
        "PagedCtxGather",
        "PagedLogicalShape",
        "PagedWindowShape",
    }
    assert counts == {p.name: len(p.node) for p in paged_function_protos(counts)}
    assert "paged ops emitted (nodes in each flat body): PagedWriteIndex" in report.summary()


def _write_then_read(cache_type: int) -> onnx.ModelProto:
    """One write and one read of a ``[3, 1, 2, 2]`` pool, as the rewrite emits them."""
    i64 = TensorProto.INT64
    write = ["pool", "table", "slot", "positions", "period"]
    nodes = [
        helper.make_node("PagedWriteIndex", write, ["index", "zeros"], domain=PAGED_DOMAIN),
        helper.make_node(
            "PagedCtxScatter", ["pool", "index", "updates", "zeros"], ["written"], domain=PAGED_DOMAIN
        ),
        helper.make_node(
            "PagedReadIndex", ["pool", "table", "idx"], ["rows", "row_shape"], domain=PAGED_DOMAIN
        ),
        helper.make_node("PagedCtxGather", ["written", "rows", "row_shape"], ["out"], domain=PAGED_DOMAIN),
    ]
    inputs = [
        helper.make_tensor_value_info("pool", cache_type, [3, 1, 2, 2]),
        helper.make_tensor_value_info("table", i64, [1, 2]),
        helper.make_tensor_value_info("idx", i64, [1, 1, 4]),
        helper.make_tensor_value_info("slot", i64, [1]),
        helper.make_tensor_value_info("positions", i64, [1, 1]),
        helper.make_tensor_value_info("period", i64, []),
        helper.make_tensor_value_info("updates", cache_type, [1, 1, 1, 2]),
    ]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("out", cache_type, [1, 1, 4, 2])]
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(PAGED_DOMAIN, 1)],
        functions=paged_function_protos(cache_type=cache_type),
        ir_version=8,
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_float16_pool_reads_float16_zeros() -> None:
    """The zero rows take the caches' type (CastLike in the source, a Cast when emitted)."""
    pool = np.full((3, 1, 2, 2), np.nan, np.float16)
    pool[2] = 7
    feeds = {
        "pool": pool,
        "table": np.array([[2, -1]]),
        "idx": np.array([[[0, 1, 2, -1]]]),
        "slot": np.array([0]),
        "positions": np.array([[-1]]),  # a padding token: written to the null block only
        "period": np.array(2),
        "updates": np.full((1, 1, 1, 2), np.nan, np.float16),
    }
    model = _write_then_read(TensorProto.FLOAT16)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, feeds)
    assert out.dtype == np.float16
    assert np.array_equal(out[0, 0], np.array([[7, 7], [7, 7], [0, 0], [0, 0]], np.float16))


def test_bfloat16_caches_get_ops_onnxruntime_cpu_can_load() -> None:
    """The zeros are expanded as float and then cast: onnxruntime's CPU Expand has no bfloat16
    kernel, so an Expand of bfloat16 zeros would make every bfloat16 paged model unloadable."""
    model = _write_then_read(TensorProto.BFLOAT16)
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_caches_of_different_types_are_refused(tmp_path) -> None:
    """The paged ops are emitted for one cache type: a model mixing them says so (exit 5)."""
    model = onnx.load(fixture_model("llama_default"))
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith("past_value.1"):
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, tmp_path / "mixed.onnx")
    with pytest.raises(
        UnsupportedPatternError, match=r"past_value\.1' is FLOAT16 but 'past_key\.0' is FLOAT"
    ):
        rewrite(tmp_path / "mixed.onnx", tmp_path / "p.onnx", 16)


def _assert_ships_what_it_calls(model: onnx.ModelProto, counts: dict[str, int]) -> None:
    bodies = [model.graph.node, *(f.node for f in model.functions)]
    called = {
        n.op_type for body in bodies for n in body if n.domain == PAGED_DOMAIN and n.op_type in EMITTED_OPS
    }
    paged = {f.name: f for f in model.functions if f.domain == PAGED_DOMAIN and f.name.startswith("Paged")}
    assert set(paged) == called and called
    assert counts == {name: len(f.node) for name, f in paged.items()}
    for function in paged.values():
        assert len(function.node) < MAX_BODY_NODES
        assert all(n.domain == "" and ("ai.onnx", n.op_type) in op_vocabulary() for n in function.node)


def test_constants_merge_by_value_and_onnx_type_only() -> None:
    """``value_int=1`` and an int64 scalar tensor 1 are one node in an emitted body; an INT4 and a
    UINT4 1 (one numpy byte type for both) are not, nor are a float 1.0 and an int 1."""
    from paged_rewrite.custom_ops.emit import _merge_duplicates

    def constant(name: str, data_type: int, value: float) -> onnx.NodeProto:
        return helper.make_node(
            "Constant", [], [name], value=helper.make_tensor(name, data_type, [], [value])
        )

    nodes = [
        constant("int4", TensorProto.INT4, 1),
        constant("uint4", TensorProto.UINT4, 1),
        constant("int64", TensorProto.INT64, 1),
        helper.make_node("Constant", [], ["int64_attr"], value_int=1),
        constant("float", TensorProto.FLOAT, 1.0),
        *(helper.make_node("Identity", [name], [f"use_{name}"]) for name in ("uint4", "int64_attr", "float")),
    ]
    kept = _merge_duplicates(nodes, {"use_uint4", "use_int64_attr", "use_float"})
    uses = {n.output[0]: n.input[0] for n in kept if n.op_type == "Identity"}
    assert uses == {"use_uint4": "uint4", "use_int64_attr": "int64", "use_float": "float"}
    assert [n.output[0] for n in kept if n.op_type == "Constant"] == ["int4", "uint4", "int64", "float"]
