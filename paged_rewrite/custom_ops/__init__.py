"""The paged KV ops emitted into rewritten models (see ``paged_ops`` for their specs)."""

from __future__ import annotations

from functools import cache

import onnx

from paged_rewrite.custom_ops.paged_ops import (
    PAGED_DOMAIN,
    PagedBlockAddress,
    PagedCtxGather,
    PagedCtxGatherPositions,
    PagedCtxScatter,
    PagedLogicalShape,
    PagedRowIndex,
    PagedWindowShape,
)

PAGED_OPS = (
    PagedBlockAddress,
    PagedRowIndex,
    PagedCtxScatter,
    PagedCtxGatherPositions,
    PagedCtxGather,
    PagedLogicalShape,
    PagedWindowShape,
)


def paged_function_protos() -> list[onnx.FunctionProto]:
    """Every paged op as a FunctionProto, callees before callers (fresh copies)."""
    protos = []
    for data in _serialized():
        proto = onnx.FunctionProto()
        proto.ParseFromString(data)
        protos.append(proto)
    return protos


@cache
def _serialized() -> tuple[bytes, ...]:
    # Translating the onnxscript functions is the slow part; do it once per process.
    return tuple(fn.to_function_proto().SerializeToString() for fn in PAGED_OPS)


__all__ = ["PAGED_DOMAIN", "PAGED_OPS", "paged_function_protos"]
