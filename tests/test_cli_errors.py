"""Every error of the command line is one line, ``paged-rewrite: <kind>: <message>``, with the
exit code of the README's table — click's own parse errors, mistyped commands, out-of-range
flags and a Ctrl-C during start-up included; ``inspect`` fails as the rewrite it plans would."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import fixture_model
from models import no_cache_model, qeff_export

from paged_rewrite import UsageError, rewrite
from paged_rewrite.cli import main

CLI = [sys.executable, "-m", "paged_rewrite.cli"]


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=600)


def one_line(done: subprocess.CompletedProcess[str], code: int, kind: str) -> str:
    assert done.returncode == code, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"paged-rewrite: {kind}: "), done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return qeff_export(tmp_path_factory.mktemp("cli") / "model.onnx")


@pytest.mark.parametrize(
    ("args", "code", "kind", "words"),
    [
        (["{model}", "-o", "{out}", "--kv-block-size", "x"], 2, "usage", ["'--kv-block-size'", "'x'"]),
        (["{model}", "-o", "{out}", "--kv-block-size", "16", "--bogus"], 2, "usage", ["--bogus"]),
        (["{model}", "--kv-block-size", "16"], 2, "usage", ["Missing option '-o'"]),
        (["{folder}", "-o", "{out}", "--kv-block-size", "16"], 3, "not_a_model", ["is a directory"]),
        (["inspect", "{folder}"], 3, "not_a_model", ["is a directory"]),
        (["verify", "{folder}", "{model}"], 3, "not_a_model", ["is a directory"]),
        (["inspect"], 2, "usage", ["Missing argument 'MODEL'"]),
        ([], 2, "usage", ["no command or model given", "demo, inspect, rewrite, verify"]),
    ],
)
def test_click_errors_are_one_line(
    model: Path, tmp_path: Path, args: list[str], code: int, kind: str, words: list[str]
) -> None:
    paths = {"model": model, "out": tmp_path / "out.onnx", "folder": model.parent}
    line = one_line(run(*(a.format(**paths) for a in args)), code, kind)
    assert all(word in line for word in words), line
    assert not (tmp_path / "out.onnx").exists()


def test_a_mistyped_command_is_no_such_command(tmp_path: Path) -> None:
    line = one_line(run("verfiy", tmp_path / "a.onnx", tmp_path / "b.onnx"), 2, "usage")
    assert "no such command 'verfiy' (did you mean 'verify'?)" in line
    assert "the commands are demo, inspect, rewrite, verify" in line and "-o" not in line.split(";")[0]


def test_a_dim_the_model_lacks_lists_the_model_dims(model: Path, tmp_path: Path) -> None:
    line = one_line(
        run(model, "-o", tmp_path / "out.onnx", "--kv-block-size", 16, "--dim", "windw=32"), 2, "usage"
    )
    assert f"{model}: --dim windw=32: the model has no dim 'windw'" in line
    assert "its symbolic dims are batch_size, ctx_len, seq_len" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags",
    [
        ["--kv-block-size", str(2**64)],
        ["--kv-block-size", str(2**31)],
        ["--kv-block-size", "16", "--ctx-len", str(2**40)],
        ["--kv-block-size", "16", "--ctx-buckets", f"16,{2**70}"],
        ["--kv-block-size", "16", "--num-blocks", str(2**64)],
        ["--kv-block-size", "16", "--dim", f"batch_size={2**64}"],
    ],
)
def test_values_past_any_context_are_usage_errors(model: Path, tmp_path: Path, flags: list[str]) -> None:
    line = one_line(run(model, "-o", tmp_path / "out.onnx", *flags), 2, "usage")
    assert "is out of range: at most" in line
    assert list(tmp_path.iterdir()) == []


def test_the_python_api_refuses_an_absurd_block_size_too(model: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--kv-block-size 9223372036854775808 is out of range"):
        rewrite(model, tmp_path / "out.onnx", 2**63)


def test_inspect_exits_as_the_rewrite_would(tmp_path: Path) -> None:
    """A CI pre-check runs inspect with the rewrite's flags: same exit code, the file named."""
    ring = fixture_model("gpt_oss_swa_moe")
    planned = run("inspect", ring, "--kv-block-size", 32)
    rewritten = run(ring, "-o", tmp_path / "out.onnx", "--kv-block-size", 32)
    assert planned.returncode == rewritten.returncode == 2
    assert one_line(planned, 2, "usage") == rewritten.stderr
    assert f"{ring}: node '/model/layers.0/self_attn/CtxScatter'" in planned.stderr
    assert "cache tensors" in planned.stdout  # the sites are still listed
    as_json = json.loads(run("inspect", ring, "--kv-block-size", 32, "--json").stdout)
    assert as_json["plan"] is None and as_json["plan_error_kind"] == "usage" and as_json["exit_code"] == 2
    assert as_json["plan_error"] == planned.stderr.removeprefix("paged-rewrite: usage: ").strip()


def test_inspect_names_the_file_of_a_model_without_cache(tmp_path: Path) -> None:
    relu = no_cache_model(tmp_path / "relu.onnx")
    line = one_line(run("inspect", relu), 4, "no_cache")
    assert line.startswith(f"paged-rewrite: no_cache: {relu}: no KV cache found")
    done = run("inspect", relu, "--json")
    assert json.loads(done.stdout)["error"] == {"kind": "no_cache", "message": line.split(": ", 2)[2].strip(),
                                                "exit_code": 4}  # fmt: skip


def test_json_errors_go_to_stdout_as_json(model: Path, tmp_path: Path) -> None:
    done = run(model, "-o", tmp_path / "out.onnx", "--kv-block-size", 16, "--json", "--bogus")
    assert json.loads(done.stdout)["error"]["exit_code"] == 2 and done.returncode == 2
    done = run("inspect", tmp_path / "missing.onnx", "--json")
    assert json.loads(done.stdout) == {"error": {"kind": "not_a_model", "exit_code": 3,
                                                 "message": f"{tmp_path / 'missing.onnx'}: no such file"}}  # fmt: skip


def test_verify_says_which_flag_fixes_the_context(model: Path, tmp_path: Path) -> None:
    paged = tmp_path / "paged.onnx"
    assert run(model, "-o", paged, "--kv-block-size", 16, "--ctx-buckets", 128).returncode == 0
    line = one_line(run("verify", model, paged, "--ctx-len", 64), 2, "usage")
    assert "ctx_len 64 must equal num_kv_blocks*kv_block_size = 8*16" in line
    assert "pass --ctx-len 128 (or leave it out), or rewrite with --ctx-len 64" in line


# Start-up is mostly importing onnx; a Ctrl-C then used to print a traceback. The hook makes the
# named module's import raise KeyboardInterrupt, as a Ctrl-C during it would.
INTERRUPT_AT_IMPORT = """
import sys
interrupted = sys.argv[1]
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == interrupted:
            raise KeyboardInterrupt
        return None
sys.meta_path.insert(0, Interrupt())
sys.argv = ["paged-rewrite", *sys.argv[2:]]
from paged_rewrite.cli import main
main()
"""


@pytest.mark.parametrize("module", ["click", "onnx"])
def test_ctrl_c_during_start_up_is_one_line(model: Path, tmp_path: Path, module: str) -> None:
    args = [model, "-o", tmp_path / "out.onnx", "--kv-block-size", 16]
    done = subprocess.run([sys.executable, "-c", INTERRUPT_AT_IMPORT, module, *map(str, args)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 130
    assert done.stderr == "paged-rewrite: interrupted: nothing was written\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("as_json", [False, True])
def test_demo_without_workdir_prints_no_path_it_deletes(as_json: bool) -> None:
    result = CliRunner().invoke(main, ["demo", *(["--json"] if as_json else [])])
    assert result.exit_code == 0, result.output
    assert tempfile.gettempdir() not in result.stdout
    if as_json:
        report = json.loads(result.stdout)["rewrite"]
        assert report["input_path"] == "model.onnx" and report["output_path"] is None
        assert report["files"] == {
            "manifest": "paged.onnx.json",
            "specializations": "paged.specializations.json",
        }
