"""Every value of every paged fixture gets a static shape under each specialization written for
it (the QAIC compiler specializes per entry), and --full-check says so, or fails naming the
value the rewrite left non-static."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import onnx.inliner
import pytest
from conftest import ALL_FIXTURES, FEATURE_FIXTURES, FIXTURES, RUNNABLE_FEATURE_FIXTURES, fixture_model
from onnx import TensorProto, helper

from paged_rewrite import OutputError, UsageError, rewrite
from paged_rewrite.builder import ExportSpec, write_qeff_export
from paged_rewrite.custom_ops import paged_function_protos
from paged_rewrite.handoff import entry_origins, read_specializations
from paged_rewrite.model_io import load_model
from paged_rewrite.static_shapes import check_specializations, check_static

FAILING_FEATURE_FIXTURES = [
    "ort_failing/gpt_oss_decode_retain_full_kv",
    "ort_failing/llama_lora",
    "ort_failing/llama_sampler",
    "ort_failing/qwen3_moe_prefill_chunked",
]
EVERY_FIXTURE = [(FIXTURES, name) for name in ALL_FIXTURES] + [
    (FEATURE_FIXTURES, name) for name in RUNNABLE_FEATURE_FIXTURES + FAILING_FEATURE_FIXTURES
]
# Strict ONNX shape inference rejects this export itself: QEfficient's CtxScatter3DInt scatters
# MoE activations with int32 indices. What it feeds stays non-static, in the original as well.
INPUT_FAILS_STRICT_INFERENCE = {"ort_failing/qwen3_moe_prefill_chunked"}
# Values of the symbols that are not the usual batch/sequence/context ones, per entry.
OTHER_SYMBOLS = {"comp_ctx_lengths": 96, "num_logits_to_keep": 1, "vision_batch_size": 1, "vision_size": 8}


def complete_specializations(model: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """A prefill and (unless the export is prefill-only) a decode entry giving every symbolic
    input dim of ``model`` a value: the scenario's context, a 32-slot ring, 4 CB rows."""
    graph = onnx.load(model, load_external_data=False).graph
    symbols = {d.dim_param for v in graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    scenario = manifest["scenario"]
    rows = scenario.get("full_batch_size", 4)
    steps = [("prefill", scenario.get("prefill_seq_len", 32))]
    if "prefill_only" not in (manifest.get("features") or []):
        steps.append(("decode", 1))
    entries = []
    for name, seq_len in steps:
        values = {"batch_size": rows if name == "decode" and "full_batch_size" in symbols else 1}
        values |= {"seq_len": seq_len, "ctx_len": scenario["ctx_len"], "full_batch_size": rows}
        values |= {"sliding_window": scenario.get("sliding_window_kv_len") or 32, **OTHER_SYMBOLS}
        assert symbols <= set(values), symbols - set(values)
        entries.append({"name": name, "symbols": {s: str(values[s]) for s in sorted(symbols)}})
    return {"specializations": entries}


@pytest.mark.parametrize("kv_block_size", [16, 32, 128])
@pytest.mark.parametrize(("corpus", "name"), EVERY_FIXTURE, ids=[name for _, name in EVERY_FIXTURE])
def test_every_value_is_static_under_every_specialization(
    tmp_path: Path, corpus: Path, name: str, kv_block_size: int
) -> None:
    source = fixture_model(name, corpus)
    specializations = tmp_path / "specializations.json"
    specializations.write_text(json.dumps(complete_specializations(source, _manifest(source))))
    strict = name not in INPUT_FAILS_STRICT_INFERENCE  # --full-check would blame the input
    out = tmp_path / "paged.onnx"
    if kv_block_size > _manifest(source)["scenario"]["ctx_len"]:  # gpt_oss_prefill_only: 64 tokens
        with pytest.raises(UsageError, match="larger than the context"):
            rewrite(source, out, kv_block_size, specializations=specializations)
        return
    report = rewrite(source, out, kv_block_size, specializations=specializations, full_check=strict)
    if not strict:
        written = json.loads(out.with_name("paged.specializations.json").read_text())
        report.static_shapes = check_specializations(
            onnx.load(out, load_external_data=False),
            report,
            written,
            entry_origins(report, read_specializations(specializations), report.bound_dims),
            lambda: load_model(source),
        )
    written = json.loads(out.with_name("paged.specializations.json").read_text())
    assert [r.specialization for r in report.static_shapes] == [e["name"] for e in written["specializations"]]
    given = {e["name"] for e in json.loads(specializations.read_text())["specializations"]}
    assert {r.specialization.rsplit("_ctx", 1)[0] for r in report.static_shapes} == given
    for result in report.static_shapes:
        assert result.ok and not result.placeholders, result.specialization
        assert set(result.symbols) == {d for spec in report.inputs for d in spec.shape if isinstance(d, str)}
        inherited = {value.name for value in result.already_non_static}
        if name in INPUT_FAILS_STRICT_INFERENCE:
            first = result.already_non_static[0]
            assert "CtxScatter3DInt" in first.name and "int32" in (first.problem or "")
        else:
            assert inherited == set(), sorted(inherited)[:5]


def test_full_check_names_a_value_the_rewrite_left_non_static(tmp_path: Path, monkeypatch) -> None:
    """A logical shape read from the table's contents instead of its shape: every mask derived
    from it loses its static shape, and --full-check refuses naming the first such value."""
    from paged_rewrite.passes import finalize_model

    def data_dependent(names: Any, cache_type: int) -> list[onnx.FunctionProto]:
        protos = paged_function_protos(names, cache_type)
        for proto in protos:
            if proto.name == "PagedLogicalShape":
                _make_length_depend_on_table_contents(proto)
        return protos

    monkeypatch.setattr(finalize_model, "paged_function_protos", data_dependent)
    source = fixture_model("llama_default")
    with pytest.raises(
        OutputError, match=r"under specialization '\w+' the rewrite leaves '.*' .*without a static"
    ):
        rewrite(source, tmp_path / "p.onnx", 32, ctx_len=128, full_check=True)
    assert list(tmp_path.iterdir()) == []
    rewrite(source, tmp_path / "p.onnx", 32, ctx_len=128)  # without --full-check nobody looks


def test_non_static_values_of_the_original_are_reported_not_blamed() -> None:
    """A value the original leaves non-static (a NonZero) and what it feeds are the export's
    own; a new value with a data-dependent shape is the rewrite's."""
    original, paged = _model(paged=False), _model(paged=True)
    result = check_static(paged, {"n": 4}, lambda: original, {"n": 4}, "decode")
    assert {v.name for v in result.already_non_static} == {"nz", "flat"}
    assert [v.name for v in result.made_non_static] == ["new"]
    assert "'new' (Reshape, shape [?])" in result.made_non_static[0].describe()
    assert check_static(original, {"n": 4}).made_non_static  # alone, nothing explains it


def test_open_symbols_are_checked_at_placeholders_and_listed(tmp_path: Path) -> None:
    report = rewrite(
        fixture_model("llama_default"),
        tmp_path / "p.onnx",
        32,
        ctx_len=128,
        ctx_buckets=[128],
        full_check=True,
    )
    assert [r.specialization for r in report.static_shapes] == ["prefill_ctx128", "decode_ctx128"]
    result = report.static_shapes[0]  # prefill: seq_len left open
    assert result.ok and result.made_non_static == [] and result.already_non_static == []
    assert result.placeholders == {"batch_size": 1, "seq_len": 1, "total_num_kv_blocks": 5}
    assert "values static" in report.summary()
    assert report.to_dict()["static_shapes"][0]["values"] == result.values


def test_the_80_layer_builder_model_is_static_and_compiler_ready(tmp_path: Path) -> None:
    """The builder's 80-layer graph (tiny weights, same structure) at 4096 tokens."""
    spec = ExportSpec(num_layers=80, max_position=4096)
    source = write_qeff_export(tmp_path / "model.onnx", spec)
    specializations = tmp_path / "specializations.json"
    entries = [{"name": n, "symbols": {"batch_size": "1", "seq_len": s, "ctx_len": "4096"}} for n, s in (("prefill", "128"), ("decode", "1"))]  # fmt: skip
    specializations.write_text(json.dumps({"specializations": entries}))
    report = rewrite(
        source, tmp_path / "p.onnx", 128, specializations=specializations, ctx_buckets=[4096], full_check=True
    )
    assert [r.ok for r in report.static_shapes] == [True, True]
    paged = onnx.load(tmp_path / "p.onnx", load_external_data=False)
    expanded = sum(len(n.output) for n in onnx.inliner.inline_local_functions(paged).graph.node)
    assert expanded > 8000  # 80 layers: every layer's values, with the function bodies expanded
    assert all(not r.already_non_static and r.values >= expanded for r in report.static_shapes)
    assert report.paged_op_nodes.keys() == {
        "PagedWriteIndex",
        "PagedCtxScatter",
        "PagedReadIndexCCL",
        "PagedCtxGather",
        "PagedLogicalShape",
    }
    assert max(report.paged_op_nodes.values()) < 100


def _manifest(model: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((model.parent / "manifest.json").read_text())
    return manifest


def _make_length_depend_on_table_contents(function: onnx.FunctionProto) -> None:
    """Replace the logical shape's output by one whose length is ``ReduceMax(block_table)``."""
    output = function.output[0]
    for node in function.node:
        node.output[:] = [f"{name}_unused" if name == output else name for name in node.output]
    function.node.extend(
        [
            helper.make_node("ReduceMax", ["block_table"], ["largest"], keepdims=0),
            helper.make_node("Reshape", ["largest", "one"], ["length"]),
            helper.make_node("Constant", [], ["one"], value_ints=[1]),
            helper.make_node("Shape", ["pool"], ["pool_shape"]),
            helper.make_node("Concat", ["pool_shape", "length"], ["both"], axis=0),
            helper.make_node("Slice", ["both", "starts", "ends"], [output]),
            helper.make_node("Constant", [], ["starts"], value_ints=[1]),
            helper.make_node("Constant", [], ["ends"], value_ints=[5]),
        ]
    )
    _sort(function)


def _sort(function: onnx.FunctionProto) -> None:
    """Order the body so every node follows its producers."""
    ready = set(function.input)
    pending, ordered = list(function.node), []
    while pending:
        node = next(n for n in pending if all(i in ready or not i for i in n.input))
        pending.remove(node)
        ordered.append(node)
        ready.update(node.output)
    del function.node[:]
    function.node.extend(ordered)


def _model(paged: bool) -> onnx.ModelProto:
    """``x[n]`` -> NonZero -> flattened; the paged variant also reshapes by values read from ``x``."""
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"]),
        helper.make_node("Reshape", ["nz", "minus_one"], ["flat"]),
    ]
    if paged:
        nodes += [
            helper.make_node("Slice", ["x", "zero", "one"], ["head"]),
            helper.make_node("Reshape", ["x", "head"], ["new"]),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("flat", TensorProto.INT64, None)],
        initializer=[
            helper.make_tensor("minus_one", TensorProto.INT64, [1], [-1]),
            helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
            helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
