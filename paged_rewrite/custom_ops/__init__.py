"""The paged KV ops emitted into rewritten models (``paged_ops`` holds their sources and specs,
``emit`` turns them into the flat bodies a model ships)."""

from __future__ import annotations

from paged_rewrite.custom_ops.emit import (
    EMITTED_OPS,
    MAX_BODY_NODES,
    compiler_problems,
    paged_function_protos,
)
from paged_rewrite.custom_ops.paged_ops import PAGED_DOMAIN

__all__ = ["EMITTED_OPS", "MAX_BODY_NODES", "PAGED_DOMAIN", "compiler_problems", "paged_function_protos"]
