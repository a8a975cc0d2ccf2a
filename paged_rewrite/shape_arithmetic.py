"""Exact evaluation of the small tensors a graph computes from shapes and constants.

Once every input dim is bound, a ``Shape`` is a constant, and so is everything computed from
shapes and constants alone: lengths, ``Range``s, masks' sizes, the shape operands of
``Reshape``/``Expand``/``Slice``. ONNX's own data propagation follows only a handful of ops
(``Shape``, ``Gather``, ``Concat``, ``Add``...) and loses the thread at ``Range``, ``Where``,
``Equal`` or ``ConstantOfShape``, which QEfficient's exports use in their shape arithmetic;
this module evaluates those ops on their known inputs, as a compiler folds them under a
specialization. ``evaluate`` returns None for an op it does not know: its outputs stay unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

Array = npt.NDArray[Any]
Kernel = Callable[[list[Array], dict[str, Any]], list[Array]]


class TooLarge(ValueError):
    """The result would be an activation-sized tensor, not shape arithmetic: not folded."""


def evaluate(node: onnx.NodeProto, inputs: list[Array], largest: int) -> list[Array] | None:
    """The outputs of ``node`` on known ``inputs`` (an empty optional input is an empty array),
    or None when this op is not one we fold. Raises ``TooLarge`` rather than build a result of
    more than ``largest`` elements."""
    for array in inputs:
        _check_size(int(array.size), largest)
    kernel = _KERNELS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if kernel is None:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in _GROWING:  # their result may be far larger than their operands
        _check_size(_GROWING[node.op_type](inputs), largest)
    return kernel(inputs, attributes)


def _check_size(size: int, largest: int) -> None:
    if size > largest:
        raise TooLarge(f"{size} elements")


def constant_value(node: onnx.NodeProto) -> Array | None:
    """The value of a ``Constant`` node (any of its attribute forms), or None for a sparse one."""
    attribute = node.attribute[0]
    value = helper.get_attribute_value(attribute)
    if attribute.name == "value":
        return numpy_helper.to_array(value)
    if attribute.name in ("value_int", "value_ints"):
        return np.array(value, dtype=np.int64)
    if attribute.name in ("value_float", "value_floats"):
        return np.array(value, dtype=np.float32)
    return None


def _elementwise(function: Callable[..., Array]) -> Kernel:
    def kernel(inputs: list[Array], _: dict[str, Any]) -> list[Array]:
        return [np.asarray(function(*inputs)).astype(np.result_type(*inputs), copy=False)]

    return kernel


def _compare(function: Callable[..., Array]) -> Kernel:
    return lambda inputs, _: [np.asarray(function(*inputs))]


def _div(a: Array, b: Array) -> Array:
    if np.issubdtype(a.dtype, np.integer):  # C semantics, as runtimes implement it: toward zero
        return np.asarray(np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b)))
    return np.asarray(a / b)


def _mod(inputs: list[Array], attributes: dict[str, Any]) -> list[Array]:
    a, b = inputs
    return [np.fmod(a, b) if attributes.get("fmod", 0) else np.mod(a, b)]


def shape_of(node: onnx.NodeProto, dims: Sequence[int]) -> Array:
    """What ``Shape`` (with its ``start``/``end``) or ``Size`` returns for an input of ``dims``:
    only the input's shape matters, not its contents."""
    if node.op_type == "Size":
        return np.array(int(np.prod(dims)), np.int64)
    attributes = {a.name: a.i for a in node.attribute}
    return np.array(dims[attributes.get("start", 0) : attributes.get("end", len(dims))], np.int64)


def _slice(inputs: list[Array], _: dict[str, Any]) -> list[Array]:
    data, starts, ends = inputs[:3]
    axes = inputs[3] if len(inputs) > 3 and inputs[3].size else np.arange(len(starts))
    steps = inputs[4] if len(inputs) > 4 and inputs[4].size else np.ones(len(starts), np.int64)
    index: list[slice] = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        dim = data.shape[int(axis)]
        index[int(axis)] = _onnx_slice(int(start), int(end), int(step), dim)
    return [data[tuple(index)]]


def _onnx_slice(start: int, end: int, step: int, dim: int) -> slice:
    """ONNX's clamping (``end`` may be INT64_MIN/MAX); Python's differs for negative steps."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
    start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    return slice(start, end if end >= 0 else None, step)


def _unsqueeze(inputs: list[Array], attributes: dict[str, Any]) -> list[Array]:
    data = inputs[0]
    axes = inputs[1] if len(inputs) > 1 else np.array(attributes["axes"])
    rank = data.ndim + len(axes)
    return [np.expand_dims(data, tuple(sorted(int(a) % rank for a in axes)))]


def _squeeze(inputs: list[Array], attributes: dict[str, Any]) -> list[Array]:
    data = inputs[0]
    axes = inputs[1] if len(inputs) > 1 and inputs[1].size else attributes.get("axes")
    if axes is None:
        return [np.squeeze(data)]
    return [np.squeeze(data, axis=tuple(int(a) % data.ndim for a in axes))]


def _reshape(inputs: list[Array], attributes: dict[str, Any]) -> list[Array]:
    data, shape = inputs
    dims = [int(d) for d in shape]
    if not attributes.get("allowzero", 0):
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return [data.reshape(dims)]


def _reduce(function: Callable[..., Array]) -> Kernel:
    def kernel(inputs: list[Array], attributes: dict[str, Any]) -> list[Array]:
        data = inputs[0]
        axes = inputs[1] if len(inputs) > 1 and inputs[1].size else attributes.get("axes")
        if axes is None and attributes.get("noop_with_empty_axes", 0):
            return [data]
        axis = None if axes is None else tuple(int(a) % data.ndim for a in axes)
        return [np.asarray(function(data, axis=axis, keepdims=bool(attributes.get("keepdims", 1))))]

    return kernel


def _constant_of_shape(inputs: list[Array], attributes: dict[str, Any]) -> list[Array]:
    value = attributes.get("value")
    fill = numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    return [np.full([int(d) for d in inputs[0]], fill[0], dtype=fill.dtype)]


def _expand(inputs: list[Array], _: dict[str, Any]) -> list[Array]:
    data, shape = inputs
    target = np.broadcast_shapes(data.shape, tuple(int(d) for d in shape))
    return [np.broadcast_to(data, target).copy()]


def _variadic(function: Callable[[Array, Array], Array]) -> Kernel:
    def kernel(inputs: list[Array], _: dict[str, Any]) -> list[Array]:
        result = inputs[0]
        for other in inputs[1:]:
            result = function(result, other)
        return [np.asarray(result)]

    return kernel


def _first(function: Callable[[Array], Array]) -> Kernel:
    return lambda inputs, _: [np.asarray(function(inputs[0]))]


def _cast(inputs: list[Array], attributes: dict[str, Any]) -> list[Array]:
    return [inputs[0].astype(helper.tensor_dtype_to_np_dtype(attributes["to"]))]


def _gather(inputs: list[Array], attributes: dict[str, Any]) -> list[Array]:
    return [np.take(inputs[0], inputs[1], axis=attributes.get("axis", 0))]


def _range(inputs: list[Array], _: dict[str, Any]) -> list[Array]:
    start, limit, delta = (x.item() for x in inputs)
    return [np.arange(start, limit, delta, dtype=inputs[0].dtype)]


def _concat(inputs: Sequence[Array], attributes: dict[str, Any]) -> list[Array]:
    return [np.concatenate(list(inputs), axis=attributes["axis"])]


def _range_size(inputs: list[Array]) -> int:
    start, limit, delta = (x.item() for x in inputs)
    return max(int(np.ceil((limit - start) / delta)), 0) if delta else 0


# The size of the result of each op whose result may be larger than its operands.
_GROWING: dict[str, Callable[[list[Array]], int]] = {
    "Range": _range_size,
    "ConstantOfShape": lambda inputs: int(np.prod([int(d) for d in inputs[0]])),
    "Expand": lambda inputs: int(
        np.prod(np.broadcast_shapes(inputs[0].shape, tuple(int(d) for d in inputs[1])))
    ),
    "Tile": lambda inputs: int(inputs[0].size * np.prod([int(r) for r in inputs[1]])),
}

_KERNELS: dict[str, Kernel] = {
    "Identity": _first(lambda x: x),
    "Cast": _cast,
    "Gather": _gather,
    "Slice": _slice,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Reshape": _reshape,
    "Flatten": lambda inputs, a: [inputs[0].reshape(int(np.prod(inputs[0].shape[: a.get("axis", 1)])), -1)],
    "Transpose": lambda inputs, a: [np.transpose(inputs[0], a.get("perm"))],
    "Add": _elementwise(np.add),
    "Sub": _elementwise(np.subtract),
    "Mul": _elementwise(np.multiply),
    "Div": _elementwise(_div),
    "Mod": _mod,
    "Neg": _first(np.negative),
    "Abs": _first(np.abs),
    "Ceil": _first(np.ceil),
    "Floor": _first(np.floor),
    "Sqrt": _first(np.sqrt),
    "Max": _variadic(np.maximum),
    "Min": _variadic(np.minimum),
    "Equal": _compare(np.equal),
    "Less": _compare(np.less),
    "LessOrEqual": _compare(np.less_equal),
    "Greater": _compare(np.greater),
    "GreaterOrEqual": _compare(np.greater_equal),
    "Not": _first(np.logical_not),
    "And": _variadic(np.logical_and),
    "Or": _variadic(np.logical_or),
    "Xor": _variadic(np.logical_xor),
    "Where": lambda inputs, _: [np.where(*inputs)],
    "Range": _range,
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Tile": lambda inputs, _: [np.tile(inputs[0], [int(r) for r in inputs[1]])],
    "ReduceProd": _reduce(np.prod),
    "ReduceSum": _reduce(np.sum),
    "ReduceMax": _reduce(np.max),
    "ReduceMin": _reduce(np.min),
}
