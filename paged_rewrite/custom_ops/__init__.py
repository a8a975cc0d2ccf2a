"""The paged KV ops emitted into rewritten models (see ``paged_ops`` for their specs)."""

from __future__ import annotations

import onnx

from paged_rewrite.custom_ops.paged_ops import (
    PAGED_DOMAIN,
    PagedBlockAddress,
    PagedCtxGather,
    PagedCtxGatherPositions,
    PagedCtxScatter,
    PagedLogicalShape,
    PagedWindowShape,
)

PAGED_OPS = (
    PagedBlockAddress,
    PagedCtxScatter,
    PagedCtxGatherPositions,
    PagedCtxGather,
    PagedLogicalShape,
    PagedWindowShape,
)


def paged_function_protos() -> list[onnx.FunctionProto]:
    """Every paged op as a FunctionProto, callees before callers."""
    return [fn.to_function_proto() for fn in PAGED_OPS]


__all__ = ["PAGED_DOMAIN", "PAGED_OPS", "paged_function_protos"]
