"""Context buckets: the ``block_table`` widths a paged model is compiled for and run at (and,
the same idea along the other axis, the prefill lengths: ``resolve_prefill_lengths``).

A paged model reads its cache through ``block_table``; where the graph takes its context length
from the cache shape (``Shape(past_key)``, rewired to ``PagedLogicalShape``), a table of ``n``
columns makes every layer attend over ``n * kv_block_size`` positions, not the whole context.
A runtime therefore passes, per step, the narrowest table that covers the longest row of the
batch. The QAIC compiler needs one specialization per width it will see, so the widths form a
short ladder of *buckets*, in tokens (the shape QEfficient users know from compute-context-length):
``num_kv_blocks = ceil(bucket / kv_block_size)`` for each.

Used on both sides: the rewrite writes the ladder into the specializations, the manifest and the
model's metadata; the runtime picks a bucket per step from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from paged_rewrite.errors import UsageError


def parse_buckets(text: str, flag: str = "--ctx-buckets") -> tuple[int, ...]:
    """``"512,1024,2048"`` -> ``(512, 1024, 2048)``; a usage error for anything else."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated token counts, e.g. 512,1024") from None
    if not values:
        raise UsageError(f"{flag} {text!r}: no value given")
    return values


def resolve_prefill_lengths(
    given: Sequence[int],
    seq_symbolic: bool,
    seq_bound: int | None,
    context_len: int | None,
    reads_cache: bool = True,
) -> tuple[int, ...]:
    """The prefill lengths of a rewrite (``--prefill-lengths``), ascending: the ``seq_len`` values a
    device is compiled for besides decode, one prefill specialization each per context bucket, so
    a runtime pads each prefill call to the shortest that holds its tokens (``Server``). They need
    ``seq_len`` symbolic in the model and not bound; none may exceed the context. A graph that
    never reads its cache (disaggregated prefill) attends within its chunk, and QEfficient ties
    that chunk to the cache length: its one prefill length is the context."""
    if any(isinstance(n, bool) or not isinstance(n, int) for n in given):
        raise UsageError(f"--prefill-lengths: expected token counts, got {list(given)}")
    lengths = tuple(sorted(set(given)))
    if not lengths:
        return ()
    if lengths[0] < 1:
        raise UsageError(f"--prefill-lengths: a length must be a positive token count, got {lengths[0]}")
    if seq_bound is not None:
        raise UsageError(
            f"--prefill-lengths: seq_len is bound to {seq_bound}, so the model has one prefill length"
        )
    if not seq_symbolic:
        raise UsageError("--prefill-lengths: the model has no symbolic seq_len to specialize")
    if context_len is not None and lengths[-1] > context_len:
        raise UsageError(f"--prefill-lengths {lengths[-1]} is longer than the context ({context_len} tokens)")
    if not reads_cache and lengths != (context_len,):
        raise UsageError(
            "--prefill-lengths: this graph never reads its cache (disaggregated prefill): it attends "
            "within its chunk, which QEfficient ties to the cache length, so its one prefill length is "
            f"the context ({context_len if context_len is not None else 'not known'})"
        )
    return lengths


def default_ladder(context_len: int, kv_block_size: int) -> tuple[int, ...]:
    """Powers of two blocks from one block up, then the whole context: ``bs, 2bs, 4bs, ...,
    context_len``. Doubling keeps the ladder short (log2 of the blocks) while a step never pays
    for more than twice the context it uses."""
    ladder = []
    bucket = kv_block_size
    while bucket < context_len:
        ladder.append(bucket)
        bucket *= 2
    return (*ladder, context_len)


def resolve_buckets(
    given: Sequence[int] | None, context_len: int | None, kv_block_size: int
) -> tuple[int, ...]:
    """The ladder of a rewrite, ascending, in tokens.

    ``given`` (``--ctx-buckets``) is validated: positive, at most ``context_len``, one table width
    per bucket. The context bounds the ladder and stays reachable: it is appended when the largest
    bucket is below it. Without ``given``, the default ladder when the context is known, else no
    buckets (the table width is left to the runtime).
    """
    if given is None:
        return default_ladder(context_len, kv_block_size) if context_len else ()
    buckets = sorted(set(given))
    if not buckets:
        raise UsageError("--ctx-buckets: no bucket given")
    if buckets[0] < 1:
        raise UsageError(f"--ctx-buckets: a bucket must be a positive token count, got {buckets[0]}")
    if context_len is not None:
        if buckets[-1] > context_len:
            raise UsageError(f"--ctx-buckets {buckets[-1]} is longer than the context ({context_len} tokens)")
        if buckets[-1] < context_len:
            buckets.append(context_len)
    widths = [columns_for(b, kv_block_size) for b in buckets]
    for smaller, larger, width, next_width in zip(buckets, buckets[1:], widths, widths[1:], strict=False):
        if width == next_width:
            raise UsageError(
                f"--ctx-buckets {smaller} and {larger} both need {width} blocks of {kv_block_size} tokens; "
                "give one of them"
            )
    return tuple(buckets)


def columns_for(tokens: int, kv_block_size: int) -> int:
    """Table columns that hold ``tokens`` positions."""
    return math.ceil(tokens / kv_block_size)


def pick_width(needed_tokens: int, widths: Sequence[int], kv_block_size: int) -> int:
    """The narrowest of ``widths`` (table columns) holding ``needed_tokens`` positions; the widest
    if none does (the caller decides whether that is an error)."""
    fitting = [w for w in widths if w * kv_block_size >= needed_tokens]
    return min(fitting) if fitting else max(widths)
