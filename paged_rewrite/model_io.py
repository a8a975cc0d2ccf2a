"""Read a model by path without its weights, and write one atomically after checking it by path."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from paged_rewrite.errors import NotAModelError, OutputError, UsageError


def load_model(path: str | os.PathLike[str], check_data_paths: bool = True) -> onnx.ModelProto:
    """Load the graph of ``path``; external weight data stays on disk, unread. Unsafe data
    locations are refused unless ``check_data_paths`` is off (the caller runs ``data_files``)."""
    source = Path(path)
    if source.is_dir():
        raise NotAModelError(f"{source}: is a directory, not a model file")
    if not source.is_file():
        raise NotAModelError(f"{source}: no such file")
    try:
        model = onnx.load(os.fspath(source), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise NotAModelError(f"{source}: not an ONNX model ({type(exc).__name__})") from None
    if model.ir_version < 3 or not model.graph.input or not model.graph.node:
        raise NotAModelError(f"{source}: not an ONNX model (no graph inputs or nodes)")
    _refuse_undecodable_names(model, source)
    if check_data_paths:
        data_files(model, source)  # refuse unsafe references before anything else
    return model


def _refuse_undecodable_names(model: onnx.ModelProto, source: Path) -> None:
    """ONNX names are UTF-8; protobuf hands a name that is not as ``bytes``, which nothing
    downstream (reports, JSON, error lines) can take. Such a file is damaged: say so. Checked
    where the tool shows names (the interface, and the custom-domain nodes whose operands the
    report lists); elsewhere a name is only copied, and the checker judges the output."""
    values = [v.name for v in [*model.graph.input, *model.graph.output]]
    for body in [model.graph, *model.functions]:
        for node in body.node:
            if node.domain not in ("", "ai.onnx"):
                values += [node.name, node.op_type, node.domain, *node.input, *node.output]
    for value in values:
        if not isinstance(value, str):
            raise NotAModelError(f"{source}: not an ONNX model (a name is not UTF-8: {value!r})")


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
    sidecars: Mapping[Path, str] | None = None,
    replaceable: Collection[Path] = (),
    obsolete: Collection[Path] = (),
) -> Path:
    """Write ``model`` to ``path`` and its ``sidecars`` (path -> text) as one: each goes to a
    temporary file in its target folder, the model is checked by path with the ONNX checker, and
    only then are they renamed into place — data and sidecars first, the model last, so a model
    in place implies its files. On any failure or interrupt, nothing is left: every file placed is
    removed, every one replaced is restored, every folder created is removed. Missing output
    folders are created.

    Files the tool names by itself (sidecars, ``<output>.data``) must not exist unless
    they are in ``replaceable`` (what an earlier run recorded as its own): anything else is
    refused before a byte is written. ``path`` itself, named by the user, may be replaced.
    ``obsolete`` files (an earlier run's sidecars this run does not write) go once the model is in
    place. From that moment the output has landed: an interrupt then is ignored, since nothing can
    be undone and everything asked for is written (the clean-up of backups and obsolete files
    finishes first).

    The check is structural (every node, function and name); ``full_check`` adds the checker's
    strict shape inference, which costs twice a plain load and save on a 70B-size graph.

    External weights are referenced, not copied, by default: their locations are relative to the
    model's folder, and the checker and onnxruntime refuse references that leave it, so such a
    model is written into the folder of its data files. Links will not do either: onnx refuses
    data files reached through a symlink, and data files with more than one hard link (as a
    "hardlink attack"; onnx 1.23 does) — a hard link would make the *input* unloadable too. So
    elsewhere this refuses unless ``copy_weights``, which streams every external tensor into
    ``<output>.data`` beside the output (the only time weight bytes are read).
    """
    target, origin = Path(path), Path(source)
    if target.resolve() == origin.resolve():
        raise UsageError(f"{target}: the output must not overwrite the input model")
    if target.is_dir():
        raise UsageError(f"{target}: is a directory; -o takes the output model's file name")
    external = any(True for _ in external_tensors(model))
    if external and not copy_weights and target.parent.resolve() != origin.resolve().parent:
        raise UsageError(
            f"{target}: {origin} keeps its weights in external data files, which the output references "
            f"in place; write the output into {origin.parent} or pass --copy-weights "
            "(external data may not be referenced from another folder, nor linked: onnx refuses "
            "symlinked and hard-linked data files)"
        )
    data_target = target.with_name(target.name + ".data")
    texts = dict(sidecars or {})
    owned = {p.resolve() for p in replaceable}
    for implicit in [*texts, *([data_target] if external and copy_weights else [])]:
        _refuse_foreign(implicit, owned)
    files = _FileSet()
    landed = False
    try:
        files.make_folders(target.parent)
        tmp_model = files.temp_beside(target)
        if external and copy_weights:
            tmp_data = files.temp_beside(data_target)
            _copy_external(model, origin, tmp_data, data_target.name)
        Path(tmp_model).write_bytes(model.SerializeToString())  # onnx.save would re-walk external data
        staged_texts = {}
        for sidecar, text in texts.items():
            staged_texts[sidecar] = files.temp_beside(sidecar)
            Path(staged_texts[sidecar]).write_text(text)
        # the checker resolves data by its final name, so the data goes in place before the check
        if external and copy_weights:
            files.place(tmp_data, data_target)
        onnx.checker.check_model(tmp_model, full_check=full_check)
        with _interrupts_deferred(drop_if_done=True):  # placing is quick; once done, it stays
            for sidecar in sorted(staged_texts):
                files.place(staged_texts[sidecar], sidecar)
            files.place(tmp_model, target)
            landed = True
            files.finish()
            for stale in obsolete:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
    except BaseException as exc:
        if landed:  # a failure cleaning up after the output is in place: nothing to undo
            raise
        with _interrupts_deferred():  # a second Ctrl-C must not cut the roll-back short
            files.roll_back()
        if isinstance(exc, (onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
            raise OutputError(
                f"{target}: the rewritten model fails the ONNX checker: {_first_line(exc)}"
            ) from None
        if isinstance(exc, UnicodeDecodeError):
            raise OutputError(f"{target}: the rewritten model fails the ONNX checker: {exc}") from None
        if isinstance(exc, OSError):
            raise OutputError(f"{target}: cannot write ({exc.strerror or exc})") from None
        raise
    return target


def _refuse_foreign(path: Path, owned: set[Path]) -> None:
    """A file the tool names by itself may replace only a file an earlier run recorded as its own."""
    if (path.exists() or path.is_symlink()) and path.resolve() not in owned:
        raise OutputError(
            f"{path}: exists and was not written by paged-rewrite (no manifest of ours lists it); "
            "move it away or choose another -o"
        )


class _FileSet:
    """Files placed as one (see ``save_model``): what was staged, placed, replaced and created, so
    that a failure at any point can undo all of it."""

    def __init__(self) -> None:
        self.temporaries: list[str] = []
        self.placed: list[Path] = []
        self.backups: dict[Path, str] = {}  # a replaced file -> where it waits until the end
        self.folders: list[Path] = []  # created by us, deepest last

    def make_folders(self, folder: Path) -> None:
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        for created in reversed(missing):
            created.mkdir()
            self.folders.append(created)

    def temp_beside(self, target: Path) -> str:
        self.make_folders(target.parent)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        os.chmod(name, 0o666 & ~_umask())
        self.temporaries.append(name)
        return name

    def place(self, temporary: str, target: Path) -> None:
        if target.exists() or target.is_symlink():
            backup = self.temp_beside(target)
            os.replace(target, backup)
            self.backups[target] = backup
        self.placed.append(target)  # before the rename: a failed rename still restores the backup
        os.replace(temporary, target)

    def roll_back(self) -> None:
        for target in reversed(self.placed):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            if target in self.backups:
                os.replace(self.backups.pop(target), target)
        self.finish()
        for folder in reversed(self.folders):
            with contextlib.suppress(OSError):
                folder.rmdir()

    def finish(self) -> None:
        for leftover in self.temporaries:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


@contextlib.contextmanager
def _interrupts_deferred(drop_if_done: bool = False) -> Iterator[None]:
    """Hold SIGINT until the block ends. Then a held interrupt is delivered to the handler in place,
    unless the block completed and ``drop_if_done`` (work that cannot be undone, and is done). Only on the main thread, where Python runs and sets signal handlers, and only
    when the current handler is Python's to restore."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    completed = False
    try:
        yield
        completed = True
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and not (completed and drop_if_done):
            signal.raise_signal(signal.SIGINT)


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
