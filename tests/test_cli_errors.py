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


def test_a_block_of_one_token_is_refused_with_the_reason(model: Path, tmp_path: Path) -> None:
    """The null block needs two rows: one for invalid writes, the zero row for invalid reads."""
    line = one_line(run(model, "-o", tmp_path / "out.onnx", "--kv-block-size", 1), 2, "usage")
    assert "--kv-block-size" in line and "1 is not in the range x>=2" in line
    with pytest.raises(UsageError, match=r"--kv-block-size must be at least 2 \(the null block keeps"):
        rewrite(model, tmp_path / "out.onnx", 1)
    assert list(tmp_path.iterdir()) == []


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
    line = one_line(run("verify", model, paged, "--ctx-len", 16), 2, "usage")
    assert "ctx_len 16 is too short for verify's 18-token scenario" in line
    assert "pass --ctx-len 18 or more, or fewer --decode-steps" in line


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
from paged_rewrite._entry import main
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


# The console script's first act is the start-up handler; the child says when it is in place (the
# interpreter's own start, before any of our code, is Python's), then loads and runs the command.
SIGNAL_AFTER_READY = """
import sys
from paged_rewrite import _entry
_entry.catch_interrupts_while_starting()
print("ready", flush=True)
sys.argv = ["paged-rewrite", *sys.argv[1:]]
_entry.run()
"""


@pytest.mark.parametrize(
    ("delay", "as_json"),
    [
        *((delay, False) for delay in (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.6, 0.9, 1.3)),
        (0.0, True),
        (0.2, True),
    ],
)
def test_a_real_ctrl_c_at_any_moment_of_start_up_is_one_line(
    model: Path, tmp_path: Path, delay: float, as_json: bool
) -> None:
    """A SIGINT sent while the command loads (imports, click's decorators) or runs: one line and
    130 with nothing written (with ``--json``, the same error as JSON on stdout), or (if it came
    too late) a finished rewrite. Never a traceback."""
    import signal
    import time

    out = tmp_path / "out" / "paged.onnx"
    flags = ["--json"] if as_json else []
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            SIGNAL_AFTER_READY,
            str(model),
            "-o",
            str(out),
            "--kv-block-size",
            "16",
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=600)
    if process.returncode == 0:  # the rewrite had finished
        assert stderr == "" and out.exists()
    else:
        assert (process.returncode, stderr) == (130, "paged-rewrite: interrupted: nothing was written\n")
        assert not [p for p in tmp_path.rglob("*") if p.is_file()]
        error = {"error": {"kind": "interrupted", "message": "nothing was written", "exit_code": 130}}
        assert (json.loads(stdout) == error) if as_json else stdout == ""


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


def test_an_output_path_without_a_file_name_is_a_usage_error(model: Path) -> None:
    one_line(run(model, "-o", "", "--kv-block-size", 16), 2, "usage")


def test_demo_never_replaces_a_users_model_in_its_workdir(tmp_path: Path) -> None:
    mine = tmp_path / "model.onnx"
    mine.write_bytes(b"my own model")
    line = one_line(run("demo", "--workdir", tmp_path), 2, "usage")
    assert "already holds model.onnx, which the demo did not write" in line
    assert mine.read_bytes() == b"my own model"
    again = tmp_path / "again"
    assert run("demo", "--workdir", again).returncode == 0
    assert run("demo", "--workdir", again).returncode == 0  # its own files it may replace


def test_only_the_inputs_dims_can_be_bound(tmp_path: Path) -> None:
    """A real export's other dims are names its exporter made up: neither listed nor bindable."""
    real = fixture_model("llama_default")
    line = one_line(
        run(real, "-o", tmp_path / "p.onnx", "--kv-block-size", 16, "--dim", "Castlogits_dim_0=5"), 2, "usage"
    )
    assert line.rstrip().endswith("its symbolic dims are batch_size, ctx_len, seq_len")


def test_verify_json_prints_one_document_even_on_a_mismatch(tmp_path: Path) -> None:
    """A pipeline parses stdout: one JSON document, the report with the verdict in it."""
    paged = tmp_path / "paged.onnx"
    assert run(fixture_model("mistral_default"), "-o", paged, "--kv-block-size", 16).returncode == 0
    done = run("verify", fixture_model("llama_default"), paged, "--json")
    assert done.returncode == 7
    document = json.loads(done.stdout)
    assert document["ok"] is False and document["error"]["kind"] == "verification_failed"
    assert done.stderr.count("\n") == 1


def test_inspect_takes_the_flags_that_shape_the_plan(tmp_path: Path) -> None:
    """A CI pre-check of a gpt-oss job whose ring length comes from its specializations file:
    inspect exits as the rewrite with the same flags would (2 without the window, 0 with it)."""
    gpt_oss = fixture_model("gpt_oss_swa_moe")
    one_line(run("inspect", gpt_oss, "--kv-block-size", 16, "--ctx-len", 128), 2, "usage")
    spec = tmp_path / "specializations.json"
    spec.write_text(
        json.dumps(
            {
                "specializations": [
                    {"batch_size": "1", "seq_len": "32", "ctx_len": "128", "sliding_window": "32"}
                ]
            }
        )
    )
    done = run(
        "inspect", gpt_oss, "--kv-block-size", 16, "--specializations", spec, "--num-blocks", 40, "--json"
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)["plan"]
    assert plan["windows"] == {"sliding_window": 32} and plan["total_num_kv_blocks"] == 40


def test_verify_with_its_arguments_swapped_says_so(model: Path, tmp_path: Path) -> None:
    paged = tmp_path / "paged.onnx"
    assert run(model, "-o", paged, "--kv-block-size", 16).returncode == 0
    line = one_line(run("verify", paged, model), 2, "usage")
    assert "ORIGINAL is already a paged model" in line


def test_an_in_process_caller_keeps_its_own_interrupt_handler(model: Path, tmp_path: Path) -> None:
    """``paged_rewrite.cli.main`` called in-process (a notebook, a build tool) leaves the caller's
    SIGINT handler in place; only the console script owns SIGINT."""
    import signal

    def host_handler(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGINT, host_handler)
    try:
        result = CliRunner().invoke(
            main, [str(model), "-o", str(tmp_path / "p.onnx"), "--kv-block-size", "16"]
        )
        assert result.exit_code == 0, result.output
        assert signal.getsignal(signal.SIGINT) is host_handler
    finally:
        signal.signal(signal.SIGINT, previous)
