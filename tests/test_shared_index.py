"""The index ops are shared only between values that are equal: what ``shared_index`` compares
(the expression computing a value) and the two ways a layer function's positions reach the
main graph (moved out, or left in the layer when its calls disagree), each run for parity."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest
from conftest import fixture_model
from derived_models import positions_renamed_for_one_call, read_positions_through_split
from onnx import TensorProto, helper

from paged_rewrite import rewrite
from paged_rewrite.graph import Body
from paged_rewrite.passes.expression_keys import ExpressionKeys
from paged_rewrite.runtime.verify import verify


def _keys(
    nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto] = (), inputs: list[str] = ()
) -> ExpressionKeys:  # type: ignore[assignment]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, TensorProto.INT64, [2, 3]) for name in ["x", *inputs]],
        [],
        list(initializers),
    )
    return ExpressionKeys(Body(graph))


def _const(name: str, value: int) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor("v", TensorProto.INT64, [], [value])
    )


def test_the_same_computation_under_other_names_is_one_value() -> None:
    keys = _keys(
        [
            _const("c1", 32), helper.make_node("Mod", ["x", "c1"], ["a"], name="layer0/Mod"),
            _const("c2", 32), helper.make_node("Mod", ["x", "c2"], ["b"], name="layer1/Mod"),
            helper.make_node("Identity", ["b"], ["b_again"]),
        ]
    )  # fmt: skip
    assert keys.key("a") == keys.key("b") == keys.key("b_again")


def test_what_differs_in_value_differs_in_key() -> None:
    int64 = TensorProto.INT64
    keys = _keys(
        [
            _const("c32", 32), _const("c64", 64),
            helper.make_node("Mod", ["x", "c32"], ["mod32"]),
            helper.make_node("Mod", ["x", "c64"], ["mod64"]),
            helper.make_node("Mod", ["x", "i32"], ["mod_i32"]),
            helper.make_node("Mod", ["x", "j32"], ["mod_j32"]),
            helper.make_node("Mod", ["x", "k32"], ["mod_k32"]),  # k32 may be overridden: an input
            helper.make_node("Mod", ["x", "i64"], ["mod_i64"]),
            helper.make_node("Gather", ["x", "zero"], ["axis0"], axis=0),
            helper.make_node("Gather", ["x", "zero"], ["axis1"], axis=1),
            helper.make_node("Split", ["x"], ["half0", "half1"], axis=0),
            helper.make_node("Concat", ["x", "x"], ["cat0"], axis=0),
            helper.make_node("Concat", ["x", "x"], ["cat1"], axis=1),
        ],
        [
            helper.make_tensor("i32", int64, [], [32]), helper.make_tensor("j32", int64, [], [32]),
            helper.make_tensor("k32", int64, [], [32]), helper.make_tensor("i64", int64, [], [64]),
            helper.make_tensor("zero", int64, [], [0]),
        ],
        inputs=["k32"],
    )  # fmt: skip
    assert keys.key("mod32") != keys.key("mod64")
    assert keys.key("mod_i32") == keys.key("mod_j32") != keys.key("mod_i64")  # initializers by value
    assert keys.key("mod_k32") != keys.key("mod_i32")  # a graph input's default is no constant
    assert keys.key("axis0") != keys.key("axis1")
    assert keys.key("half0") != keys.key("half1")
    assert keys.key("cat0") != keys.key("cat1")


def test_a_random_op_is_never_shared() -> None:
    keys = _keys(
        [
            helper.make_node("RandomUniformLike", ["x"], ["r1"], dtype=TensorProto.FLOAT),
            helper.make_node("RandomUniformLike", ["x"], ["r2"], dtype=TensorProto.FLOAT),
        ]
    )
    assert keys.key("r1") != keys.key("r2")


def _ops(model: onnx.ModelProto) -> tuple[Counter[str], Counter[str]]:
    main = Counter(n.op_type for n in model.graph.node if n.op_type.startswith("Paged"))
    layers = Counter(
        n.op_type
        for f in model.functions
        if not f.name.startswith("Paged")
        for n in f.node
        if n.op_type.startswith("Paged")
    )
    return main, layers


def test_positions_from_the_second_output_of_a_split_move_out_right(tmp_path: Path) -> None:
    """The layer's read positions are output 1 of a Split: moved to the main graph, the reads
    must take the copy of output 1 (output 0 is zeros: reading it gives wrong logits)."""
    original = read_positions_through_split(fixture_model("llama_subfunctions"), tmp_path / "split.onnx")
    rewrite(original, tmp_path / "paged.onnx", 16, ctx_len=128)
    main, layers = _ops(onnx.load(tmp_path / "paged.onnx"))
    assert main["PagedReadIndexCCL"] == 1 and not layers["PagedReadIndexCCL"]
    result = verify(original, tmp_path / "paged.onnx", seed=16)
    assert result.ok and result.bit_exact, result.summary()


@pytest.mark.parametrize("kv_block_size", [16, 32])
def test_calls_that_feed_the_positions_differently_keep_the_index_ops_in_the_layer(
    tmp_path: Path, kv_block_size: int
) -> None:
    """The two layer calls get position_ids under two names: the write addresses cannot be
    computed once for both in the main graph, so the layer computes them (once for its K and V)."""
    original = positions_renamed_for_one_call(fixture_model("llama_subfunctions"), tmp_path / "renamed.onnx")
    rewrite(original, tmp_path / "paged.onnx", kv_block_size, ctx_len=128)
    main, layers = _ops(onnx.load(tmp_path / "paged.onnx"))
    assert layers["PagedWriteIndex"] == 1 and not main["PagedWriteIndex"]
    result = verify(original, tmp_path / "paged.onnx", seed=kv_block_size)
    assert result.ok and result.bit_exact, result.summary()
