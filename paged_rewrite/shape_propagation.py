"""Every value's shape in a model whose symbolic input dims are bound, as a compiler sees it
under one specialization.

Local function calls are expanded in place, as ``onnx.inliner.inline_local_functions`` would
expand them, but walked rather than copied, so each value inside a body keeps a readable name:
``<calling node>[<function>]/<name in the body>`` (nested calls nest). Each node's output
shapes come from ONNX's own shape inference for that op (``infer_node_outputs``), given the
contents of every input that is known; contents are known for constants and for whatever is
computed from shapes and constants alone (``shape_arithmetic``), which is what makes a
``Reshape``/``Expand``/``Range`` shape static once the inputs' dims are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import onnx
import onnx.shape_inference
from onnx import helper, numpy_helper

from paged_rewrite.shape_arithmetic import Array, constant_value, evaluate, shape_of

# Shape arithmetic is tiny; weights and activations are never folded (nor read from disk).
LARGEST_FOLDED = 1 << 16
Dims = tuple[int | str | None, ...]


@dataclass(frozen=True)
class ValueShape:
    """One value computed by a node: in the main graph, or inside a function body as called."""

    name: str
    op: str  # the producing node's op type (``domain::op`` outside ONNX)
    dims: Dims | None  # None: not even the rank is known
    inputs: tuple[str, ...]  # the producing node's inputs, named like ``name``
    problem: str | None = None  # why ONNX shape inference gave up on the node, when it did

    @property
    def static(self) -> bool:
        return self.dims is not None and all(isinstance(d, int) for d in self.dims)


@dataclass
class _Known:
    """What is known of a value while walking: its reported name, type, maybe its contents."""

    name: str
    type: onnx.TypeProto | None
    data: Array | None = None

    def __post_init__(self) -> None:
        self.dims = _dims(self.type)
        self._tensor: onnx.TensorProto | None = None

    def tensor(self) -> onnx.TensorProto:
        if self._tensor is None:
            assert self.data is not None
            self._tensor = numpy_helper.from_array(self.data)
        return self._tensor

    def signature(self) -> bytes:
        """All a function body's shapes can depend on: the type and the known contents."""
        kind = self.type.SerializeToString() if self.type is not None else b"?"
        if self.data is None:
            return kind
        return b"|".join(
            [kind, str(self.data.dtype).encode(), repr(self.data.shape).encode(), self.data.tobytes()]
        )


def propagate(model: onnx.ModelProto, dims: Mapping[str, int]) -> dict[str, ValueShape]:
    """The shape of every node output of ``model`` once its inputs' symbolic dims take ``dims``
    (symbols missing from ``dims`` stay symbolic), keyed by reported name, in walk order."""
    walker = _Walker(model)
    env: dict[str, _Known] = {}
    for value in model.graph.input:
        env[value.name] = _Known(value.name, _bind(value.type, dims))
    for tensor in model.graph.initializer:
        env[tensor.name] = _initializer(tensor)
    walker.body(model.graph.node, env, "", list(model.opset_import), {})
    return walker.values


_Template = tuple[list[ValueShape], list[tuple[str, _Known]]]


class _Walker:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.values: dict[str, ValueShape] = {}
        self.calls: dict[tuple[object, ...], _Template] = {}

    def body(
        self,
        nodes: Sequence[onnx.NodeProto],
        env: dict[str, _Known],
        scope: str,
        opsets: list[onnx.OperatorSetIdProto],
        attributes: Mapping[str, onnx.AttributeProto],
    ) -> None:
        for node in nodes:
            if any(a.ref_attr_name for a in node.attribute):
                node = _with_attributes(node, attributes)
            function = self.functions.get((node.domain, node.op_type))
            if function is not None:
                self.call(node, function, env, scope)
            else:
                self.node(node, env, scope, opsets)

    def call(
        self, node: onnx.NodeProto, function: onnx.FunctionProto, env: dict[str, _Known], scope: str
    ) -> None:
        """Walk ``function``'s body for this call. A call whose operands have the same types and
        known contents as an earlier call's (every layer's cache op) replays that walk."""
        inner = f"{scope}{node.name or node.output[0]}[{function.name}]/"
        operands = [env.get(name) if name else None for name in node.input[: len(function.input)]]
        given = {a.name: a for a in function.attribute_proto}
        given.update({a.name: a for a in node.attribute})
        key = (
            function.domain,
            function.name,
            tuple(k.signature() if k is not None else b"" for k in operands),
            tuple(sorted((name, a.SerializeToString()) for name, a in given.items())),
        )
        if key not in self.calls:
            self.calls[key] = self._walk_call(function, operands, inner, given)
        template, results = self.calls[key]
        outer = [k.name if k is not None else "" for k in operands]

        def named(reference: str) -> str:  # "@i": the call's i-th operand; ".x": x in the body
            return outer[int(reference[1:])] if reference[0] == "@" else inner + reference[1:]

        for value in template:
            name = inner + value.name
            inputs = tuple(named(reference) for reference in value.inputs)
            self.values[name] = ValueShape(name, value.op, value.dims, inputs, value.problem)
        for (reference, result), actual in zip(results, node.output, strict=False):
            if actual:
                name = named(reference) if reference else f"{scope}{actual}"
                env[actual] = _Known(name, result.type, result.data)

    def _walk_call(
        self,
        function: onnx.FunctionProto,
        operands: list[_Known | None],
        inner: str,
        given: Mapping[str, onnx.AttributeProto],
    ) -> _Template:
        """The body's values, named relative to the call, and what each formal output is."""
        local = {formal: k for formal, k in zip(function.input, operands, strict=False) if k is not None}
        references = {k.name: f"@{i}" for i, k in reversed(list(enumerate(operands))) if k is not None}

        def relative(name: str) -> str:
            return references.get(name) or "." + name.removeprefix(inner)

        start = len(self.values)
        self.body(function.node, local, inner, list(function.opset_import), given)
        template = [
            ValueShape(
                v.name.removeprefix(inner), v.op, v.dims, tuple(relative(n) for n in v.inputs), v.problem
            )
            for v in list(self.values.values())[start:]
        ]
        results = []
        for formal in function.output:
            known = local.get(formal)
            results.append((relative(known.name), known) if known is not None else ("", _Known("", None)))
        return template, results

    def node(
        self, node: onnx.NodeProto, env: dict[str, _Known], scope: str, opsets: list[onnx.OperatorSetIdProto]
    ) -> None:
        inputs = [env.get(name) if name else None for name in node.input]
        data = _fold(node, inputs)  # exact contents, hence exact types: no inference needed
        types: dict[str, onnx.TypeProto] = {}
        problem: str | None = None
        if data is None:
            unknown = [
                n for n, k in zip(node.input, inputs, strict=True) if n and (k is None or k.type is None)
            ]
            if unknown:
                problem = f"input {unknown[0]!r} has no known type"
            else:
                types, problem = _infer(node, env, opsets)
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        input_names = tuple(
            k.name if k is not None else n for n, k in zip(node.input, inputs, strict=True) if n
        )
        for index, output in enumerate(node.output):
            if not output:
                continue
            value = data[index] if data is not None else None
            known_type = types.get(output)
            if value is not None:
                known_type = helper.make_tensor_type_proto(
                    helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
                )
            name = f"{scope}{output}"
            known = env[output] = _Known(name, known_type, value)
            self.values[name] = ValueShape(name, op, known.dims, input_names, problem)


def _infer(
    node: onnx.NodeProto, env: dict[str, _Known], opsets: list[onnx.OperatorSetIdProto]
) -> tuple[dict[str, onnx.TypeProto], str | None]:
    """ONNX's shape inference for one node, with the known contents of its inputs."""
    versions = {entry.domain or "": entry.version for entry in opsets}
    domain = "" if node.domain == "ai.onnx" else node.domain
    schema = _schema(node.op_type, versions.get(domain, 0), domain)
    if schema is None:
        return {}, f"no ONNX schema and no local function for {node.domain or 'ai.onnx'}::{node.op_type}"
    types = {name: env[name].type for name in node.input if name}
    data = {name: env[name].tensor() for name in node.input if name and env[name].data is not None}
    try:
        inferred = onnx.shape_inference.infer_node_outputs(schema, node, types, data, opset_imports=opsets)  # type: ignore[arg-type]
    except Exception as exc:  # onnx raises InferenceError, ValidationError or RuntimeError here
        first = str(exc).strip().splitlines()
        return {}, f"ONNX shape inference fails: {first[0] if first else type(exc).__name__}"
    return inferred, None


@cache
def _schema(op_type: str, version: int, domain: str) -> onnx.defs.OpSchema | None:
    try:
        return onnx.defs.get_schema(op_type, max_inclusive_version=version, domain=domain)
    except onnx.defs.SchemaError:
        return None


def _fold(node: onnx.NodeProto, inputs: list[_Known | None]) -> list[Array] | None:
    """The outputs' contents when they follow from known shapes and constants, and are small."""
    if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        value = constant_value(node)
        return [value] if value is not None and value.size <= LARGEST_FOLDED else None
    if node.op_type in ("Shape", "Size") and node.domain in ("", "ai.onnx"):
        source = inputs[0]
        dims = source.dims if source is not None else None
        if dims is None or not all(isinstance(d, int) for d in dims):
            return None
        return [shape_of(node, [int(d) for d in dims])]  # type: ignore[arg-type]
    if any(
        known is None or known.data is None for name, known in zip(node.input, inputs, strict=True) if name
    ):
        return None
    arrays = [k.data if k is not None and k.data is not None else np.zeros(0, np.int64) for k in inputs]
    try:  # also where ONNX inference refused the node: QEfficient's CtxScatter feeds Range [1]-shaped bounds
        return evaluate(node, arrays, LARGEST_FOLDED)
    except (ValueError, TypeError, IndexError, ZeroDivisionError, KeyError, FloatingPointError):
        return None  # too large to fold, or invalid: left to shape inference alone


def _dims(value_type: onnx.TypeProto | None) -> Dims | None:
    if value_type is None or not value_type.HasField("tensor_type"):
        return None
    tensor_type = value_type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
    )


def _bind(value_type: onnx.TypeProto, dims: Mapping[str, int]) -> onnx.TypeProto:
    bound = onnx.TypeProto()
    bound.CopyFrom(value_type)
    if bound.HasField("tensor_type"):
        for dim in bound.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in dims:
                dim.dim_value = dims[dim.dim_param]
    return bound


def _initializer(tensor: onnx.TensorProto) -> _Known:
    value_type = helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))
    small = int(np.prod(tensor.dims)) <= LARGEST_FOLDED
    external = tensor.data_location == onnx.TensorProto.EXTERNAL
    return _Known(tensor.name, value_type, numpy_helper.to_array(tensor) if small and not external else None)


def _with_attributes(node: onnx.NodeProto, given: Mapping[str, onnx.AttributeProto]) -> onnx.NodeProto:
    """``node`` of a function body with its attribute references (``ref_attr_name``) resolved to
    the caller's attributes, or dropped where the caller gives none (the op's default applies)."""
    resolved = onnx.NodeProto()
    resolved.CopyFrom(node)
    del resolved.attribute[:]
    for attribute in node.attribute:
        if not attribute.ref_attr_name:
            resolved.attribute.append(attribute)
        elif attribute.ref_attr_name in given:
            value = onnx.AttributeProto()
            value.CopyFrom(given[attribute.ref_attr_name])
            value.name = attribute.name
            resolved.attribute.append(value)
    return resolved
