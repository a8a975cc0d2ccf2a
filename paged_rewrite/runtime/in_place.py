"""KV caches updated in place: each retained-state output written over its input's buffer.

onnxruntime returns every output in a fresh buffer, so a step of a model with retained state
copies its whole KV cache (or block pool) once per cache tensor, whatever the step reads: for a
paged model narrowed to a short context that copy is most of the step. A device keeps retained
state where it is (QAIC's ``-retained-state``); here the same is done with an IO binding that
gives the output the input's buffer, which the scatter then updates without copying it first.

That is only sound when nothing else reads the cache input, since it changes while the step
runs: the input must feed only its scatter (which reads it before writing) and shape queries.
QEfficient exports and their paged rewrites are built that way (the gathers read the scatter's
output); ``in_place_refusal`` checks it, per cache, in the main graph.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from paged_rewrite.custom_ops.library import INDEX_OPS

# Ops that read only a tensor's shape, never its values (the index ops read a pool for its shape).
_SHAPE_ONLY = {"Shape", *INDEX_OPS}


def in_place_refusal(model_path: str | os.PathLike[str], caches: Iterable[str]) -> str | None:
    """Why the caches cannot be updated in place, or None if they can."""
    graph = onnx.load(os.fspath(model_path), load_external_data=False).graph
    for cache in caches:
        readers = [node for node in graph.node if cache in node.input]
        scatters = [n for n in readers if "Scatter" in n.op_type and n.input[0] == cache]
        others = [n for n in readers if n.op_type not in _SHAPE_ONLY and n not in scatters]
        if len(scatters) != 1 or others:
            what = others[0].op_type if others else f"{len(scatters)} scatters"
            return f"cache {cache!r} is read by {what} in the main graph, not only by its scatter"
    return None


def run_in_place(
    session: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    aliases: Mapping[str, str],
    output_names: Iterable[str],
) -> dict[str, np.ndarray]:
    """Run ``session``; each input named in ``aliases`` (input -> its retained-state output) is
    bound as that output too, so its array is updated in place and returned as the output."""
    binding = session.io_binding()
    updated: dict[str, np.ndarray] = {}
    for name, value in feeds.items():
        if name in aliases:
            array = np.ascontiguousarray(value)  # the buffer the model writes into
            shared = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(name, shared)
            binding.bind_ortvalue_output(aliases[name], shared)
            updated[aliases[name]] = array
        else:
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
    fresh = [name for name in output_names if name not in updated]
    for name in fresh:
        binding.bind_output(name)
    session.run_with_iobinding(binding)
    outputs = binding.get_outputs()[len(updated) :]  # in binding order: the aliased ones first
    return {**dict(zip(fresh, (value.numpy() for value in outputs), strict=True)), **updated}
