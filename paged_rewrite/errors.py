"""Errors the tool refuses with. Each class carries its own process exit code (see README)."""

from __future__ import annotations


class PagedRewriteError(Exception):
    """Base class: a one-line message and a distinct exit code per class of failure."""

    exit_code = 1
    kind = "error"


class InternalError(PagedRewriteError):
    """A bug of ours, caught in a named step of the rewrite (``internal error: in page_writes:
    KeyError: ...``): please report the line."""

    exit_code = 1
    kind = "internal error"


class UsageError(PagedRewriteError):
    """A flag or argument is invalid (block size 0, output equal to input, ...)."""

    exit_code = 2
    kind = "usage"


class NotAModelError(PagedRewriteError):
    """The input file is missing or is not an ONNX model."""

    exit_code = 3
    kind = "not_a_model"


class NoCacheError(PagedRewriteError):
    """The model is ONNX but has no QEfficient KV cache to page."""

    exit_code = 4
    kind = "no_cache"


class UnsupportedPatternError(PagedRewriteError):
    """The model has a cache, but in a form this tool does not know how to page."""

    exit_code = 5
    kind = "unsupported"


class OutputError(PagedRewriteError):
    """The output could not be written, or the written model failed the ONNX checker."""

    exit_code = 6
    kind = "io"


class VerificationError(PagedRewriteError):
    """``verify`` found a logit mismatch, a greedy-token mismatch, or an isolation breach."""

    exit_code = 7
    kind = "verification_failed"
