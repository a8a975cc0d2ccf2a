"""Read a model by path without its weights, and write one atomically after checking it by path."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from paged_rewrite.errors import NotAModelError, OutputError, UsageError


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Load the graph of ``path``; external weight data stays on disk, unread."""
    source = Path(path)
    if not source.is_file():
        raise NotAModelError(f"{source}: no such file")
    try:
        model = onnx.load(os.fspath(source), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise NotAModelError(f"{source}: not an ONNX model ({type(exc).__name__})") from None
    if model.ir_version < 3 or not model.graph.input or not model.graph.node:
        raise NotAModelError(f"{source}: not an ONNX model (no graph inputs or nodes)")
    return model


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``model`` whose bytes live in an external file."""
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            yield from (sparse.values for sparse in graph.sparse_initializer)
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            graphs.extend([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs)


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str], source: str | os.PathLike[str]) -> Path:
    """Write ``model`` to ``path`` via a temporary file in the same folder, checked by path with
    the full ONNX checker before it is renamed into place. On any failure nothing is left behind.

    External weights are referenced, not copied: their locations are relative to the model's
    folder, and the checker and onnxruntime refuse references that leave it, so a model with
    external data must be written into the folder of its data files.
    """
    target = Path(path)
    if target.resolve() == Path(source).resolve():
        raise UsageError(f"{target}: the output must not overwrite the input model")
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent}: output folder does not exist")
    if (
        any(True for _ in external_tensors(model))
        and target.parent.resolve() != Path(source).parent.resolve()
    ):
        raise UsageError(
            f"{target}: {source} keeps its weights in external data files, which the output references "
            f"in place; write the output into {Path(source).parent} (external data may not be referenced "
            "from another folder)"
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp_name)
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
