"""Context buckets: from ``--ctx-buckets`` (or the default ladder) to the specializations, the
manifest, the model's metadata and the runtime, which passes per step the narrowest table that
covers the batch — and a runtime whose table does not cover a row is harmless and flagged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from models import qeff_export

from paged_rewrite import UsageError, rewrite
from paged_rewrite.buckets import default_ladder, pick_width, resolve_buckets
from paged_rewrite.cli import main
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import chunk_row
from paged_rewrite.runtime.geometry import PagedGeometry
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner, Row
from paged_rewrite.runtime.verify import verify

CTX = 128


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("buckets")
    original = qeff_export(folder / "model.onnx", num_layers=2)
    rewrite(original, folder / "paged.onnx", 16, ctx_len=CTX)
    return original, folder / "paged.onnx"


def test_the_ladder() -> None:
    assert default_ladder(4096, 128) == (128, 256, 512, 1024, 2048, 4096)
    assert default_ladder(100, 32) == (32, 64, 100)  # ends at the context, whatever it is
    assert default_ladder(16, 16) == (16,)
    assert resolve_buckets(None, None, 16) == ()  # no context known: nothing to ladder
    assert resolve_buckets([1024, 512], 4096, 128) == (512, 1024, 4096)  # the context stays reachable
    assert resolve_buckets([100, 50], None, 16) == (50, 100)
    with pytest.raises(UsageError, match="longer than the context"):
        resolve_buckets([8192], 4096, 128)
    with pytest.raises(UsageError, match="both need 1 blocks"):
        resolve_buckets([100, 120], None, 128)
    with pytest.raises(UsageError, match="positive"):
        resolve_buckets([0, 64], None, 16)
    with pytest.raises(UsageError, match="no bucket given"):  # an empty list from the Python API
        resolve_buckets([], 4096, 128)
    assert [pick_width(n, [1, 2, 4, 8], 16) for n in (1, 16, 17, 33, 128, 500)] == [1, 1, 2, 4, 8, 8]


def test_buckets_flow_into_specializations_manifest_and_metadata(tmp_path: Path) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    out = tmp_path / "paged.onnx"
    result = CliRunner().invoke(
        main,
        [str(source), "-o", str(out), "--kv-block-size", "16", "--ctx-len", "128",
         "--ctx-buckets", "32,64", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ctx_buckets"] == [32, 64, 128]  # --ctx-len is the last bucket
    entries = json.loads((tmp_path / "paged.specializations.json").read_text())["specializations"]
    assert [e["name"] for e in entries] == [
        f"{p}_ctx{b}" for p in ("prefill", "decode") for b in (32, 64, 128)
    ]
    for entry, blocks in zip(entries, (2, 4, 8) * 2, strict=True):
        assert entry["symbols"]["num_kv_blocks"] == str(blocks)
        assert "total_num_kv_blocks" not in entry["symbols"]  # the rows are not known here
        assert entry["symbols"].get("seq_len") == ("1" if entry["name"].startswith("decode") else None)
    manifest = json.loads((tmp_path / "paged.onnx.json").read_text())
    assert manifest["ctx_buckets"] == [{"tokens": t, "num_kv_blocks": t // 16} for t in (32, 64, 128)]
    geometry = PagedGeometry.of(out)
    assert geometry.num_kv_blocks is None and geometry.ctx_buckets == (32, 64, 128)
    assert geometry.full_num_kv_blocks == 8

    bad = CliRunner().invoke(main, [str(source), "-o", str(tmp_path / "x.onnx"), "--kv-block-size", "16",
                                    "--ctx-buckets", "64,abc"])  # fmt: skip
    assert bad.exit_code == 2 and "comma-separated" in bad.output
    too_long = CliRunner().invoke(main, [str(source), "-o", str(tmp_path / "x.onnx"), "--kv-block-size", "16",
                                         "--ctx-len", "128", "--ctx-buckets", "256"])  # fmt: skip
    assert too_long.exit_code == 2 and not (tmp_path / "x.onnx").exists()


def test_a_bucket_that_is_not_a_whole_number_of_blocks_rounds_up(tmp_path: Path) -> None:
    """100 tokens in blocks of 32 need 4 blocks (3 hold only 96): in the specializations, the
    manifest, and as the static width of a one-bucket rewrite."""
    source = qeff_export(tmp_path / "model.onnx")
    for ctx_len, blocks in (("160", {"ctx100": "4", "ctx160": "5"}), ("100", None)):
        out = tmp_path / f"paged{ctx_len}.onnx"
        result = CliRunner().invoke(
            main,
            [str(source), "-o", str(out), "--kv-block-size", "32", "--ctx-len", ctx_len,
             "--ctx-buckets", "100"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        manifest = json.loads((tmp_path / f"paged{ctx_len}.onnx.json").read_text())
        assert manifest["ctx_buckets"][0] == {"tokens": 100, "num_kv_blocks": 4}
        entries = json.loads((tmp_path / f"paged{ctx_len}.specializations.json").read_text())[
            "specializations"
        ]
        if blocks is None:  # one bucket: the width is static, the graph's own
            assert manifest["num_kv_blocks"] == 4 and PagedGeometry.of(out).num_kv_blocks == 4
            assert all("num_kv_blocks" not in e["symbols"] for e in entries)
        else:
            assert {e["name"]: e["symbols"]["num_kv_blocks"] for e in entries} == {
                f"{phase}_{bucket}": width
                for phase in ("prefill", "decode")
                for bucket, width in blocks.items()
            }


def test_one_bucket_keeps_the_table_width_static(tmp_path: Path) -> None:
    report = rewrite(
        qeff_export(tmp_path / "model.onnx"), tmp_path / "p.onnx", 16, ctx_len=CTX, ctx_buckets=[CTX]
    )
    assert report.num_kv_blocks == 8 and report.ctx_buckets == [CTX]
    entries = json.loads((tmp_path / "p.specializations.json").read_text())["specializations"]
    assert [e["name"] for e in entries] == ["prefill_ctx128", "decode_ctx128"]
    assert all("num_kv_blocks" not in e["symbols"] for e in entries)  # not a symbol of the graph


def test_verify_narrows_the_table_per_step_and_stays_bit_exact(models: tuple[Path, Path]) -> None:
    report = verify(*models, seed=1)
    assert report.ok and report.bit_exact, report.summary()
    widths = [s.table_width for s in report.steps]
    assert widths[0] == 2  # the first 32-token chunk: 2 blocks of 16, the 32-token bucket
    assert min(widths) < max(widths) <= 8
    assert "table width per step (narrowed to the context in use, columns): " in report.summary()
    full = verify(*models, seed=1, full_width=True)
    assert {s.table_width for s in full.steps} == {8} and full.bit_exact
    for narrow, wide in zip(report.steps, full.steps, strict=True):
        assert narrow.max_abs_diff == wide.max_abs_diff == 0.0

    result = CliRunner().invoke(main, ["verify", *map(str, models), "--full-width", "--json"])
    assert result.exit_code == 0, result.output
    assert {s["table_width"] for s in json.loads(result.output)["steps"]} == {8}


def test_a_table_narrower_than_a_row_is_harmless_and_flagged(models: tuple[Path, Path]) -> None:
    """A runtime whose buckets stop short of the context (here: one block) passes tables that
    cut rows short. Nothing is out of range, no other block changes, but the logits are wrong
    and ``verify`` says which steps cut which rows."""
    report = verify(*models, seed=1, ctx_buckets=[16])
    assert not report.ok
    cut = [s for s in report.steps if s.rows_cut]
    assert cut and all(s.table_width == 1 for s in report.steps)
    assert all(not s.foreign_blocks_changed for s in report.steps)
    assert "cuts the context of" in report.summary() and "MISMATCH" in report.summary()

    # The same at the model: a row at position 40 with a one-column table reads and writes only
    # what the table lists and the null block; the logits stay finite.
    _, paged = models
    manager = BlockManager(8, 16)
    runner = PagedRunner(paged, manager, 8, ctx_buckets=[16])
    logits = runner.step([Row("A", np.arange(41) % 200, np.arange(41))])
    assert np.isfinite(logits).all()
    assert runner.table_widths[0].rows_cut == ("A",) and runner.table_widths[0].needed_columns == 3
    assert not runner.isolation[0].foreign_blocks_changed
    first = manager.blocks_of("A")[0]
    for pool in runner.pools.values():  # only block 0 and A's first block were written
        touched = {int(b) for b in np.nonzero(np.abs(pool).reshape(len(pool), -1).sum(1))[0]}
        assert touched <= {0, first}


@pytest.mark.parametrize(
    ("columns", "tokens", "cut"), [(1, 16, False), (1, 17, True), (2, 32, False), (2, 33, True)]
)
def test_the_cut_flag_at_the_tables_last_position(
    models: tuple[Path, Path], columns: int, tokens: int, cut: bool
) -> None:
    """A table of ``columns`` blocks of 16 holds ``16 * columns`` positions: a row that fills
    exactly those is not cut (and its logits are the original's); one position more is."""
    original, paged = models
    runner = PagedRunner(paged, BlockManager(10, 16), CTX // 16, ctx_buckets=[16 * columns])
    row = Row("A", np.arange(tokens) % 200, np.arange(tokens))
    logits = runner.step([row], "prefill")
    record = runner.table_widths[0]
    assert record.columns == columns
    assert record.needed_columns == columns + cut
    assert record.rows_cut == (("A",) if cut else ())
    want = ContiguousRunner(original, {"ctx_len": CTX}).step([row], "prefill")
    assert np.array_equal(logits, want) != cut


@pytest.mark.parametrize(("position", "columns"), [(31, 2), (32, 4), (63, 4), (64, 8)])
def test_a_decode_step_gets_the_bucket_holding_its_own_position(
    models: tuple[Path, Path], position: int, columns: int
) -> None:
    """Buckets of 16, 32, 64 and 128 tokens (1, 2, 4, 8 blocks of 16). A decode step at position
    ``p`` writes and attends to ``p`` too, so it needs ``p + 1`` positions: at 32 and 64 the next
    bucket up, one position after a bucket is full. Logits equal the original's bit for bit."""
    original, paged = models
    prompt = np.random.default_rng(position).integers(0, 200, position)
    paged_runner = PagedRunner(paged, BlockManager(10, 16, shuffled_order(10, 4)), CTX // 16)
    contiguous = ContiguousRunner(original, {"ctx_len": CTX})
    for first in range(0, position, 32):
        chunk = chunk_row("A", prompt, first, 32)
        assert np.array_equal(paged_runner.step([chunk], "prefill"), contiguous.step([chunk], "prefill"))
    row = Row("A", np.array([7]), np.array([position]))
    assert np.array_equal(paged_runner.step([row], "decode"), contiguous.step([row], "decode"))
    assert paged_runner.table_widths[-1].columns == columns
    assert not any(record.rows_cut for record in paged_runner.table_widths)


def test_qefficient_flat_specializations_are_read_and_written_flat(tmp_path: Path) -> None:
    """QEfficient's compile writes each entry as its dims, values as strings; so does the paged file."""
    specs = tmp_path / "specializations.json"
    specs.write_text(json.dumps({"specializations": [
        {"batch_size": "1", "seq_len": "32", "ctx_len": "128"},
        {"batch_size": "4", "seq_len": "1", "ctx_len": "128"},
    ]}))  # fmt: skip
    rewrite(qeff_export(tmp_path / "model.onnx"), tmp_path / "paged.onnx", 32, specializations=specs)
    entries = json.loads((tmp_path / "paged.specializations.json").read_text())["specializations"]
    assert entries == [
        {"batch_size": batch, "seq_len": seq, "num_kv_blocks": str(blocks), "total_num_kv_blocks": "17"}
        for batch, seq in (("1", "32"), ("4", "1"))
        for blocks in (1, 2, 4)
    ]
