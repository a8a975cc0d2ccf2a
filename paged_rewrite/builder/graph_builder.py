"""The node-and-weight accumulator behind the QEfficient-style export builder."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import NodeProto, TensorProto, helper, numpy_helper


class GraphBuilder:
    """Accumulates main-graph nodes and initializers with torch-exporter-style names.

    Weights are random (``normal``) or ones (norms), drawn in a fixed order. With
    ``sparse_data`` set, the large weights are not materialized at all: each becomes an external
    tensor at the next 4 KiB-aligned offset of that data file, which the caller creates as a
    sparse file of ``external_bytes`` (all zeros, no disk blocks) — for scale tests of graphs
    whose weights would not fit in memory.
    """

    def __init__(self, rng: np.random.Generator, sparse_data: str | None = None) -> None:
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._counts: dict[tuple[str, str], int] = {}
        self._rng = rng
        self._sparse_data = sparse_data
        self.external_bytes = 0

    def op(
        self,
        op_type: str,
        inputs: list[str],
        scope: str,
        *,
        domain: str = "",
        output: str | None = None,
        **attrs: Any,
    ) -> str:
        """Append one single-output node named ``{scope}/{op_type}[_k]``; return its output."""
        k = self._counts.get((scope, op_type), 0)
        self._counts[(scope, op_type)] = k + 1
        name = f"{scope}/{op_type}" + (f"_{k}" if k else "")
        out = output if output is not None else f"{name}_output_0"
        node = helper.make_node(op_type, inputs, [out], name=name, domain=domain or None, **attrs)
        self.nodes.append(node)
        return out

    @contextmanager
    def capture(self) -> Iterator[list[NodeProto]]:
        """Nodes appended inside the block go to the yielded list instead of the main graph (a
        function body); weights still register on the builder, in the same order."""
        saved, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = saved

    def const(self, scope: str, value: npt.NDArray[Any]) -> str:
        """Append a ``Constant`` node holding ``value``; return its output."""
        return self.op("Constant", [], scope, value=numpy_helper.from_array(value))

    def ints(self, scope: str, *values: int) -> str:
        """1-D int64 ``Constant``."""
        return self.const(scope, np.array(values, dtype=np.int64))

    def weight(self, name: str, value: npt.NDArray[Any]) -> str:
        """Register an initializer; return its name."""
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def normal(self, name: str, *shape: int) -> str:
        """A ``N(0, 0.02)`` float32 weight (or a sparse external one)."""
        if self._sparse_data is not None:
            return self._external(name, shape)
        return self.weight(name, (self._rng.standard_normal(shape) * 0.02).astype(np.float32))

    def ones(self, name: str, size: int) -> str:
        """A float32 weight of ones (norm scales); external zeros in sparse mode."""
        if self._sparse_data is not None:
            return self._external(name, (size,))
        return self.weight(name, np.ones(size, np.float32))

    def _external(self, name: str, shape: tuple[int, ...]) -> str:
        assert self._sparse_data is not None
        length = 4 * int(np.prod(shape))
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", self._sparse_data),
            ("offset", self.external_bytes),
            ("length", length),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.external_bytes += -(-length // 4096) * 4096
        self.initializers.append(tensor)
        return name
