"""paged-rewrite: rewrite QEfficient contiguous-KV ONNX exports into paged-KV models.

The names below are imported on first use, not with the package: the command line imports the
package before anything else, and a Ctrl-C while onnx loads (the slowest part of start-up) must
reach its one-line handler (``_entry.py``, then each command's: ``cli._take_interrupts``) rather
than print a traceback.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_WHERE = {
    "__version__": ("paged_rewrite.api", "VERSION"),
    "rewrite": ("paged_rewrite.api", "rewrite"),
    "CacheReport": ("paged_rewrite.report", "CacheReport"),
    "RewriteReport": ("paged_rewrite.report", "RewriteReport"),
    "TensorSpec": ("paged_rewrite.report", "TensorSpec"),
    **{
        name: ("paged_rewrite.errors", name)
        for name in (
            "NoCacheError",
            "NotAModelError",
            "OutputError",
            "PagedRewriteError",
            "UnsupportedPatternError",
            "UsageError",
            "VerificationError",
        )
    },
}

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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'paged_rewrite' has no attribute {name!r}")
    module, attribute = _WHERE[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value
