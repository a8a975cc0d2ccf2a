"""Shared test fixtures. The QEfficient fixture corpora live outside the repo, in
``../shared/fixtures/qeff`` and ``../shared/fixtures/qeff-features`` (override with
PAGED_REWRITE_FIXTURES / PAGED_REWRITE_FEATURE_FIXTURES). Where they are absent the tests that
need them skip, saying so — unless PAGED_REWRITE_REQUIRE_FIXTURES=1 (CI sets it), where a
missing corpus fails them: CI must never pass without the real exports."""

from __future__ import annotations

import os
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


def cache_op_accounting(model_path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where a model's nodes are once every local function is inlined (what the QAIC compiler
    lowers), split by the KV-cache ops (``com.qualcomm.cloud`` functions named ``Ctx*`` or
    ``Paged*``): ``(nodes outside them, {op: (calls, nodes in its body)})``. The registered
    custom ops and the layer functions count as "outside": paging must not grow them."""
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
    outside = 0
    for node in inlined.graph.node:
        size = cache_ops.get((node.domain, node.op_type))
        if size is None:
            outside += 1
        else:
            calls[node.op_type] = (calls.get(node.op_type, (0, size))[0] + 1, size)
    return outside, calls


PAGED_DATA_OPS = {"PagedCtxScatter", "PagedCtxGather"}
PAGED_INDEX_OPS = {
    "PagedWriteIndex",
    "PagedReadIndex",
    "PagedReadIndexCCL",
    "PagedLogicalShape",
    "PagedWindowShape",
}


def assert_paging_grows_only_its_index_ops(original_path: Path, paged_path: Path) -> None:
    """The node budget of the rewrite, in the inlined graph: no node outside the cache ops is
    added; each cache op becomes one data op whose body is smaller than any op it replaces; the
    only other nodes are the index ops (once per call and address group, counted by the callers).
    So the paged graph outgrows the original by at most the index ops' fixed cost."""
    outside_before, before = cache_op_accounting(original_path)
    outside_after, after = cache_op_accounting(paged_path)
    assert outside_after <= outside_before, (outside_before, outside_after)
    kept = {op for op in after if op.startswith("Ctx")}  # non-KV uses (LoRA adapters, sampler buffers)
    assert {op: after[op] for op in kept} == {op: before[op] for op in kept}
    assert set(after) <= kept | PAGED_DATA_OPS | PAGED_INDEX_OPS, set(after)
    replaced = {op: calls_and_size for op, calls_and_size in before.items() if op not in kept}
    data = {op: calls_and_size for op, calls_and_size in after.items() if op in PAGED_DATA_OPS}
    assert sum(calls for calls, _ in data.values()) == sum(calls for calls, _ in replaced.values())
    assert max(size for _, size in data.values()) < min(size for _, size in replaced.values())
