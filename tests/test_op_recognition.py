"""Ops are recognised by what they do; ``--ctx-len`` binds the real length axis; ``batch_index``
stays while something else still reads it. Each case is a real export edited the documented way
(derived_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import fixture_model
from derived_models import (
    cb_with_adapter_gather,
    cb_with_penalty_buffer,
    pre_ccl_gather,
    read_before_write,
    renamed_dim,
    scatter_on_heads,
    without_function,
)

from paged_rewrite import rewrite
from paged_rewrite.errors import NotAModelError, UnsupportedPatternError, UsageError
from paged_rewrite.runtime.sessions import open_session
from paged_rewrite.runtime.verify import verify


@pytest.mark.parametrize("kv_block_size", [16, 32])
def test_the_two_operand_gather_of_older_releases_is_paged_bit_exact(
    tmp_path: Path, kv_block_size: int
) -> None:
    original = pre_ccl_gather(fixture_model("llama_default"), tmp_path / "old.onnx")
    assert all(len(n.input) == 2 for n in onnx.load(original).graph.node if n.op_type == "CtxGather")
    report = rewrite(original, tmp_path / "paged.onnx", kv_block_size, ctx_len=128)
    assert report.rewritten["CtxGather -> PagedCtxGather"] == 4
    paged = onnx.load(tmp_path / "paged.onnx")
    assert [n.op_type for n in paged.graph.node if n.op_type.startswith("PagedReadIndex")] == [
        "PagedReadIndex"
    ]
    result = verify(original, tmp_path / "paged.onnx", seed=kv_block_size)
    assert result.ok and result.max_abs_diff == 0.0, result.summary()


def test_an_op_whose_body_does_something_else_is_refused(tmp_path: Path) -> None:
    source = scatter_on_heads(fixture_model("llama_default"), tmp_path / "odd.onnx")
    with pytest.raises(UnsupportedPatternError) as error:
        rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128)
    message = str(error.value)
    assert "/model/layers.0/self_attn/CtxScatter" in message
    assert "indexes axis 1 with the positions; the rule expects axis 2" in message
    assert not (tmp_path / "paged.onnx").exists()


def test_a_read_of_the_cache_input_itself_is_refused(tmp_path: Path) -> None:
    """Paged reads return zeros for invalid positions because they read the zero row the write
    before them has just cleared; a read of the cache as given has no such write, so the
    rewrite refuses it, naming the node and the cache, and writes nothing."""
    source = read_before_write(fixture_model("llama_default"), tmp_path / "stale.onnx", "past_value.0")
    with pytest.raises(UnsupportedPatternError) as error:
        rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128)
    message = str(error.value)
    assert "'/model/layers.0/self_attn/CtxGather_1'" in message and "'past_value.0'" in message
    assert not (tmp_path / "paged.onnx").exists()


def test_ctx_len_binds_the_length_axis_whatever_its_name(tmp_path: Path) -> None:
    source = renamed_dim(fixture_model("llama_default"), tmp_path / "renamed.onnx", "ctx_len", "max_context")
    report = rewrite(source, tmp_path / "paged.onnx", 32, ctx_len=128)
    assert report.num_kv_blocks == "num_kv_blocks" and report.ctx_buckets == [32, 64, 128]
    assert report.context_dim == "max_context" and report.bound_dims["max_context"] == 128
    report = rewrite(source, tmp_path / "paged.onnx", 32, ctx_len=128, ctx_buckets=[128])
    assert report.num_kv_blocks == 4  # one bucket: a static width
    table = next(v for v in onnx.load(tmp_path / "paged.onnx").graph.input if v.name == "block_table")
    assert [d.dim_value for d in table.type.tensor_type.shape.dim][1] == 4


def test_ctx_len_that_could_mean_two_dims_is_a_usage_error(tmp_path: Path) -> None:
    source = renamed_dim(
        fixture_model("gpt_oss_swa_moe"), tmp_path / "renamed.onnx", "ctx_len", "max_context"
    )
    with pytest.raises(UsageError, match="--ctx-len is ambiguous"):
        rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128)
    # Binding the window names the other one as the context.
    report = rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128, dims={"sliding_window": 32})
    assert report.context_dim == "max_context" and report.windows == {"sliding_window": 32}


def test_ctx_len_contradicting_a_dim_flag_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="contradicts --dim ctx_len=256"):
        rewrite(fixture_model("llama_default"), None, 16, ctx_len=128, dims={"ctx_len": 256})


def test_batch_index_stays_while_another_state_reads_it(tmp_path: Path) -> None:
    source = cb_with_penalty_buffer(fixture_model("llama_cb"), tmp_path / "cb.onnx")
    report = rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128)
    assert report.removed_inputs == []
    assert report.kept_inputs == {"batch_index": "CtxScatterCB3D"}
    assert [op.op for op in report.left_alone] == ["CtxScatterCB3D"]
    manifest = json.loads((tmp_path / "paged.onnx.json").read_text())
    assert manifest["kept_inputs"] == {"batch_index": "CtxScatterCB3D"}
    # The buffer still works as the original's: rows are addressed by batch_index.
    session = open_session(tmp_path / "paged.onnx")
    feeds = _paged_feeds(session, batch_index=[[2]], input_ids=[[5, 7]])
    seen = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    buffer = seen["past_seen_tokens_RetainedState"]
    assert buffer[2, 5] == 1.0 and buffer[2, 7] == 1.0 and buffer.sum() == 2.0


def _paged_feeds(
    session: object, batch_index: list[list[int]], input_ids: list[list[int]]
) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for value in session.get_inputs():  # type: ignore[attr-defined]
        shape = [d if isinstance(d, int) else 1 for d in value.shape]
        if value.name.startswith("past_key") or value.name.startswith("past_value"):
            shape[0] = 9
        if value.name == "past_seen_tokens":
            shape[0] = 4
        dtype = np.float32 if "float" in value.type else np.int64
        feeds[value.name] = np.zeros(shape, dtype)
    feeds["input_ids"] = np.array(input_ids, np.int64)
    feeds["position_ids"] = np.arange(len(input_ids[0]), dtype=np.int64)[None]
    feeds["batch_index"] = np.array(batch_index, np.int64)
    feeds["block_table"] = np.array([[1] + [-1] * (feeds["block_table"].shape[1] - 1)], np.int64)
    feeds["slot_id"] = np.zeros(1, np.int64)
    return feeds


def test_batch_index_goes_when_only_a_kept_definition_names_a_parameter_so(tmp_path: Path) -> None:
    """CB with a LoRA-style adapter gather: CtxGatherCB's definition stays for the adapter, and
    its parameter called batch_index must not keep the graph's dead batch_index alive."""
    source = cb_with_adapter_gather(fixture_model("llama_cb"), tmp_path / "cb_lora.onnx")
    report = rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128)
    assert report.removed_inputs == ["batch_index"] and report.kept_inputs == {}
    assert [(op.op, op.data) for op in report.left_alone] == [("CtxGatherCB", "adapter_weights")]
    model = onnx.load(tmp_path / "paged.onnx")
    assert "CtxGatherCB" in {f.name for f in model.functions}
    assert "batch_index" not in {v.name for v in model.graph.input}


def test_an_input_calling_an_undefined_cache_op_is_not_a_model(tmp_path: Path) -> None:
    source = without_function(fixture_model("llama_default"), tmp_path / "broken.onnx", "CtxGather")
    with pytest.raises(
        NotAModelError, match=r"calls com\.qualcomm\.cloud::CtxGather, which no model-local function defines"
    ):
        rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128)
    assert not (tmp_path / "paged.onnx").exists()
