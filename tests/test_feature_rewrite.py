"""Before/after structure on every export of the feature corpus (``qeff-features``), runnable or not.

The corpus manifests say, independently of this tool, which inputs are KV caches
(``cache_tensors.kv``) and list every Ctx op call with its operands (``ctx_ops``). A rewrite must
page exactly those caches, leave every other Ctx op and every node outside the KV path byte for
byte as it was, keep each function definition something still calls, and call nothing undefined.
For the exports onnxruntime cannot run (``ort_failing/``) this structural proof is the evidence;
the runnable ones are also run (test_feature_fixtures.py).
"""

from __future__ import annotations

import json
from collections import Counter

import onnx
import onnx.inliner
import pytest
from conftest import (
    FEATURE_FIXTURES,
    NODE_BOUND,
    ONE_GROUP_BOUND,
    RUNNABLE_FEATURE_FIXTURES,
    assert_paging_grows_only_its_index_ops,
    feature_fixture_model,
)

from paged_rewrite import rewrite
from paged_rewrite.errors import NotAModelError

QEFF = "com.qualcomm.cloud"
PAGED_FORM = {  # the contract: what each KV op becomes
    "CtxScatter": "PagedCtxScatter",
    "CtxScatterCB": "PagedCtxScatter",
    "CtxGather": "PagedCtxGather",
    "CtxGatherCB": "PagedCtxGather",
}
FEATURE_EXPORTS = [
    *RUNNABLE_FEATURE_FIXTURES,
    "ort_failing/gpt_oss_decode_retain_full_kv",
    "ort_failing/llama_lora",
    "ort_failing/llama_sampler",
    "ort_failing/qwen3_moe_prefill_chunked",
]


def rewrite_options(name: str) -> dict[str, object]:
    """ctx_len and the ring length from the fixture's own scenario."""
    scenario = json.loads((FEATURE_FIXTURES / name / "manifest.json").read_text())["scenario"]
    dims = (
        {"sliding_window": scenario["sliding_window_kv_len"]} if "sliding_window_kv_len" in scenario else {}
    )
    return {"ctx_len": scenario["ctx_len"], "dims": dims}


def _functions(model: onnx.ModelProto) -> dict[str, bytes]:
    return {f.name: f.SerializeToString() for f in model.functions}


def _ancestors(graph: onnx.GraphProto, names: set[str]) -> set[tuple[str, ...]]:
    """The nodes (by their outputs) that compute ``names``, transitively."""
    producers = {out: node for node in graph.node for out in node.output}
    found: set[tuple[str, ...]] = set()
    stack = [producers[name] for name in names if name in producers]
    while stack:
        node = stack.pop()
        if tuple(node.output) not in found:
            found.add(tuple(node.output))
            stack.extend(producers[name] for name in node.input if name in producers)
    return found


def _called(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for body in [model.graph.node, *(f.node for f in model.functions)] for n in body}


# Why each corpus export's other Ctx ops are not KV, in the words of the corpus README.
LEFT_ALONE_BECAUSE = {
    "ort_failing/llama_lora": ("initializer", "computed value"),  # adapter weights (some transposed)
    "ort_failing/llama_sampler": ("axis 1",),  # [batch, vocab] penalty buffers
    "ort_failing/qwen3_moe_prefill_chunked": ("axis 1",),  # MoE activations
}


def test_the_lists_cover_the_whole_corpus() -> None:
    """A fixture added to the corpus must not go untested unnoticed."""
    on_disk = sorted(
        str(p.parent.relative_to(FEATURE_FIXTURES)) for p in FEATURE_FIXTURES.glob("**/model.onnx")
    )
    if not on_disk:
        feature_fixture_model(FEATURE_EXPORTS[0])  # skips, or fails when the corpus is required
    assert sorted(FEATURE_EXPORTS) == on_disk
    assert sorted(RUNNABLE_FEATURE_FIXTURES) == sorted(n for n in on_disk if not n.startswith("ort_failing/"))


@pytest.mark.parametrize("name", FEATURE_EXPORTS)
@pytest.mark.parametrize("kv_block_size", [16, 32, 128])
def test_only_the_kv_caches_are_paged(tmp_path, name: str, kv_block_size: int) -> None:
    source = feature_fixture_model(name)
    manifest = json.loads((FEATURE_FIXTURES / name / "manifest.json").read_text())
    paged = tmp_path / "paged.onnx"
    options = rewrite_options(name)
    options["ctx_len"] = max(int(options["ctx_len"]), kv_block_size)  # type: ignore[call-overload]
    report = rewrite(source, paged, kv_block_size, **options)  # type: ignore[arg-type]
    before, after = onnx.load(source), onnx.load(paged)

    # Exactly the manifest's KV tensors are paged, and only their Ctx ops are replaced.
    kv = set(manifest["cache_tensors"]["kv"])
    assert {c.input for c in report.caches} == kv
    others = [entry["input"] for entry in manifest["cache_tensors"]["other_retained_states"]]
    assert report.other_retained_states == others
    retained = {name: f"{name}_RetainedState" for name in kv}
    kv_values = kv | set(retained.values())
    kv_calls = [op for op in manifest["ctx_ops"] if op["inputs"][0] in kv_values]
    other_calls = [op for op in manifest["ctx_ops"] if op["inputs"][0] not in kv_values]
    assert len(report.left_alone) == len(other_calls)
    assert Counter(op.op for op in report.left_alone) == Counter(op["op"] for op in other_calls)
    reasons = LEFT_ALONE_BECAUSE.get(name, ())
    assert all(any(word in op.reason for word in reasons) for op in report.left_alone), report.left_alone

    # Every node outside the KV path is unchanged, byte for byte (matched by its outputs). Only
    # nodes that computed the KV ops' positions may be gone (the index ops share one computation;
    # each layer's unread copy is pruned), and only if nothing in the output reads their values.
    paged_nodes = {tuple(n.output): n for n in after.graph.node}
    kv_outputs = {op["outputs"][0] for op in kv_calls}
    positions = _ancestors(before.graph, {name for op in kv_calls for name in op["inputs"][1:]})
    read_after = {name for n in after.graph.node for name in n.input} | {o.name for o in after.graph.output}
    for node in before.graph.node:
        if node.output[0] in kv_outputs:
            assert paged_nodes[tuple(node.output)].op_type == PAGED_FORM[node.op_type]
        elif tuple(node.output) not in paged_nodes:
            assert tuple(node.output) in positions and not set(node.output) & read_after, node.name
        elif not (node.op_type == "Shape" and node.input[0] in kv_values):
            assert paged_nodes[tuple(node.output)].SerializeToString() == node.SerializeToString(), node.name

    # Function definitions: each one still called stays byte for byte; none called is missing.
    old, new = _functions(before), _functions(after)
    called = _called(after)
    for function, body in old.items():
        if function in called:
            assert new.get(function) == body, f"definition of {function} changed or removed"
        else:
            assert function in PAGED_FORM, f"{function} removed"
    defined = set(new)
    assert {n.op_type for n in after.graph.node if n.domain == QEFF} <= defined
    onnx.checker.check_model(str(paged))

    # Non-KV retained states keep their interface.
    outputs = {o.name: o.SerializeToString() for o in before.graph.output}
    for value in after.graph.output:
        if value.name not in retained.values() and value.name in outputs:
            assert value.SerializeToString() == outputs[value.name], value.name

    # Inlined, what grows is the index ops alone, and by at most 5% (BENCHMARKS.md, "Graph size"),
    # but for gpt_oss's two address groups in two layers (bounded by what they cost today).
    assert_paging_grows_only_its_index_ops(source, paged, Counter(op["op"] for op in kv_calls))
    inlined = [len(onnx.inliner.inline_local_functions(m).graph.node) for m in (before, after)]
    assert inlined[1] <= NODE_BOUND.get(name, ONE_GROUP_BOUND) * inlined[0], inlined


def test_lora_keeps_the_adapter_gathers_and_their_definition(tmp_path) -> None:
    """The reported break: LoRA's CtxGatherCB on adapter weights must survive with its body."""
    report = rewrite(feature_fixture_model("ort_failing/llama_lora"), tmp_path / "p.onnx", 32, ctx_len=128)
    model = onnx.load(tmp_path / "p.onnx")
    assert sum(n.op_type == "CtxGatherCB" for n in model.graph.node) == 12
    assert any(f.name == "CtxGatherCB" for f in model.functions)
    assert {op.data.split(".")[-1] for op in report.left_alone} >= {"lora_a_weights", "lora_b_weights"}
    manifest = json.loads((tmp_path / "p.onnx.json").read_text())
    assert len(manifest["left_alone"]) == 12


def test_sampler_buffers_stay_contiguous(tmp_path) -> None:
    report = rewrite(feature_fixture_model("ort_failing/llama_sampler"), tmp_path / "p.onnx", 32, ctx_len=128)
    assert {op.op for op in report.left_alone} == {"CtxScatterCB3D"}
    assert all("axis 1" in op.reason for op in report.left_alone)
    inputs = {spec.name: spec.shape for spec in report.inputs}
    assert inputs["past_repetition_penalty_buffer"] == ["batch_size", 256]
    assert inputs["past_key.0"] == ["total_num_kv_blocks", 2, 32, 16]


def test_full_check_blames_an_input_that_fails_strict_inference_itself(tmp_path) -> None:
    """QEfficient's CtxScatter3DInt scatters with int32 indices, which strict shape inference
    rejects in the original too: --full-check says the input is at fault, and writes nothing."""
    source = feature_fixture_model("ort_failing/qwen3_moe_prefill_chunked")
    with pytest.raises(NotAModelError, match="CtxScatter3DInt"):
        rewrite(source, tmp_path / "p.onnx", 32, ctx_len=128, full_check=True)
    assert list(tmp_path.iterdir()) == []
    rewrite(source, tmp_path / "p.onnx", 32, ctx_len=128)  # the structural check passes
