"""The command line starts fast: the paged ops ship prebuilt (package data rebuilt from the
onnxscript sources here, byte for byte), and a rewrite, ``inspect`` or ``--help`` imports neither
onnxscript nor onnxruntime. Timings are in BENCHMARKS.md (benchmarks/cli_startup.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fixture_model

from paged_rewrite.custom_ops.emit import build_library
from paged_rewrite.custom_ops.library import LIBRARY_FILE

PROBE = """
import sys
from paged_rewrite.cli import main
sys.argv = ["paged-rewrite", *sys.argv[1:]]
try:
    main()
except SystemExit as done:
    code = done.code
print(sorted(m for m in ("onnxscript", "onnxruntime") if m in sys.modules), code)
"""


def test_the_shipped_ops_are_the_sources_built() -> None:
    """Edit paged_ops.py without running scripts/build_paged_ops.py and this fails."""
    assert LIBRARY_FILE.read_bytes() == build_library()


@pytest.mark.parametrize("command", ["rewrite", "inspect", "--help"])
def test_the_cli_imports_neither_onnxscript_nor_onnxruntime(tmp_path: Path, command: str) -> None:
    model = str(fixture_model("llama_default"))
    args = {
        "rewrite": [model, "-o", str(tmp_path / "p.onnx"), "--kv-block-size", "32", "--ctx-len", "128"],
        "inspect": ["inspect", model, "--kv-block-size", "32"],
        "--help": ["--help"],
    }[command]
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[] 0", done.stdout + done.stderr
