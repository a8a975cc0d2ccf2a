"""Read a model by path without its weights, and write one atomically after checking it by path."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from paged_rewrite.errors import NotAModelError, OutputError, UsageError


def load_model(path: str | os.PathLike[str], check_data_paths: bool = True) -> onnx.ModelProto:
    """Load the graph of ``path``; external weight data stays on disk, unread. Unsafe data
    locations are refused unless ``check_data_paths`` is off (the caller runs ``data_files``)."""
    source = Path(path)
    if not source.is_file():
        raise NotAModelError(f"{source}: no such file")
    try:
        model = onnx.load(os.fspath(source), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise NotAModelError(f"{source}: not an ONNX model ({type(exc).__name__})") from None
    if model.ir_version < 3 or not model.graph.input or not model.graph.node:
        raise NotAModelError(f"{source}: not an ONNX model (no graph inputs or nodes)")
    if check_data_paths:
        data_files(model, source)  # refuse unsafe references before anything else
    return model


def data_file(model_path: Path, tensor: onnx.TensorProto) -> Path:
    """The file holding ``tensor``'s external bytes; refused unless it is a relative path that
    stays inside the model's folder, symlinks resolved (cf. CVE-2024-27318, CVE-2024-27319)."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = str(entries.get("location", ""))
    folder = model_path.resolve().parent
    target = (folder / location).resolve()
    if (
        not location
        or Path(location).is_absolute()
        or ".." in Path(location).parts
        or not target.is_relative_to(folder)
    ):
        raise NotAModelError(
            f"{model_path}: tensor {tensor.name!r} has an unsafe external data location {location!r} "
            "(it must be a relative path inside the model's folder)"
        )
    return target


def data_files(model: onnx.ModelProto, model_path: str | os.PathLike[str]) -> list[Path]:
    """The distinct external data files ``model`` references (validated, not opened)."""
    files: dict[str, Path] = {}
    for tensor in external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if location not in files:
            files[location] = data_file(Path(model_path), tensor)
    return list(files.values())


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``model`` whose bytes live in an external file."""
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers, then tensor attributes of Constant nodes (the only other place exporters put
    weights) and of nodes holding subgraphs, in the graph and in functions. Checking the op type
    first keeps this walk cheap on graphs of tens of thousands of nodes."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


_TENSOR_HOLDERS = frozenset({"Constant", "ConstantOfShape", "If", "Loop", "Scan"})


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    yield from (sparse.values for sparse in graph.sparse_initializer)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        if node.op_type not in _TENSOR_HOLDERS:
            continue
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for graph in attribute.graphs:
                    yield from _graph_tensors(graph)


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    source: str | os.PathLike[str],
    copy_weights: bool = False,
    full_check: bool = False,
) -> Path:
    """Write ``model`` to ``path`` via temporary files in the same folder, checked by path with
    the ONNX checker before they are renamed into place. On any failure nothing is left.

    The check is structural (every node, function and name); ``full_check`` adds the checker's
    strict shape inference, which costs twice a plain load and save on a 70B-size graph.

    External weights are referenced, not copied, by default: their locations are relative to the
    model's folder, and the checker and onnxruntime refuse references that leave it, so such a
    model is written into the folder of its data files. ``copy_weights`` instead streams every
    external tensor into ``<output>.data`` beside the output (the only time weight bytes are read).
    """
    target, origin = Path(path), Path(source)
    if target.resolve() == origin.resolve():
        raise UsageError(f"{target}: the output must not overwrite the input model")
    if not target.parent.is_dir():
        raise OutputError(f"{target.parent}: output folder does not exist")
    external = any(True for _ in external_tensors(model))
    if external and not copy_weights and target.parent.resolve() != origin.resolve().parent:
        raise UsageError(
            f"{target}: {origin} keeps its weights in external data files, which the output references "
            f"in place; write the output into {origin.parent} or pass --copy-weights "
            "(external data may not be referenced from another folder)"
        )
    data_target = target.with_name(target.name + ".data")
    tmp_name: str | None = None
    tmp_data: str | None = None
    backup: str | None = None  # a previous <output>.data, restored if this run fails
    placed_data = False
    try:
        tmp_name = _temp_beside(target)
        if external and copy_weights:
            tmp_data = _temp_beside(data_target)
            _copy_external(model, origin, tmp_data, data_target.name)
        Path(tmp_name).write_bytes(model.SerializeToString())  # onnx.save would re-walk external data
        os.chmod(tmp_name, 0o666 & ~_umask())
        if tmp_data is not None:
            os.chmod(tmp_data, 0o666 & ~_umask())
            if data_target.exists():
                backup = _temp_beside(data_target)
                os.replace(data_target, backup)
            os.replace(tmp_data, data_target)  # the checker resolves the final data name
            placed_data = True
        onnx.checker.check_model(tmp_name, full_check=full_check)
        os.replace(tmp_name, target)
        placed_data = False
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, UnicodeDecodeError) as exc:
        raise OutputError(
            f"{target}: the rewritten model fails the ONNX checker: {_first_line(exc)}"
        ) from None
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from None
    finally:
        for leftover in (tmp_name, tmp_data, data_target if placed_data else None):
            if leftover is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)
        if backup is not None:
            if placed_data:  # this run failed: the previous data file goes back
                os.replace(backup, data_target)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(backup)
    return target


def write_text_atomically(path: Path, text: str) -> None:
    """Write a small text file via a temporary file and a rename."""
    tmp = _temp_beside(path)
    try:
        Path(tmp).write_text(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _temp_beside(target: Path) -> str:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from None
    os.close(fd)
    return name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_ALIGN = 4096
_CHUNK = 64 << 20


def _copy_external(model: onnx.ModelProto, source: Path, data_path: str, data_name: str) -> None:
    """Stream every external tensor of ``model`` into ``data_path`` (4 KiB aligned, in model
    order) and point the tensors at ``data_name``; memory stays bounded by one chunk."""
    offset = 0
    with open(data_path, "wb") as out:
        for tensor in external_tensors(model):
            entries = {entry.key: entry.value for entry in tensor.external_data}
            start, length = int(entries.get("offset", 0)), entries.get("length")
            with open(data_file(source, tensor), "rb") as src:
                size = int(length) if length is not None else os.fstat(src.fileno()).st_size - start
                src.seek(start)
                out.seek(offset)
                remaining = size
                while remaining:
                    chunk = src.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise OutputError(f"{source}: external data of {tensor.name!r} is truncated")
                    out.write(chunk)
                    remaining -= len(chunk)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(size))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += -(-size // _ALIGN) * _ALIGN
        out.truncate(offset)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
