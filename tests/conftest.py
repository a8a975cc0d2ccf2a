"""Shared test fixtures. The QEfficient fixture corpora live outside the repo, in
``../shared/fixtures/qeff`` and ``../shared/fixtures/qeff-features`` (override with
PAGED_REWRITE_FIXTURES / PAGED_REWRITE_FEATURE_FIXTURES). Where they are absent the tests that
need them skip, saying so — unless PAGED_REWRITE_REQUIRE_FIXTURES=1 (CI sets it), where a
missing corpus fails them: CI must never pass without the real exports."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import pytest

from paged_rewrite import rewrite

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PAGED_REWRITE_FIXTURES", REPO.parent / "shared" / "fixtures" / "qeff"))
FEATURE_FIXTURES = Path(
    os.environ.get("PAGED_REWRITE_FEATURE_FIXTURES", REPO.parent / "shared" / "fixtures" / "qeff-features")
)
REQUIRE_FIXTURES = os.environ.get("PAGED_REWRITE_REQUIRE_FIXTURES") == "1"
CONTIGUOUS_FIXTURES = ["llama_default", "mistral_default", "qwen2_default", "gpt2_default", "gemma2_default"]
VARIANT_FIXTURES = ["llama_blockedkv", "llama_cb", "llama_subfunctions", "gpt_oss_swa_moe"]
ALL_FIXTURES = CONTIGUOUS_FIXTURES + VARIANT_FIXTURES
CTX_LEN = 128
# Exports whose attention over a narrowed table is not bit-identical to the full context: the
# BlockedKV block loop splits whatever context it is given into a fixed number of blocks, so a
# narrower table changes the blocks and the softmax's summation order (≤ 1e-5, same greedy tokens).
NARROWING_INEXACT = {"llama_blockedkv"}
# Dims the rewrite must be told: gpt_oss layer 0 is a ring buffer whose length is the window.
DIMS = {"gpt_oss_swa_moe": {"sliding_window": 32}}


def fixture_model(name: str, corpus: Path = FIXTURES) -> Path:
    """``<corpus>/<name>/model.onnx``; skips (fails under PAGED_REWRITE_REQUIRE_FIXTURES=1) if absent."""
    path = corpus / name / "model.onnx"
    if not path.is_file():
        message = f"QEfficient fixture {path} not found (needs ../shared beside the repo)"
        if REQUIRE_FIXTURES:
            pytest.fail(message)
        pytest.skip(message)
    return path


def feature_fixture_model(name: str) -> Path:
    """A fixture of the feature corpus (``name`` may be ``ort_failing/<name>``)."""
    return fixture_model(name, FEATURE_FIXTURES)


@pytest.fixture(scope="session")
def paged_fixture(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``paged_fixture(name, kv_block_size)`` -> (original path, paged path, report), cached per session."""
    cache: dict[tuple[str, int], tuple[Path, Path, object]] = {}
    folder = tmp_path_factory.mktemp("paged")

    def make(name: str, kv_block_size: int):  # type: ignore[no-untyped-def]
        key = (name, kv_block_size)
        if key not in cache:
            original = fixture_model(name)
            out = folder / f"{name}_bs{kv_block_size}.onnx"
            report = rewrite(original, out, kv_block_size, ctx_len=CTX_LEN, dims=DIMS.get(name))
            cache[key] = (original, out, report)
        return cache[key]

    return make


# The runnable fixtures of the feature corpus (its ort_failing/ exports do not run in onnxruntime).
RUNNABLE_FEATURE_FIXTURES = [
    "llama_ccl",
    "llama_tlm",
    "gpt_oss_prefill_only",
    "gpt_oss_kv_prefix",
    "qwen3_moe_decode_retain_full_kv",
    "gemma2_ctx256",
    "llama4_text",
    "llava_lang_kv_offload",
    "qwen2_cb",
]


def feature_manifest(name: str) -> dict:  # type: ignore[type-arg]
    """``manifest.json`` of a feature fixture (fails or skips like ``feature_fixture_model``)."""
    import json

    return json.loads((feature_fixture_model(name).parent / "manifest.json").read_text())


def feature_dims(manifest: dict) -> dict[str, int]:  # type: ignore[type-arg]
    """Dims the rewrite must be told: a ring's length where the scenario feeds one."""
    window = manifest["scenario"].get("sliding_window_kv_len")
    return {"sliding_window": window} if window else {}


@pytest.fixture(scope="session")
def paged_feature_fixture(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``paged_feature_fixture(name, kv_block_size)`` -> (original path, paged path), rewritten at
    the scenario's ctx_len, cached per session."""
    cache: dict[tuple[str, int], tuple[Path, Path]] = {}
    folder = tmp_path_factory.mktemp("paged_features")

    def make(name: str, kv_block_size: int):  # type: ignore[no-untyped-def]
        key = (name, kv_block_size)
        if key not in cache:
            original = feature_fixture_model(name)
            manifest = feature_manifest(name)
            out = folder / f"{name}_bs{kv_block_size}.onnx"
            rewrite(
                original,
                out,
                kv_block_size,
                ctx_len=manifest["scenario"]["ctx_len"],
                dims=feature_dims(manifest),
            )
            cache[key] = (original, out)
        return cache[key]

    return make


def cache_op_accounting(model_path: Path) -> tuple[Counter[str], dict[str, tuple[int, int]]]:
    """Where a model's nodes are once every local function is inlined (what the QAIC compiler
    lowers), split by the KV-cache ops (``com.qualcomm.cloud`` functions named ``Ctx*`` or
    ``Paged*``): ``(op types of the nodes outside them, {op: (calls, nodes in its body)})``. The
    registered custom ops and the layer functions count as "outside": paging must not grow them."""
    import onnx
    import onnx.inliner

    model = onnx.load(model_path, load_external_data=False)
    cache_ops = {
        (f.domain, f.name): len(f.node)
        for f in model.functions
        if f.domain == "com.qualcomm.cloud" and f.name.startswith(("Ctx", "Paged"))
    }
    inlined = onnx.inliner.inline_selected_functions(model, list(cache_ops), exclude=True)
    calls: dict[str, tuple[int, int]] = {}
    outside: Counter[str] = Counter()
    for node in inlined.graph.node:
        size = cache_ops.get((node.domain, node.op_type))
        if size is None:
            outside[node.op_type] += 1
        else:
            calls[node.op_type] = (calls.get(node.op_type, (0, size))[0] + 1, size)
    return outside, calls


# Inlined nodes, paged over original, at most: the 5% for one address group (one table,
# one kind of positions). The 2-layer gpt_oss exports have two groups, each paying its index ops
# once (BENCHMARKS.md, "Graph size"): their bound is what they cost today, so the ops cannot grow.
NODE_BOUND = {
    "gpt_oss_swa_moe": 1.16,
    "gpt_oss_kv_prefix": 1.16,
    "gpt_oss_prefill_only": 1.10,
    "ort_failing/gpt_oss_decode_retain_full_kv": 1.15,
}
ONE_GROUP_BOUND = 1.05

PAGED_DATA_OPS = {"PagedCtxScatter": "CtxScatter", "PagedCtxGather": "CtxGather"}  # -> the kinds it replaces
PAGED_INDEX_OPS = {
    "PagedWriteIndex",
    "PagedReadIndex",
    "PagedReadIndexCCL",
    "PagedLogicalShape",
    "PagedWindowShape",
}


def assert_paging_grows_only_its_index_ops(
    original_path: Path, paged_path: Path, kv_calls: Mapping[str, int] | None = None
) -> None:
    """The node budget of the rewrite, in the inlined graph. Outside the cache ops the count does
    not grow, and the only nodes of a type the original had fewer of are what a ``Shape`` of a
    cache becomes (an ``Identity``, or a ``Slice`` and its two constants). Each KV cache op
    (``kv_calls``, per kind, from the original; by default every Ctx op) becomes one data op of
    its kind whose body is smaller than the op it replaces, and any other Ctx op stays. The only
    other nodes are the index ops, which the callers bound: so the paged graph outgrows the
    original by the index ops' fixed cost at most."""
    outside_before, before = cache_op_accounting(original_path)
    outside_after, after = cache_op_accounting(paged_path)
    assert outside_after.total() <= outside_before.total(), (outside_before.total(), outside_after.total())
    grown = outside_after - outside_before
    shapes_gone = outside_before["Shape"] - outside_after["Shape"]
    assert set(grown) <= {"Identity", "Slice", "Constant"}, grown
    assert grown["Identity"] + grown["Slice"] <= shapes_gone and grown["Constant"] <= 2 * grown["Slice"], (
        grown
    )
    kv = (
        dict(kv_calls)
        if kv_calls is not None
        else {op: n for op, (n, _) in before.items() if op.startswith("Ctx")}
    )
    for op, (calls, _) in before.items():
        assert after.get(op, (0, 0))[0] == calls - kv.get(op, 0), op  # a non-KV Ctx op stays
    assert set(after) <= set(before) | set(PAGED_DATA_OPS) | PAGED_INDEX_OPS, set(after)
    for data, kind in PAGED_DATA_OPS.items():
        replaced = {op: n for op, n in kv.items() if op.startswith(kind)}
        calls, size = after.get(data, (0, 0))
        assert calls == sum(replaced.values()), (data, calls, replaced)
        assert not calls or size < min(before[op][1] for op in replaced), (data, size)
