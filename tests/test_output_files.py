"""The files a rewrite writes: the model and its sidecars land together or not at all, a file the
tool did not write is never overwritten, ``-o`` creates its folders; external data is referenced in
its own folder or copied, never linked."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from models import qeff_export

from paged_rewrite import OutputError, UsageError, rewrite
from paged_rewrite.builder import ExportSpec, write_qeff_export
from paged_rewrite.cli import main

SIDECARS = ["paged.onnx", "paged.onnx.json", "paged.specializations.json"]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _fail_when_placing(monkeypatch: pytest.MonkeyPatch, suffix: str, error: type[BaseException]) -> None:
    """Make the first rename that puts a file ending in ``suffix`` into place raise ``error``
    (later ones, such as restoring a previous file, go through)."""
    real_replace = os.replace
    failed: list[str] = []

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(dst).endswith(suffix) and not failed:
            failed.append(str(dst))
            raise error("injected between the model and its sidecars")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize("suffix", [".onnx.json", ".specializations.json", "paged.onnx"])
def test_the_model_and_its_sidecars_land_together_or_not_at_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, error: type[BaseException]
) -> None:
    (tmp_path / "src").mkdir()
    source = qeff_export(tmp_path / "src" / "model.onnx")
    out = tmp_path / "out"
    out.mkdir()
    _fail_when_placing(monkeypatch, suffix, error)
    with pytest.raises((KeyboardInterrupt, OutputError)):
        rewrite(source, out / "paged.onnx", 16, ctx_len=128)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("suffix", [".onnx.json", "paged.onnx"])
def test_a_failed_rerun_leaves_the_previous_files_as_they_were(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128)
    before = _digests(tmp_path)
    _fail_when_placing(monkeypatch, suffix, OSError)
    with pytest.raises(OutputError, match="cannot write"):
        rewrite(source, tmp_path / "paged.onnx", 32, ctx_len=128)  # another block size: other bytes
    assert _digests(tmp_path) == before


def test_a_file_the_tool_did_not_write_is_never_overwritten(tmp_path: Path) -> None:
    """``-o other`` names its manifest ``other.json``: an unrelated ``other.json`` is refused."""
    source = qeff_export(tmp_path / "model.onnx")
    (tmp_path / "other.json").write_text('{"my": "settings"}\n')
    before = _digests(tmp_path)
    result = CliRunner().invoke(main, [str(source), "-o", str(tmp_path / "other"), "--kv-block-size", "16"])
    assert result.exit_code == 6, result.output
    assert result.stderr == (
        f"paged-rewrite: io: {tmp_path / 'other.json'}: exists and was not written by paged-rewrite "
        "(no manifest of ours lists it); move it away or choose another -o\n"
    )
    assert _digests(tmp_path) == before


def test_a_foreign_specializations_file_beside_the_output_is_refused(tmp_path: Path) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    (tmp_path / "paged.specializations.json").write_text("{}\n")
    before = _digests(tmp_path)
    with pytest.raises(OutputError, match=r"paged\.specializations\.json: exists and was not written"):
        rewrite(source, tmp_path / "paged.onnx", 16)
    assert _digests(tmp_path) == before


def test_a_rerun_replaces_its_own_files(tmp_path: Path) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128)
    rewrite(source, tmp_path / "paged.onnx", 32, ctx_len=128)
    assert json.loads((tmp_path / "paged.onnx.json").read_text())["kv_block_size"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", *SIDECARS]


def test_output_folders_are_created(tmp_path: Path) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    result = CliRunner().invoke(
        main, [str(source), "-o", str(tmp_path / "a" / "b" / "paged.onnx"), "--kv-block-size", "16"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == SIDECARS
    onnx.checker.check_model(str(tmp_path / "a" / "b" / "paged.onnx"))


def test_a_failed_rewrite_removes_the_folders_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    _fail_when_placing(monkeypatch, "paged.onnx", OSError)
    with pytest.raises(OutputError):
        rewrite(source, tmp_path / "a" / "b" / "paged.onnx", 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.fixture
def external(tmp_path: Path) -> Path:
    return write_qeff_export(tmp_path / "src" / "model.onnx", ExportSpec(), sparse_weights=True)


def test_external_data_elsewhere_is_refused_without_copy_weights(external: Path, tmp_path: Path) -> None:
    """Not linked: a hard link to the data makes onnx refuse the input itself (next test)."""
    with pytest.raises(UsageError, match="--copy-weights"):
        rewrite(external, tmp_path / "out" / "paged.onnx", 16)
    assert not (tmp_path / "out").exists()
    assert external.with_suffix(".data").stat().st_nlink == 1


def test_onnx_refuses_hard_linked_external_data(external: Path, tmp_path: Path) -> None:
    """Why the issue's hard-link plan was not taken: from onnx 1.21 (its PR #7717, the fix of
    CVE-2026-34446), once a data file has a second link onnx refuses to load or check the model
    that references it, the user's input included. Older onnx (this project allows >= 1.16) still
    loads it; either way the tool does not link (the test above)."""
    os.link(external.with_suffix(".data"), tmp_path / "linked.data")
    version = tuple(int(part) for part in onnx.__version__.split(".")[:2])
    if version >= (1, 21):
        with pytest.raises(onnx.checker.ValidationError, match="multiple hard links"):
            onnx.load(external)
        with pytest.raises(onnx.checker.ValidationError, match="multiple hard links"):
            onnx.checker.check_model(str(external))
    else:
        assert onnx.load(external).graph.initializer


def test_copy_weights_refuses_a_foreign_data_file(external: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "paged.onnx.data").write_bytes(b"someone else's")
    with pytest.raises(OutputError, match=r"paged\.onnx\.data: exists and was not written by paged-rewrite"):
        rewrite(external, tmp_path / "out" / "paged.onnx", 16, copy_weights=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["paged.onnx.data"]
    (tmp_path / "out" / "paged.onnx.data").unlink()
    rewrite(external, tmp_path / "out" / "paged.onnx", 16, copy_weights=True)
    rewrite(external, tmp_path / "out" / "paged.onnx", 32, copy_weights=True)  # its own: replaced
    assert "data" in json.loads((tmp_path / "out" / "paged.onnx.json").read_text())["sidecars"]
