"""The flags that shape a rewrite, shared by ``paged-rewrite rewrite`` and ``inspect`` (whose
plan must be the rewrite's, exit code included), and the parsers of their values. A value click
cannot parse is a ``click.BadParameter``, which the command line prints as one usage line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from paged_rewrite.buckets import parse_buckets
from paged_rewrite.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])


def plan_options(fn: F) -> F:
    """The flags that shape a rewrite, shared by ``rewrite`` and ``inspect`` (whose plan must be
    the rewrite's, exit code included). Each reaches the command as the keyword ``rewrite()`` takes
    (``api.PlanFlags``), so the commands pass them on as they are."""
    options = [
        click.option(
            "--ctx-len",
            type=click.IntRange(min=1),
            default=None,
            help="Context length: the largest context bucket (one bucket makes num_kv_blocks static).",
        ),
        click.option(
            "--ctx-buckets",
            callback=_token_counts("--ctx-buckets"),
            default=None,
            metavar="T1,T2,...",
            help="Context buckets in tokens (table widths a runtime may pass, one specialization each per "
            "phase); default: powers of two from one block up to the context, when it is known.",
        ),
        click.option(
            "--prefill-lengths",
            callback=_token_counts("--prefill-lengths"),
            default=None,
            metavar="S1,S2,...",
            help="Prefill lengths in tokens (seq_len), one prefill specialization each per context bucket, "
            "so a runtime pads each prefill call to the shortest that holds it; default: seq_len left open.",
        ),
        click.option(
            "--num-blocks",
            type=click.IntRange(min=2),
            default=None,
            help="Pool size incl. the null block; makes total_num_kv_blocks static.",
        ),
        click.option(
            "--dim",
            "dims",
            multiple=True,
            callback=_parse_dims,
            metavar="NAME=VALUE",
            help="Bind a symbolic dim of the input model (repeatable), e.g. --dim sliding_window=32.",
        ),
        click.option(
            "--specializations",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="QEfficient specializations.json: binds dims; the paged one is written beside the output.",
        ),
        click.option(
            "--shared-window-table",
            is_flag=True,
            help="Keep sliding-window rings (and Llama 4's chunked layers) in the first columns of the one "
            "block_table, and logical-position windows in it too (every pool full size), instead of a "
            "table and pool per window length.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _parse_dims(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().lstrip("-").isdigit():
            raise click.BadParameter(f"{item!r}: expected NAME=INTEGER, e.g. sliding_window=32")
        dims[name.strip()] = int(value)
    return dims


def _token_counts(
    flag: str,
) -> Callable[[click.Context, click.Parameter, str | None], tuple[int, ...] | None]:
    """The parser of a comma-separated list of token counts given to ``flag``."""

    def parse(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
        if value is None:
            return None
        try:
            return parse_buckets(value, flag)
        except UsageError as error:
            raise click.BadParameter(str(error)) from None

    return parse
