"""Our own QEfficient-style exports: the builder's conventions, and rewrite + verify across
head counts, GQA ratios, head dims and depths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import qeff_export

from paged_rewrite import rewrite
from paged_rewrite.builder import ExportSpec
from paged_rewrite.runtime.sessions import sentinel_overrides
from paged_rewrite.runtime.verify import verify


def test_export_follows_qeff_conventions(tmp_path: Path) -> None:
    path = qeff_export(tmp_path / "m.onnx", num_layers=3)
    model = onnx.load(path)
    onnx.checker.check_model(str(path), full_check=True)
    functions = {(f.domain, f.name) for f in model.functions}
    assert {("com.qualcomm.cloud", "CtxScatter"), ("com.qualcomm.cloud", "CtxGather")} <= functions
    assert [i.name for i in model.graph.input] == ["input_ids", "position_ids"] + [
        f"past_{kind}.{layer}" for layer in range(3) for kind in ("key", "value")
    ]
    assert len(sentinel_overrides(path)) == 3  # one INT32_MAX read-side sentinel per layer
    with pytest.raises(Exception, match="2147483647"):  # stock onnxruntime rejects the sentinel, as with QEff
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {"input_ids": np.zeros((1, 1), np.int64), "position_ids": np.zeros((1, 1), np.int64)}
        feeds |= {i.name: np.zeros((1, 2, 8, 16), np.float32) for i in session.get_inputs()[2:]}
        session.run(None, feeds)


@pytest.mark.parametrize(
    ("spec", "kv_block_size"),
    [
        ({"num_heads": 4, "num_kv_heads": 1, "head_dim": 8, "num_layers": 1}, 16),  # MQA
        ({"num_heads": 4, "num_kv_heads": 4, "head_dim": 32, "num_layers": 3}, 32),  # MHA
        ({"num_heads": 8, "num_kv_heads": 2, "head_dim": 16, "num_layers": 2, "hidden_size": 128}, 8),
    ],
)
def test_rewrite_is_bit_exact_across_shapes(tmp_path: Path, spec: dict[str, int], kv_block_size: int) -> None:
    original = qeff_export(tmp_path / "m.onnx", **spec)
    report = rewrite(original, tmp_path / "p.onnx", kv_block_size, ctx_len=128)
    assert len(report.caches) == 2 * spec["num_layers"]
    assert {c.kv_heads for c in report.caches} == {spec["num_kv_heads"]}
    result = verify(original, tmp_path / "p.onnx", seed=kv_block_size)
    assert result.ok and result.max_abs_diff == 0.0, result.summary()


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="num_kv_heads"):
        ExportSpec(num_heads=4, num_kv_heads=3)
