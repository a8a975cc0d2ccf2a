"""paged-rewrite: rewrite QEfficient contiguous-KV ONNX exports into paged-KV models."""

from paged_rewrite.api import VERSION as __version__
from paged_rewrite.api import rewrite
from paged_rewrite.errors import (
    NoCacheError,
    NotAModelError,
    OutputError,
    PagedRewriteError,
    UnsupportedPatternError,
    UsageError,
    VerificationError,
)
from paged_rewrite.report import CacheReport, RewriteReport, TensorSpec

__all__ = [
    "CacheReport",
    "NoCacheError",
    "NotAModelError",
    "OutputError",
    "PagedRewriteError",
    "RewriteReport",
    "TensorSpec",
    "UnsupportedPatternError",
    "UsageError",
    "VerificationError",
    "__version__",
    "rewrite",
]
