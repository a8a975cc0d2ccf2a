"""The paged KV ops emitted into rewritten models (``paged_ops`` holds their onnxscript sources
and specs, ``emit`` builds the flat bodies a model ships, ``library`` loads them as shipped)."""

from __future__ import annotations

from paged_rewrite.custom_ops.library import (
    EMITTED_OPS,
    MAX_BODY_NODES,
    PAGED_DOMAIN,
    compiler_problems,
    paged_function_protos,
)

__all__ = ["EMITTED_OPS", "MAX_BODY_NODES", "PAGED_DOMAIN", "compiler_problems", "paged_function_protos"]
