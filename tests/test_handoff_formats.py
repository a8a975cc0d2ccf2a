"""The hand-off files in the formats QEfficient writes: ``custom_io.yaml`` in each layout (read with
a YAML parser, written back in the layout it came in), and the manifest's record of the flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import fixture_model
from models import qeff_export

from paged_rewrite import UsageError, rewrite
from paged_rewrite.cli import main

# What QEfficient's compile writes for a 2-layer model with an fp16 cache (its exact bytes).
QEFF_CUSTOM_IO = "".join(
    f" - IOName: past_{kind}.{layer}{suffix}\n   Precision: float16\n\n"
    for suffix in ("", "_RetainedState")
    for layer in range(2)
    for kind in ("key", "value")
)


def test_qefficient_custom_io_list_round_trips(tmp_path: Path) -> None:
    custom = tmp_path / "custom_io.yaml"
    custom.write_text("# written by QEfficient\n" + QEFF_CUSTOM_IO)
    rewrite(qeff_export(tmp_path / "model.onnx"), tmp_path / "paged.onnx", 16, custom_io=custom)
    written = (tmp_path / "paged.custom_io.yaml").read_text()
    assert yaml.safe_load(written) == yaml.safe_load(QEFF_CUSTOM_IO)
    assert written.startswith("- IOName: past_key.0\n  Precision: float16\n")


def test_custom_io_as_a_list_of_pairs_is_read(tmp_path: Path) -> None:
    custom = tmp_path / "custom_io.yaml"
    custom.write_text("- past_key.0: float16  # the cache in fp16\n- past_value.0: float16\n")
    rewrite(qeff_export(tmp_path / "model.onnx"), tmp_path / "paged.onnx", 16, custom_io=custom)
    written = yaml.safe_load((tmp_path / "paged.custom_io.yaml").read_text())
    assert written == [{"past_key.0": "float16"}, {"past_value.0": "float16"}]


def test_custom_io_entries_of_removed_inputs_are_dropped_and_reported(tmp_path: Path) -> None:
    """llama_cb's batch_index no longer exists in the paged model: its line is dropped, not refused."""
    custom = tmp_path / "custom_io.yaml"
    custom.write_text(QEFF_CUSTOM_IO + " - IOName: batch_index\n   Precision: int64\n\n")
    runner = CliRunner()
    result = runner.invoke(main, [str(fixture_model("llama_cb")), "-o", str(tmp_path / "paged.onnx"),
                                  "--kv-block-size", "16", "--ctx-len", "128", "--custom-io", str(custom),
                                  "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["removed_inputs"] == ["batch_index"] and report["custom_io_dropped"] == ["batch_index"]
    written = yaml.safe_load((tmp_path / "paged.custom_io.yaml").read_text())
    assert [entry["IOName"] for entry in written] == [
        entry["IOName"] for entry in yaml.safe_load(QEFF_CUSTOM_IO)
    ]


def test_custom_io_naming_an_unknown_tensor_is_refused(tmp_path: Path) -> None:
    custom = tmp_path / "custom_io.yaml"
    custom.write_text(" - IOName: past_key.9\n   Precision: float16\n")
    with pytest.raises(
        UsageError, match=r"custom_io.yaml: names tensors the paged model does not have: past_key\.9"
    ):
        rewrite(qeff_export(tmp_path / "model.onnx"), tmp_path / "paged.onnx", 16, custom_io=custom)
    assert not (tmp_path / "paged.onnx").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("past_key.0: [float16\n", "custom_io.yaml:2: not valid YAML"),
        ("- just a string\n", "expected QEfficient's custom IO list"),
        ("past_key.0:\n  nested: float16\n", "entry 'past_key.0'"),
        ("- past_key.0: float16\n- past_key.0: float32\n", "'past_key.0' is listed twice"),
    ],
)
def test_malformed_custom_io_is_a_usage_error(tmp_path: Path, text: str, message: str) -> None:
    custom = tmp_path / "custom_io.yaml"
    custom.write_text(text)
    result = CliRunner().invoke(main, [str(qeff_export(tmp_path / "model.onnx")), "-o",
                                       str(tmp_path / "paged.onnx"), "--kv-block-size", "16",
                                       "--custom-io", str(custom)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("paged-rewrite: usage: ")
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom_io.yaml", "model.onnx"]


def test_manifest_records_the_flags_and_one_type_per_field(tmp_path: Path) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    rewrite(source, tmp_path / "ladder.onnx", 16, ctx_len=128, ctx_buckets=[32, 128], num_blocks=33,
            dims={"batch_size": 2}, prefill_lengths=[32, 16])  # fmt: skip
    rewrite(source, tmp_path / "one.onnx", 16, ctx_len=128, ctx_buckets=[128])
    ladder = json.loads((tmp_path / "ladder.onnx.json").read_text())
    one = json.loads((tmp_path / "one.onnx.json").read_text())
    assert ladder["flags"] == {
        "kv_block_size": 16,
        "ctx_len": 128,
        "ctx_buckets": [32, 128],
        "prefill_lengths": [32, 16],
        "num_blocks": 33,
        "dims": {"batch_size": 2},
        "specializations": None,
        "custom_io": None,
        "copy_weights": False,
        "shared_window_table": False,
    }
    assert one["flags"]["ctx_buckets"] == [128] and one["flags"]["num_blocks"] is None
    assert one["flags"]["prefill_lengths"] is None
    assert ladder["bound_dims"] == {"batch_size": 2, "ctx_len": 128}
    # the table width: symbolic with two buckets (null), static with one (an int), never a string
    assert ladder["num_kv_blocks"] is None and one["num_kv_blocks"] == 8
    assert ladder["total_num_kv_blocks"] == 33 and one["total_num_kv_blocks"] is None
    assert ladder["format"] == one["format"] == 5  # 5: wrapping_caches
    # every group field keeps one type: a pool dim is a name or null, its size an int or null
    for document in (ladder, one):
        for group in document["groups"]:
            assert group["pool_dim"] is None or isinstance(group["pool_dim"], str)
            assert group["total_num_kv_blocks"] is None or isinstance(group["total_num_kv_blocks"], int)
            assert group["num_kv_blocks"] is None or isinstance(group["num_kv_blocks"], int)
    assert ladder["groups"][0]["total_num_kv_blocks"] == 33 and ladder["groups"][0]["pool_dim"] is None
    assert (
        one["groups"][0]["pool_dim"] == "total_num_kv_blocks"
        and one["groups"][0]["total_num_kv_blocks"] is None
    )
