"""The command line: the main job, JSON reports, verify's verdict, and refusals (one line, the
documented exit code, no output file, the input untouched)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fixture_model
from models import no_cache_model, qeff_export, with_renamed_op

CLI = [sys.executable, "-m", "paged_rewrite.cli"]


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_rewrite_then_verify(tmp_path: Path) -> None:
    original = qeff_export(tmp_path / "model.onnx", num_layers=2)
    done = run(original, "-o", tmp_path / "paged.onnx", "--kv-block-size", 16, "--ctx-len", 128, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["added_inputs"] == ["block_table", "slot_id"]
    assert report["rewritten"]["CtxScatter -> PagedCtxScatter"] == 4
    checked = run("verify", original, tmp_path / "paged.onnx", "--json")
    assert checked.returncode == 0, checked.stderr
    verdict = json.loads(checked.stdout)
    assert verdict["ok"] and verdict["max_abs_diff"] == 0.0
    assert len([s for s in verdict["steps"] if s["kind"] == "decode" and len(s["sequences"]) == 2]) >= 16


def test_verify_fails_on_a_different_model(tmp_path: Path) -> None:
    original = qeff_export(tmp_path / "a.onnx", seed=0)
    other = qeff_export(tmp_path / "b.onnx", seed=1)
    assert (
        run(other, "-o", tmp_path / "paged_b.onnx", "--kv-block-size", 32, "--ctx-len", 128).returncode == 0
    )
    checked = run("verify", original, tmp_path / "paged_b.onnx")
    assert checked.returncode == 7
    assert "MISMATCH" in checked.stdout
    assert checked.stderr.strip().startswith("paged-rewrite: verification_failed:")


def test_demo_runs_the_main_job() -> None:
    done = run("demo", "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["verify"]["ok"] and payload["rewrite"]["kv_block_size"] == 16


def _refuse(tmp_path: Path, model: Path, code: int, *words: str, extra: tuple[object, ...] = ()) -> str:
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    out = tmp_path / "out.onnx"
    done = run(model, "-o", out, "--kv-block-size", 16, *extra)
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.onnx")] == []
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest
    return lines[0]


def test_refuses_a_model_without_cache(tmp_path: Path) -> None:
    _refuse(tmp_path, no_cache_model(tmp_path / "relu.onnx"), 4, "no KV cache")


def test_refuses_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    _refuse(tmp_path, junk, 3, str(junk), "not an ONNX model")


def test_refuses_a_missing_file(tmp_path: Path) -> None:
    done = run(tmp_path / "nope.onnx", "-o", tmp_path / "out.onnx", "--kv-block-size", 16)
    assert done.returncode == 3 and "no such file" in done.stderr


def test_refuses_an_already_paged_model(tmp_path: Path) -> None:
    original = qeff_export(tmp_path / "model.onnx")
    assert run(original, "-o", tmp_path / "paged.onnx", "--kv-block-size", 16).returncode == 0
    _refuse(tmp_path, tmp_path / "paged.onnx", 5, "already paged", "com.qualcomm.cloud::Paged")


def test_refuses_an_unknown_cache_op_naming_the_node(tmp_path: Path) -> None:
    model = with_renamed_op(fixture_model("llama_default"), tmp_path / "odd.onnx", "CtxGather", "CtxGatherV9")
    _refuse(tmp_path, model, 5, "/model/layers.0/self_attn/CtxGather", "CtxGatherV9", "unknown cache op")


@pytest.mark.parametrize("flags", [("--kv-block-size", "0"), ("--kv-block-size", "x"), ("--ctx-len", "-3")])
def test_rejects_bad_flags(tmp_path: Path, flags: tuple[str, str]) -> None:
    original = qeff_export(tmp_path / "model.onnx")
    args = [original, "-o", tmp_path / "out.onnx", "--kv-block-size", "16", *flags]
    done = run(*args)
    assert done.returncode == 2
    assert not (tmp_path / "out.onnx").exists()


def test_refuses_to_overwrite_the_input(tmp_path: Path) -> None:
    original = qeff_export(tmp_path / "model.onnx")
    digest = hashlib.sha256(original.read_bytes()).hexdigest()
    done = run(original, "-o", original, "--kv-block-size", 16)
    assert done.returncode == 2 and "overwrite the input" in done.stderr
    assert hashlib.sha256(original.read_bytes()).hexdigest() == digest


def test_refuses_a_dynamic_concat_cache(tmp_path: Path) -> None:
    from models import concat_cache_model

    _refuse(tmp_path, concat_cache_model(tmp_path / "concat.onnx"), 5, "/layers.0/Concat", "dynamic KV cache")


def test_ring_buffer_needs_its_dim_and_takes_it_from_the_flag(tmp_path: Path) -> None:
    source = fixture_model("gpt_oss_swa_moe")
    line = _refuse(tmp_path, source, 2, "--dim sliding_window=N", extra=("--ctx-len", 128))
    assert "CtxScatter" in line
    done = run(
        source,
        "-o",
        tmp_path / "p.onnx",
        "--kv-block-size",
        32,
        "--ctx-len",
        128,
        "--dim",
        "sliding_window=32",
    )
    assert done.returncode == 0, done.stderr
    assert run("verify", source, tmp_path / "p.onnx").returncode == 0


@pytest.mark.parametrize(
    ("flags", "tables"),
    [
        ((), ["block_table", "block_table_w32", "slot_id"]),
        (("--shared-window-table",), ["block_table", "slot_id"]),
    ],
)
def test_window_tables_by_default_and_one_table_with_the_flag(
    tmp_path: Path, flags: tuple[str, ...], tables: list[str]
) -> None:
    source = fixture_model("gpt_oss_swa_moe")
    out = tmp_path / "p.onnx"
    done = run(
        source,
        "-o",
        out,
        "--kv-block-size",
        16,
        "--ctx-len",
        128,
        "--dim",
        "sliding_window=32",
        *flags,
        "--json",
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["added_inputs"] == tables
    checked = run("verify", source, out, "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["max_abs_diff"] == 0.0
