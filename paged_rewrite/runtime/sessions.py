"""onnxruntime sessions for original QEfficient exports and for paged models.

Original exports use the int64 constant INT32_MAX as an "invalid index" that AI 100 treats as
"don't care" (reads) or "skip" (writes); onnxruntime rejects it. ``sentinel_overrides`` finds
those constants by structure (a Constant holding INT32_MAX whose value flows, through a few
elementwise ops, into a ``Ctx*`` op) and maps them to what onnxruntime can run: 0 on the read
side (the slot is masked anyway) and -1 on the write side (the last slot, as non-CB graphs do).
Paged models need no override: their ops never index out of range.
"""

from __future__ import annotations

import os
from collections import deque

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
from onnx import numpy_helper

INT32_MAX = 2**31 - 1
# onnxruntime logs its own errors to stderr before raising them; the tool reports each failure in
# one line of its own, so only fatal messages may pass.
ort.set_default_logger_severity(4)
_SEARCH_DEPTH = 4


def sentinel_overrides(model: str | os.PathLike[str] | onnx.ModelProto) -> dict[str, np.ndarray]:
    """Constant outputs of the model's main graph to override for onnxruntime, by name."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(os.fspath(model), load_external_data=False)
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    overrides: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type != "Constant" or not node.attribute or node.attribute[0].name != "value":
            continue
        value = numpy_helper.to_array(node.attribute[0].t)
        if value.dtype != np.int64 or value.size != 1 or int(value.reshape(())) != INT32_MAX:
            continue
        target = _first_cache_op(node.output[0], consumers)
        if target is not None:
            replacement = -1 if "Scatter" in target else 0
            overrides[node.output[0]] = np.array(replacement, dtype=np.int64).reshape(value.shape)
    return overrides


def _first_cache_op(name: str, consumers: dict[str, list[onnx.NodeProto]]) -> str | None:
    queue = deque([(name, 0)])
    while queue:
        current, depth = queue.popleft()
        for user in consumers.get(current, []):
            if user.op_type.startswith("Ctx"):
                return user.op_type
            if depth < _SEARCH_DEPTH:
                queue.extend((out, depth + 1) for out in user.output)
    return None


def _layer_functions_with_sentinels(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """Local functions that call a ``Ctx*`` op and hold an INT32_MAX constant."""
    found = []
    for function in model.functions:
        calls_ctx = any(n.op_type.startswith("Ctx") for n in function.node)
        if calls_ctx and any(_is_sentinel(n) for n in function.node):
            found.append((function.domain, function.name))
    return found


def _is_sentinel(node: onnx.NodeProto) -> bool:
    if node.op_type != "Constant" or not node.attribute or node.attribute[0].name != "value":
        return False
    value = numpy_helper.to_array(node.attribute[0].t)
    return value.dtype == np.int64 and value.size == 1 and int(value.reshape(())) == INT32_MAX


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def open_session(
    model_path: str | os.PathLike[str], patch_sentinels: bool = False, threads: int | None = None
) -> ort.InferenceSession:
    """A CPU session; with ``patch_sentinels`` the INT32_MAX constants are overridden first;
    ``threads`` sets onnxruntime's intra-op threads (its default: one per physical core)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 4  # fatal only: failures are reported by the caller, in one line
    keep_alive = []
    source: str | bytes = os.fspath(model_path)
    if patch_sentinels:
        model = onnx.load(os.fspath(model_path), load_external_data=False)
        layers = _layer_functions_with_sentinels(model)
        if layers and not _has_external_data(model):
            # Overrides are by value name in the main graph; sentinels inside a shared layer
            # function (CB writes, BlockedKV reads of subfunction exports) get names there once
            # the layer functions are inlined, which changes no computation.
            model = onnx.inliner.inline_selected_functions(model, layers)
            source = model.SerializeToString()
        for name, value in sentinel_overrides(model).items():
            ort_value = ort.OrtValue.ortvalue_from_numpy(value)
            keep_alive.append(ort_value)
            options.add_initializer(name, ort_value)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    session._paged_rewrite_keep_alive = keep_alive  # must outlive the session
    return session
