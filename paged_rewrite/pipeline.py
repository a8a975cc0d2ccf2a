"""The rewrite, top to bottom: find the cache, rewire everything that looked at its shape, page its
writes and reads, reshape its I/O, and finish the model. Each step is one file in ``passes/``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import onnx

from paged_rewrite.buckets import resolve_prefill_lengths
from paged_rewrite.domain import QEFF_DOMAIN
from paged_rewrite.errors import InternalError, NotAModelError, PagedRewriteError
from paged_rewrite.graph import undefined_ops
from paged_rewrite.passes.add_paged_inputs import add_paged_inputs
from paged_rewrite.passes.cache_op_rules import rule_for
from paged_rewrite.passes.finalize_model import finalize_model
from paged_rewrite.passes.find_cache_sites import find_cache_sites
from paged_rewrite.passes.page_reads import page_reads
from paged_rewrite.passes.page_writes import page_writes
from paged_rewrite.passes.reshape_cache_io import reshape_cache_io
from paged_rewrite.passes.rewire_logical_shape import rewire_logical_shape
from paged_rewrite.passes.shared_index import SharedIndex
from paged_rewrite.passes.sites import CacheSites, PagedLayout, PassResult
from paged_rewrite.report import CacheReport, LeftAloneReport, RewriteReport, TensorSpec

T = TypeVar("T")
# The shape of every pass between the layout and the finish: it edits the model through the sites
# (requesting shared index ops), and says what it changed and what the rewritten nodes stopped reading.
PagedPass = Callable[[CacheSites, PagedLayout, SharedIndex], PassResult]


@dataclass(frozen=True)
class RewriteOptions:
    """User choices: the page size, and optionally the context, its buckets (table widths in
    tokens; see ``buckets.py``) and the pool size."""

    kv_block_size: int
    ctx_len: int | None = None
    num_blocks: int | None = None
    dims: Mapping[str, int] = field(default_factory=dict)
    ctx_buckets: tuple[int, ...] | None = None
    shared_window_table: bool = False  # rings in the first columns of the one table (add_paged_inputs)
    prefill_lengths: tuple[int, ...] = ()  # seq_len values to specialize prefill for (buckets.py)


def rewrite_model(model: onnx.ModelProto, options: RewriteOptions) -> RewriteReport:
    """Rewrite ``model`` in place into a paged-KV model and report what was done."""
    undefined_before = undefined_ops(model)
    _refuse_undefined_qeff_ops(undefined_before)
    sites = run_pass(find_cache_sites, model)
    caches = [CacheReport.of(tensor) for tensor in sites.tensors]
    rewritten = _rewrite_plan(sites)

    layout = run_pass(
        add_paged_inputs,
        model,
        sites,
        options.kv_block_size,
        options.dims,
        options.num_blocks,
        options.ctx_len,
        options.ctx_buckets,
        options.shared_window_table,
    )
    prefill_lengths = resolve_prefill_lengths(
        options.prefill_lengths,
        any("seq_len" in v.shape for v in map(TensorSpec.of, model.graph.input)),
        layout.bound_dims.get("seq_len"),
        max(layout.ctx_buckets, default=None),
        reads_cache=bool(sites.reads),
    )
    shared = SharedIndex(sites, layout)  # the index ops the passes below request, each made once
    dropped: set[str] = set()  # what the rewritten nodes stopped reading: finalize_model tidies it
    paged_passes: tuple[PagedPass, ...] = (
        rewire_logical_shape,  # first: positions derive from the cache shape
        page_writes,
        page_reads,
        place_index_ops,
        reshape_cache_io,
    )
    for paged_pass in paged_passes:
        dropped |= run_pass(paged_pass, sites, layout, shared).dropped
    metadata = _layout_metadata(layout, sites, prefill_lengths)
    finalized = run_pass(finalize_model, sites, layout, dropped, metadata)
    dangling = sorted(undefined_ops(model) - undefined_before)
    if dangling:  # a bug of ours, caught before anything is written
        raise InternalError(
            f"the rewritten model calls {dangling[0][0]}::{dangling[0][1]}, which no function defines"
        )

    return RewriteReport(
        input_path="",
        output_path=None,
        kv_block_size=layout.kv_block_size,
        num_kv_blocks=layout.num_kv_blocks,
        total_num_kv_blocks=layout.total_num_kv_blocks,
        ctx_buckets=list(layout.ctx_buckets),
        prefill_lengths=list(prefill_lengths),
        caches=caches,
        rewritten=rewritten,
        functions=[body.name for body in sites.functions],
        windows={str(dim): ring for dim, ring in layout.windows.items()},
        added_inputs=[*layout.tables, layout.slot_id],
        kv_groups=_kv_groups(layout, sites),
        wrapping_caches=_wrapping_record(layout),
        removed_inputs=finalized.removed_inputs,
        kept_inputs=finalized.kept_inputs,
        paged_op_nodes=finalized.paged_op_nodes,
        left_alone=[LeftAloneReport(**vars(op)) for op in sites.left_alone],
        other_retained_states=_other_retained_states(model, sites),
        context_dim=layout.context_dim if isinstance(layout.context_dim, str) else None,
        bound_dims=dict(sorted(layout.bound_dims.items())),
        inputs=[TensorSpec.of(v) for v in model.graph.input],
        outputs=[TensorSpec.of(v) for v in model.graph.output],
        warnings=_warnings(rewritten, layout),
    )


def run_pass(step: Callable[..., T], *args: Any) -> T:
    """Run one step of the rewrite. Refusals pass through as they are; anything else is a bug of
    ours, reported with the step's name so that the one line a user sends says where it broke."""
    try:
        return step(*args)
    except PagedRewriteError:
        raise
    except Exception as exc:
        raise InternalError(f"in {step.__name__}: {type(exc).__name__}: {exc}") from exc


def place_index_ops(sites: CacheSites, layout: PagedLayout, shared: SharedIndex) -> PassResult:
    """Emit the index ops the passes requested, each before its first user (``shared_index``);
    the values of layer functions moved to the main graph are no longer read there."""
    shared.place()
    return PassResult(changed=shared.count, dropped=set(shared.dropped))


def _refuse_undefined_qeff_ops(undefined: set[tuple[str, str]]) -> None:
    """QEfficient's cache ops are model-local functions the QAIC compiler inlines (only
    CustomRMSNorm and CastToUInt4 are registered ops, in another domain); an input calling one
    it does not define cannot run anywhere, and passing it through would hide that."""
    missing = sorted(op for domain, op in undefined if domain == QEFF_DOMAIN)
    if missing:
        raise NotAModelError(f"calls {QEFF_DOMAIN}::{missing[0]}, which no model-local function defines")


def _rewrite_plan(sites: CacheSites) -> dict[str, int]:
    """``"CtxScatter -> PagedCtxScatter": n`` per op pair, counting nodes (a shared function body once)."""
    plan: Counter[str] = Counter()
    for site in [*sites.writes, *sites.reads]:
        rule = rule_for(site.node.domain, site.node.op_type, len(site.node.input))
        assert rule is not None
        plan[f"{site.node.op_type} -> {rule.emits}"] += 1
    plan["Shape(cache) -> logical shape"] += len(sites.shape_reads)
    return dict(sorted(plan.items()))


def _warnings(rewritten: Mapping[str, int], layout: PagedLayout) -> list[str]:
    """What is right but not what one might assume: a BlockedKV context the block size does not
    divide (below), and rings in full-length caches kept at full context (``_full_rings``)."""
    context = layout.context_dim if isinstance(layout.context_dim, int) else None
    if isinstance(layout.context_dim, str):
        context = layout.bound_dims.get(layout.context_dim)
    warnings = _full_rings(layout, context)
    blocked = any(plan.startswith("CtxGatherBlockedKV") for plan in rewritten)
    if not blocked or context is None or context % layout.kv_block_size == 0:
        return warnings
    # The context is read as num_kv_blocks * kv_block_size positions (the extra ones masked, so
    # logits are unchanged); but a BlockedKV export splits the context it reads into its KV blocks,
    # so the split moves and the sums are taken in another order.
    logical = -(-context // layout.kv_block_size) * layout.kv_block_size
    return [
        *warnings,
        f"BlockedKV export: the context of {context} tokens is not a multiple of --kv-block-size "
        f"{layout.kv_block_size}, so the paged model reads {logical} positions and its KV blocks split "
        f"them differently from the original: logits agree within float rounding, not bit for bit",
    ]


def _full_rings(layout: PagedLayout, context: int | None) -> list[str]:
    """Caches written as a ring in a full-length cache that keep full-context memory (no ring
    table; ``ring_writes.py``), and why, unless ``--shared-window-table`` asked for it."""
    if layout.shared_window_table:
        return []
    warnings = []
    for ring in sorted({w.ring for w in layout.wrapping_caches.values() if w.ring}):
        caches = [c for c, w in layout.wrapping_caches.items() if w.ring == ring]
        if context is not None and ring >= context:
            continue  # the context is no longer than the ring: nothing to save
        if ring % layout.kv_block_size:
            why = f"--kv-block-size {layout.kv_block_size} does not divide {ring}, and a ring table must end at slot {ring}"
        else:
            why = "a layer function serves other caches too, or a logical-position window has that length"
        warnings.append(
            f"{', '.join(caches)}: written as a ring of {ring} slots but kept at full-context memory ({why})"
        )
    return warnings


def _other_retained_states(model: onnx.ModelProto, sites: CacheSites) -> list[str]:
    """Inputs returned as ``<name>_RetainedState`` that are not paged caches (VLM vision embeds,
    sampler buffers): a runtime keeps feeding them back as the original wanted."""
    outputs = {v.name for v in model.graph.output}
    paged = {t.name for t in sites.tensors}
    return [v.name for v in model.graph.input if f"{v.name}_RetainedState" in outputs and v.name not in paged]


def _layout_metadata(
    layout: PagedLayout, sites: CacheSites, prefill_lengths: tuple[int, ...]
) -> dict[str, str]:
    """What a runtime needs to drive the paged model, stored in its metadata_props."""
    return {
        "paged_rewrite.kv_block_size": str(layout.kv_block_size),
        "paged_rewrite.num_kv_blocks": str(layout.num_kv_blocks),
        "paged_rewrite.null_block": "0",
        "paged_rewrite.ctx_buckets": json.dumps(list(layout.ctx_buckets)),
        "paged_rewrite.prefill_lengths": json.dumps(list(prefill_lengths)),
        "paged_rewrite.dims": json.dumps(layout.bound_dims, sort_keys=True),
        "paged_rewrite.windows": json.dumps({str(d): n for d, n in layout.windows.items()}, sort_keys=True),
        "paged_rewrite.wrapping_caches": json.dumps(_wrapping_record(layout), sort_keys=True),
        "paged_rewrite.groups": json.dumps(_kv_groups(layout, sites), sort_keys=True),
    }


def _wrapping_record(layout: PagedLayout) -> dict[str, dict[str, Any]]:
    """The caches of ``block_table`` written at ``p % C``: ``{"modulus": C, "ring": exactly}``."""
    return {
        cache: {"modulus": w.wraps_at, "ring": w.ring is not None}
        for cache, w in sorted(layout.wrapping_caches.items())
    }


def _kv_groups(layout: PagedLayout, sites: CacheSites) -> list[dict[str, Any]]:
    """Per table: its caches, width (null where symbolic), pool dim name (null where static) and
    size (null where symbolic), and ring length (null for full context) — what a runtime needs to
    keep one free list per group."""
    groups = []
    for group in layout.groups:
        caches = [t.name for t in sites.tensors if layout.group_of(t).table == group.table]
        groups.append(
            {
                "table": group.table,
                "num_kv_blocks": group.columns if isinstance(group.columns, int) else None,
                # one type per field: the pool's dim name (null when static) and its size (null
                # when symbolic), as for num_kv_blocks
                "pool_dim": group.pool_dim if isinstance(group.pool_dim, str) else None,
                "total_num_kv_blocks": group.pool_dim if isinstance(group.pool_dim, int) else None,
                "window": group.window,
                "window_addressing": group.addressing,
                "caches": caches,
            }
        )
    return groups
