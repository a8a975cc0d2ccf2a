"""``--prefill-lengths``: the prefill ``seq_len`` values a device is compiled for flow from the flag
to the specializations (one prefill entry per length and context bucket), the manifest, the model's
metadata and the runtime's ``Server``, which pads each prefill call to the shortest that holds it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import CTX_LEN, feature_dims, feature_fixture_model, feature_manifest, fixture_model
from derived_models import renamed_dim
from test_cli_errors import one_line, run
from test_serving import prefill_call_lengths

from paged_rewrite import rewrite
from paged_rewrite.errors import UsageError
from paged_rewrite.runtime.block_manager import BlockManager
from paged_rewrite.runtime.extra_inputs import CompCtxSchedule, ExtraInputs
from paged_rewrite.runtime.geometry import PagedGeometry
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner
from paged_rewrite.runtime.serving import Request, Server

BLOCK = 16


def test_the_lengths_flow_to_specializations_manifest_and_metadata(tmp_path: Path) -> None:
    out = tmp_path / "paged.onnx"
    report = rewrite(fixture_model("llama_default"), out, BLOCK, ctx_len=CTX_LEN, prefill_lengths=[32, 8])
    assert report.prefill_lengths == [8, 32] and "prefill lengths, tokens: 8, 32" in report.summary()
    entries = json.loads((tmp_path / "paged.specializations.json").read_text())["specializations"]
    buckets = [16, 32, 64, 128]  # the default ladder at block 16, context 128
    expected = [
        (f"{phase}_ctx{b}", seq)
        for phase, seq in (("prefill8", "8"), ("prefill32", "32"), ("decode", "1"))
        for b in buckets
        if b >= int(seq)
    ]  # fmt: skip  (no 32-token chunk attends over 16)
    assert [(e["name"], e["symbols"]["seq_len"]) for e in entries] == expected
    assert ("prefill32_ctx16", "32") not in expected and len(expected) == 11
    assert {e["symbols"]["num_kv_blocks"] for e in entries} == {"1", "2", "4", "8"}
    manifest = json.loads((tmp_path / "paged.onnx.json").read_text())
    assert manifest["flags"]["prefill_lengths"] == [32, 8]  # as given
    assert manifest["prefill_lengths"] == [8, 32]  # as resolved
    metadata = {p.key: p.value for p in onnx.load(out, load_external_data=False).metadata_props}
    assert json.loads(metadata["paged_rewrite.prefill_lengths"]) == [8, 32]


def test_without_the_flag_prefill_keeps_seq_len_open(tmp_path: Path) -> None:
    report = rewrite(fixture_model("llama_default"), tmp_path / "paged.onnx", BLOCK, ctx_len=CTX_LEN)
    entries = json.loads((tmp_path / "paged.specializations.json").read_text())["specializations"]
    assert report.prefill_lengths == []
    assert {e["name"].split("_")[0] for e in entries} == {"prefill", "decode"}
    assert all("seq_len" not in e["symbols"] for e in entries if e["name"].startswith("prefill"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prefill_lengths": [256]}, "--prefill-lengths 256 is longer than the context (128 tokens)"),
        ({"prefill_lengths": [0, 8]}, "a length must be a positive token count, got 0"),
        ({"prefill_lengths": [8], "dims": {"seq_len": 32}}, "seq_len is bound to 32"),
    ],
)
def test_lengths_the_model_cannot_take_are_usage_errors(tmp_path: Path, options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        rewrite(fixture_model("llama_default"), tmp_path / "paged.onnx", BLOCK, ctx_len=CTX_LEN, **options)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("lengths", [[16, 32, 64], [32]])
def test_a_graph_that_never_reads_its_cache_has_one_prefill_length(
    tmp_path: Path, lengths: list[int]
) -> None:
    """Disaggregated prefill attends within its chunk, tied to the cache length (64 here): a
    shorter prefill length would not even run the original. The context itself is accepted."""
    source = feature_fixture_model("gpt_oss_prefill_only")
    dims = {"sliding_window": 32}
    with pytest.raises(
        UsageError, match=r"never reads its cache .* its one prefill length is the context \(64\)"
    ):
        rewrite(source, tmp_path / "p.onnx", BLOCK, ctx_len=64, dims=dims, prefill_lengths=lengths)
    assert list(tmp_path.iterdir()) == []
    report = rewrite(source, tmp_path / "p.onnx", BLOCK, ctx_len=64, dims=dims, prefill_lengths=[64])
    assert report.prefill_lengths == [64]


def test_a_model_without_a_symbolic_seq_len_is_refused(tmp_path: Path) -> None:
    source = renamed_dim(fixture_model("llama_default"), tmp_path / "renamed.onnx", "seq_len", "q_len")
    with pytest.raises(UsageError, match="the model has no symbolic seq_len to specialize"):
        rewrite(source, tmp_path / "p.onnx", BLOCK, ctx_len=CTX_LEN, prefill_lengths=[8])
    assert not (tmp_path / "p.onnx").exists()


def test_with_a_specializations_file_the_file_says_the_lengths(tmp_path: Path) -> None:
    specs = tmp_path / "specializations.json"
    specs.write_text(
        json.dumps({"specializations": [{"batch_size": "1", "seq_len": "32", "ctx_len": "128"}]})
    )
    with pytest.raises(UsageError, match="give one prefill entry per seq_len in the file instead"):
        rewrite(
            fixture_model("llama_default"),
            tmp_path / "p.onnx",
            BLOCK,
            specializations=specs,
            prefill_lengths=[8],
        )
    assert not (tmp_path / "p.onnx").exists()


def test_the_command_line_takes_the_flag_and_refuses_a_bad_list(tmp_path: Path) -> None:
    model = fixture_model("llama_default")
    done = run(model, "-o", tmp_path / "p.onnx", "--kv-block-size", BLOCK, "--ctx-len", CTX_LEN,
               "--prefill-lengths", "16,64", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["prefill_lengths"] == [16, 64]
    line = one_line(
        run(model, "-o", tmp_path / "q.onnx", "--kv-block-size", BLOCK, "--prefill-lengths", "16,x"),
        2,
        "usage",
    )
    assert "--prefill-lengths '16,x': expected comma-separated token counts" in line
    assert not (tmp_path / "q.onnx").exists()


def test_a_server_pads_to_the_models_own_prefill_lengths(tmp_path: Path) -> None:
    """Without ``prefill_lengths``, the server takes the paged model's own (its metadata): a
    9-token prompt runs one 16-token call, and its tokens are those of full-chunk padding."""
    paged = tmp_path / "paged.onnx"
    rewrite(fixture_model("llama_default"), paged, BLOCK, ctx_len=CTX_LEN, prefill_lengths=[8, 16, 32])
    prompt = np.random.default_rng(3).integers(0, 200, 9)
    tokens = {}
    for lengths in (None, ()):
        runner = PagedRunner(paged, BlockManager(20, BLOCK), CTX_LEN // BLOCK)
        calls = prefill_call_lengths(runner)
        (served,) = Server(runner, 32, 4, prefill_lengths=lengths).run([Request("A", prompt, 3)])
        tokens[lengths] = (served.tokens, calls)
    assert tokens[None][1] == [16] and tokens[()][1] == [32]
    assert tokens[None][0] == tokens[()][0]
    with pytest.raises(
        ValueError, match=r"chunk_len 48 is not one of the model's prefill lengths \[8, 16, 32\]"
    ):
        Server(PagedRunner(paged, BlockManager(20, BLOCK), CTX_LEN // BLOCK), 48, 4)


def test_inspect_plans_with_the_flag_and_exits_as_the_rewrite_would(tmp_path: Path) -> None:
    model = fixture_model("llama_default")
    planned = run(
        "inspect", model, "--kv-block-size", BLOCK, "--ctx-len", CTX_LEN, "--prefill-lengths", "256"
    )
    assert planned.returncode == 2
    assert "--prefill-lengths 256 is longer than the context (128 tokens)" in planned.stderr
    fine = run(
        "inspect", model, "--kv-block-size", BLOCK, "--ctx-len", CTX_LEN, "--prefill-lengths", "8", "--json"
    )
    assert fine.returncode == 0 and json.loads(fine.stdout)["plan"]["prefill_lengths"] == [8]


def test_every_prefill_entry_is_static_under_the_full_check(tmp_path: Path) -> None:
    report = rewrite(
        fixture_model("llama_default"), tmp_path / "p.onnx", BLOCK, ctx_len=CTX_LEN, prefill_lengths=[8, 32],
        full_check=True,
    )  # fmt: skip
    checked = {result.specialization for result in report.static_shapes if result.ok}
    assert {f"prefill{n}_ctx{b}" for n in (8, 32) for b in (16, 32, 64, 128) if b >= n} <= checked
    assert all(result.ok for result in report.static_shapes)


@pytest.mark.parametrize("name", ["llama_ccl", "llama_tlm", "qwen2_cb", "llava_lang_kv_offload"])
def test_feature_exports_serve_the_same_tokens_at_fitted_prefill_lengths(tmp_path: Path, name: str) -> None:
    """CCL, TLM, CB and a VLM's language model, rewritten with prefill lengths 8, 16, 32: served with
    calls fitted to those lengths, every request gets the tokens it gets with full-chunk padding, and
    those the original export gives at the same fitted lengths."""
    manifest = feature_manifest(name)
    ctx, dims = manifest["scenario"]["ctx_len"], feature_dims(manifest)
    paged = tmp_path / "paged.onnx"
    rewrite(feature_fixture_model(name), paged, BLOCK, ctx_len=ctx, dims=dims, prefill_lengths=[8, 16, 32])
    geometry = PagedGeometry.of(paged)
    all_dims = {**geometry.dims, "ctx_len": ctx, **dims}
    extra = ExtraInputs(comp_ctx_lengths=CompCtxSchedule.spread(ctx))
    rng = np.random.default_rng(0)
    requests = [Request(f"r{i}", rng.integers(0, 200, n), 3) for i, n in enumerate((9, 40, 21))]
    served = {}
    for lengths in (None, ()):  # the model's own (8, 16, 32), and full 32-token calls
        runner = PagedRunner(
            paged, BlockManager(1 + 3 * (ctx // BLOCK), BLOCK), ctx // BLOCK, all_dims, extra
        )
        served[lengths] = {
            s.request.name: s.tokens for s in Server(runner, 32, 4, prefill_lengths=lengths).run(requests)
        }
    original = ContiguousRunner(feature_fixture_model(name), all_dims, extra_inputs=extra)
    fitted_original = {
        s.request.name: s.tokens for s in Server(original, 32, 4, prefill_lengths=(8, 16)).run(requests)
    }
    assert served[None] == served[()] == fitted_original
