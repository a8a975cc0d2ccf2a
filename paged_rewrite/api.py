"""The Python entry point: ``rewrite(input, output, kv_block_size=...)``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from paged_rewrite.errors import PagedRewriteError
from paged_rewrite.model_io import load_model, save_model
from paged_rewrite.pipeline import RewriteOptions, rewrite_model
from paged_rewrite.report import RewriteReport


def rewrite(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None,
    kv_block_size: int,
    ctx_len: int | None = None,
    num_blocks: int | None = None,
    dims: Mapping[str, int] | None = None,
    copy_weights: bool = False,
) -> RewriteReport:
    """Rewrite the QEfficient export at ``input_path`` into a paged-KV model at ``output_path``.

    ``dims`` binds symbolic dims of the input (``{"sliding_window": 32}``); ``ctx_len`` is
    shorthand for ``dims={"ctx_len": ...}``. The input file is only read. With ``output_path=None`` nothing is written (a dry run).
    Raises a ``PagedRewriteError`` subclass (with its exit code) on bad input.
    """
    model = load_model(input_path)
    try:
        report = rewrite_model(model, RewriteOptions(kv_block_size, ctx_len, num_blocks, dict(dims or {})))
    except PagedRewriteError as error:  # name the model in every refusal
        raise type(error)(f"{input_path}: {error}") from None
    report.input_path = str(input_path)
    if output_path is not None:
        report.output_path = str(save_model(model, output_path, Path(input_path), copy_weights))
    return report
