"""Values compared by what computes them: the key ``shared_index`` gives an index op's operands,
so that every layer's recomputed read positions (equal expressions under different names) share
one index op. Deterministic standard ops, a few producers deep; small initializers by value."""

from __future__ import annotations

import onnx

from paged_rewrite.graph import Body

_EXPRESSION_DEPTH = 32  # producers followed when comparing operands; deeper values compare by name
_NONDETERMINISTIC = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Dropout",
        "Bernoulli",
    }
)
_SMALL_CONSTANT = 64  # initializers of at most this many elements compare by value


class ExpressionKeys:
    """What a value of one body computes, as a small int: equal ints, equal values (see the
    module doc). Built lazily, while the passes edit the body in place: a ``Shape`` the rewire
    turned into an ``Identity`` of the shared logical shape is read as that. So the pipeline
    rewires the shapes before any position is keyed; the later edits (cache ops becoming paged
    ops, which are never comparable) can only make values compare unequal, never equal."""

    def __init__(self, body: Body) -> None:
        self._body = body.proto
        self._producers = body.producers()
        self._constants: dict[str, onnx.TensorProto] = {}
        self._initializers_seen = 0
        self._ids: dict[object, int] = {}
        self._keys: dict[tuple[str, int], int] = {}

    def key(self, name: str, depth: int = 0) -> int:
        memo = self._keys.get((name, depth))
        if memo is not None:
            return memo
        node = self._producers.get(name)
        constant = self._constant(name) if node is None else None
        expression: object
        if constant is not None:
            expression = ("constant", _tensor_bytes(constant))
        elif node is None or depth >= _EXPRESSION_DEPTH or not comparable(node):
            expression = ("value", name)
        elif node.op_type == "Identity":
            self._keys[(name, depth)] = self.key(node.input[0], depth + 1)
            return self._keys[(name, depth)]
        else:
            attributes = tuple(_attribute_bytes(a) for a in sorted(node.attribute, key=lambda a: a.name))
            inputs = tuple(self.key(i, depth + 1) if i else -1 for i in node.input)
            expression = (node.domain, node.op_type, attributes, inputs, list(node.output).index(name))
        identity = self._ids.setdefault(expression, len(self._ids))
        self._keys[(name, depth)] = identity
        return identity

    def _constant(self, name: str) -> onnx.TensorProto | None:
        """A small initializer (main graph only), by name; initializers added by the passes too."""
        if not isinstance(self._body, onnx.GraphProto):
            return None
        if name not in self._constants and self._initializers_seen < len(self._body.initializer):
            self._initializers_seen = len(self._body.initializer)  # the passes add some
            inputs = {value.name for value in self._body.input}  # an input may override one
            self._constants = {t.name: t for t in self._body.initializer if t.name not in inputs}
        tensor = self._constants.get(name)
        if (
            tensor is None
            or tensor.data_location == onnx.TensorProto.EXTERNAL
            or _size(tensor) > _SMALL_CONSTANT
        ):
            return None
        return tensor


def comparable(node: onnx.NodeProto) -> bool:
    """A standard op that computes the same from the same inputs, with no subgraph."""
    return (
        node.domain in ("", "ai.onnx")
        and node.op_type not in _NONDETERMINISTIC
        and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)
    )


def _size(tensor: onnx.TensorProto) -> int:
    size = 1
    for dim in tensor.dims:
        size *= dim
    return size


def _tensor_bytes(tensor: onnx.TensorProto) -> bytes:
    anonymous = onnx.TensorProto()
    anonymous.CopyFrom(tensor)
    anonymous.ClearField("name")
    data: bytes = anonymous.SerializeToString(deterministic=True)
    return data


def _attribute_bytes(attribute: onnx.AttributeProto) -> bytes:
    if attribute.type == onnx.AttributeProto.TENSOR:
        anonymous = onnx.AttributeProto()
        anonymous.CopyFrom(attribute)
        anonymous.t.ClearField("name")  # a constant's tensor name says nothing about its value
        attribute = anonymous
    data: bytes = attribute.SerializeToString(deterministic=True)
    return data
