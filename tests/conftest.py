"""Shared test fixtures. The QEfficient fixture corpus lives outside the repo, in
``../shared/fixtures/qeff`` (override with PAGED_REWRITE_FIXTURES); tests that need it skip,
saying so, where it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from paged_rewrite import rewrite

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("PAGED_REWRITE_FIXTURES", REPO.parent / "shared" / "fixtures" / "qeff"))
CONTIGUOUS_FIXTURES = ["llama_default", "mistral_default", "qwen2_default", "gpt2_default", "gemma2_default"]
VARIANT_FIXTURES = ["llama_blockedkv", "llama_cb", "llama_subfunctions", "gpt_oss_swa_moe"]
ALL_FIXTURES = CONTIGUOUS_FIXTURES + VARIANT_FIXTURES
CTX_LEN = 128
# Dims the rewrite must be told: gpt_oss layer 0 is a ring buffer whose length is the window.
DIMS = {"gpt_oss_swa_moe": {"sliding_window": 32}}


def fixture_model(name: str) -> Path:
    path = FIXTURES / name / "model.onnx"
    if not path.is_file():
        pytest.skip(f"QEfficient fixture corpus not found at {FIXTURES} (needs ../shared beside the repo)")
    return path


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
