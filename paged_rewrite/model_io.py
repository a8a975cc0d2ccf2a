"""Read a model by path without its weights, and write one atomically after checking it by path."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from paged_rewrite.errors import NotAModelError, OutputError, UsageError


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load the graph of ``path``; external weight data stays on disk, unread."""
    source = Path(path)
    if not source.is_file():
        raise NotAModelError(f"{source}: no such file")
    try:
        model = ir.load(source)
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise NotAModelError(f"{source}: not an ONNX model ({type(exc).__name__})") from None
    if model.ir_version < 3 or not model.graph.inputs or model.graph.num_nodes() == 0:
        raise NotAModelError(f"{source}: not an ONNX model (no graph inputs or nodes)")
    return model


def save_model(model: ir.Model, path: str | os.PathLike[str], source: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` via a temporary file in the same folder, checked before renaming.

    On any failure nothing is left at ``path`` or beside it.
    """
    target = Path(path)
    if target.resolve() == Path(source).resolve():
        raise UsageError(f"{target}: the output must not overwrite the input model")
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent}: output folder does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        ir.save(model, tmp_name)
        onnx.checker.check_model(tmp_name, full_check=True)
        os.replace(tmp_name, target)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OutputError(
            f"{target}: the rewritten model fails the ONNX checker: {_first_line(exc)}"
        ) from None
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
