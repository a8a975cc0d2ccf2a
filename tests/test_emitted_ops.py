"""The paged ops as shipped: flat bodies (no function calls), fewer than 100 nodes each, only ops of
QEfficient's own exports (the vocabulary, derived from the corpus and checked in), and only the
ops a model calls."""

from __future__ import annotations

import onnx
import pytest
from conftest import ALL_FIXTURES, RUNNABLE_FEATURE_FIXTURES, fixture_model

from paged_rewrite import rewrite
from paged_rewrite.custom_ops import EMITTED_OPS, MAX_BODY_NODES, PAGED_DOMAIN, paged_function_protos
from paged_rewrite.custom_ops.vocabulary import op_vocabulary


def test_every_body_is_flat_small_and_in_the_vocabulary() -> None:
    protos = paged_function_protos()
    assert [p.name for p in protos] == list(EMITTED_OPS)
    for proto in protos:
        assert len(proto.node) < MAX_BODY_NODES, proto.name
        assert {n.domain for n in proto.node} <= {""}, proto.name  # no call to any function
        assert {("ai.onnx", n.op_type) for n in proto.node} <= op_vocabulary(), proto.name
        assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]


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
    assert set(counts) == {"PagedCtxScatter", "PagedCtxGather", "PagedLogicalShape", "PagedWindowShape"}
    assert counts == {p.name: len(p.node) for p in paged_function_protos(counts)}


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
