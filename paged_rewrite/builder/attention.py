"""Self-attention of one layer, in each export kind QEfficient emits.

* decode (the default): write the chunk's K/V with ``CtxScatter``, read the whole context back
  with one ``CtxGather``, attend with the causal mask;
* BlockedKV (``blocked_kv_num_blocks = n``): the same write, the context read in ``n`` blocks of
  ``ceil(ctx_len / n)`` positions, one ``CtxGatherBlockedKV`` per block and per K/V, the blocks
  concatenated along the context axis before the usual attention;
* prefill-only: the same write, no read at all; attention over the chunk's fresh K/V;
* continuous batching: the ``*CB`` form of each op, addressing cache row ``batch_index[b]``;
  positions of padding tokens are written at the INT32_MAX sentinel, as QEfficient's CB
  exports do;
* sliding window: layer 0 is a ring buffer (``ring.py``), read whole with its window's mask,
  whatever the other layers do;
* compute-context-length (``ccl``): as QEfficient's CCL export, each full-context layer slices
  the shared mask to its first ``L = len(comp_ctx_lengths)`` slots, and the read covers those
  slots only: ``comp_ctx_len``, the gather's last operand, is the sliced mask's length
  ``min(L, ctx_len)``; the write is unchanged;
* subfunctions: the same nodes, in a layer function (``subfunctions.py``); as QEfficient's
  ``InvalidIndexProvider`` does there, whole-context reads use index 0, not INT32_MAX, for slots
  not written yet (BlockedKV reads and CB writes keep INT32_MAX).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from paged_rewrite.builder.functions import QAIC_DOMAIN
from paged_rewrite.builder.graph_builder import GraphBuilder
from paged_rewrite.builder.layers import Prefix, apply_rope, causal_mask, repeat_kv
from paged_rewrite.builder.ring import RING_LAYER, ring_positions

if TYPE_CHECKING:
    from paged_rewrite.builder.qeff_export import ExportSpec

INT32_MAX_SENTINEL = 2147483647
"""Value of the scalar int64 ``Constant`` that marks an index as "don't care": invalid read
indices, and (continuous batching) the write position of padding tokens."""


def attention(g: GraphBuilder, spec: ExportSpec, layer: int, x: str, pre: Prefix) -> str:
    """Self-attention of one layer; writes ``past_{key,value}.{layer}_RetainedState`` and returns
    the o_proj output."""
    s = f"/model/layers.{layer}/self_attn"
    w = f"model.layers.{layer}.self_attn"
    h, kvh, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    wq = g.normal(f"{w}.q_proj.weight", spec.hidden_size, h * d)
    wk = g.normal(f"{w}.k_proj.weight", spec.hidden_size, kvh * d)
    wv = g.normal(f"{w}.v_proj.weight", spec.hidden_size, kvh * d)
    wo = g.normal(f"{w}.o_proj.weight", h * d, spec.hidden_size)

    def heads(proj: str, weight: str, n: int) -> str:
        y = g.op("MatMul", [x, weight], f"{s}/{proj}")
        y = g.op("Reshape", [y, g.ints(s, 0, 0, n, d)], s)
        return g.op("Transpose", [y], s, perm=[0, 2, 1, 3])

    q = apply_rope(g, spec, heads("q_proj", wq, h), pre, s)
    k = apply_rope(g, spec, heads("k_proj", wk, kvh), pre, s)
    v = heads("v_proj", wv, kvh)
    ring = bool(spec.sliding_window) and layer == RING_LAYER
    shared_mask = pre.window_mask if ring else pre.mask
    read_len: str | None = None
    if spec.ccl and not ring:
        assert shared_mask is not None
        shared_mask, read_len = _compute_context(g, shared_mask, s)
    k_cache, v_cache = _write_cache(g, spec, layer, k, v, s, ring)

    if spec.prefill_only:
        assert shared_mask is not None
        k_all, v_all, mask = k, v, shared_mask
    elif spec.blocked_kv_num_blocks and not ring:
        k_all, v_all, mask = _read_blocked(g, spec, k_cache, v_cache, s)
    else:
        assert shared_mask is not None
        k_all, v_all, mask = *_read_contiguous(g, spec, k_cache, v_cache, s, read_len), shared_mask

    k_all = repeat_kv(g, spec, k_all, s)
    v_all = repeat_kv(g, spec, v_all, s)
    scores = g.op("MatMul", [q, g.op("Transpose", [k_all], s, perm=[0, 1, 3, 2])], s)
    scores = g.op("Mul", [scores, g.const(s, np.array(1.0 / math.sqrt(d), np.float32))], s)
    scores = g.op("Where", [mask, g.const(s, np.array(-np.inf, np.float32)), scores], s)
    probs = g.op("Softmax", [scores], s, axis=-1)
    out = g.op("Transpose", [g.op("MatMul", [probs, v_all], s)], s, perm=[0, 2, 1, 3])
    out = g.op("Reshape", [out, g.ints(s, 0, 0, h * d)], s)
    return g.op("MatMul", [out, wo], f"{s}/o_proj")


def _write_cache(
    g: GraphBuilder, spec: ExportSpec, layer: int, k: str, v: str, s: str, ring: bool
) -> tuple[str, str]:
    """``CtxScatter`` (``CtxScatterCB``) of the chunk's K and V; returns the retained states."""
    positions = ring_positions(g, s) if ring else "position_ids"
    if spec.continuous_batching:
        padding = g.op("Less", [positions, g.const(s, np.array(0, np.int64))], s)
        sentinel = g.const(s, np.array(INT32_MAX_SENTINEL, np.int64))
        positions = g.op("Where", [padding, sentinel, positions], s)

    def scatter(past: str, new: str) -> str:
        out = f"{past}.{layer}_RetainedState"
        if spec.continuous_batching:
            operands = [f"{past}.{layer}", "batch_index", positions, new]
            return g.op("CtxScatterCB", operands, s, domain=QAIC_DOMAIN, output=out)
        return g.op("CtxScatter", [f"{past}.{layer}", positions, new], s, domain=QAIC_DOMAIN, output=out)

    return scatter("past_key", k), scatter("past_value", v)


def _max_position(g: GraphBuilder, s: str) -> str:
    """``[B, 1, 1]``: the last position each row holds after this call."""
    max_pos = g.op("ReduceMax", ["position_ids"], s, axes=[1], keepdims=1)
    return g.op("Unsqueeze", [max_pos, g.ints(s, 2)], s)


def _compute_context(g: GraphBuilder, mask: str, s: str) -> tuple[str, str]:
    """CCL: ``mask`` ``[B, 1, S, ctx_len]`` cut to its first ``L = len(comp_ctx_lengths)`` slots,
    and its length ``min(L, ctx_len)``, the number of slots the layer reads."""
    length = g.op(
        "Gather", [g.op("Shape", ["comp_ctx_lengths"], s), g.const(s, np.array(0, np.int64))], s, axis=0
    )
    end = g.op("Unsqueeze", [length, g.ints(s, 0)], s)
    mask = g.op("Slice", [mask, g.ints(s, 0), end, g.ints(s, 3)], s)
    read_len = g.op("Gather", [g.op("Shape", [mask], s), g.const(s, np.array(3, np.int64))], s, axis=0)
    return mask, read_len


def _read_contiguous(
    g: GraphBuilder, spec: ExportSpec, k_cache: str, v_cache: str, s: str, read_len: str | None = None
) -> tuple[str, str]:
    """The whole context ``[B, kv_heads, ctx_len, D]`` (a ring: ``[B, kv_heads, W, D]``; with CCL
    its first ``read_len`` slots) with one ``CtxGather`` (``CtxGatherCB``) per K/V, ``comp_ctx_len``
    being that length; slots beyond the row's last position are read at the invalid index and V
    is zeroed there."""
    ctx_len = read_len or g.op(
        "Gather", [g.op("Shape", [k_cache], s), g.const(s, np.array(2, np.int64))], s, axis=0
    )
    slots = g.op("Range", [g.const(s, np.array(0, np.int64)), ctx_len, g.const(s, np.array(1, np.int64))], s)
    slots = g.op("Reshape", [slots, g.ints(s, 1, 1, -1)], s)
    invalid = g.op("Greater", [slots, _max_position(g, s)], s)
    sentinel = g.const(s, np.array(0 if spec.subfunctions else INT32_MAX_SENTINEL, np.int64))
    ctx_indices = g.op("Where", [invalid, sentinel, slots], s)
    if spec.continuous_batching:
        k_all = g.op("CtxGatherCB", [k_cache, "batch_index", ctx_indices, ctx_len], s, domain=QAIC_DOMAIN)
        v_all = g.op("CtxGatherCB", [v_cache, "batch_index", ctx_indices, ctx_len], s, domain=QAIC_DOMAIN)
    else:
        k_all = g.op("CtxGather", [k_cache, ctx_indices, ctx_len], s, domain=QAIC_DOMAIN)
        v_all = g.op("CtxGather", [v_cache, ctx_indices, ctx_len], s, domain=QAIC_DOMAIN)
    return k_all, _zero_invalid(g, v_all, invalid, s)


def _zero_invalid(g: GraphBuilder, v_all: str, invalid: str, s: str) -> str:
    """V at invalid slots is whatever the sentinel read; a select (not a product) keeps it out."""
    invalid_v = g.op("Unsqueeze", [invalid, g.ints(s, -1)], s)
    return g.op("Where", [invalid_v, g.const(s, np.array(0.0, np.float32)), v_all], s)


def _read_blocked(
    g: GraphBuilder, spec: ExportSpec, k_cache: str, v_cache: str, s: str
) -> tuple[str, str, str]:
    """The context read block by block, as QEfficient's BlockedKV does; returns K and V
    ``[B, kv_heads, n * block_len, D]`` and their causal mask ``[B, 1, S, n * block_len]``.

    ``block_len = ceil(ctx_len / n)`` is computed in-graph from the cache shape, so the number of
    reads is static while ``ctx_len`` stays symbolic. Positions of the last block past ``ctx_len``
    lie after every row's last position: they are read at the sentinel and masked.
    """
    n = spec.blocked_kv_num_blocks
    cache_shape = g.op("Shape", [k_cache], s)
    ctx_len = g.op("Gather", [cache_shape, g.const(s, np.array(2, np.int64))], s, axis=0)
    rounded_up = g.op("Add", [ctx_len, g.const(s, np.array(n - 1, np.int64))], s)
    block_len = g.op("Div", [rounded_up, g.const(s, np.array(n, np.int64))], s)
    max_pos = _max_position(g, s)
    sentinel = g.const(s, np.array(INT32_MAX_SENTINEL, np.int64))
    per_head = ""  # CB bodies broadcast the indices over heads themselves
    if not spec.continuous_batching:  # GatherND with batch_dims=2 wants indices [B, kv_heads, L]
        batch_1d = g.op("Slice", [cache_shape, g.ints(s, 0), g.ints(s, 1)], s)
        block_1d = g.op("Reshape", [block_len, g.ints(s, 1)], s)
        per_head = g.op("Concat", [batch_1d, g.ints(s, spec.num_kv_heads), block_1d], s, axis=0)

    block_slots: list[str] = []
    block_invalid: list[str] = []
    keys: list[str] = []
    values: list[str] = []
    for j in range(n):
        start = g.op("Mul", [block_len, g.const(s, np.array(j, np.int64))], s)
        end = g.op("Add", [start, block_len], s)
        slots = g.op("Range", [start, end, g.const(s, np.array(1, np.int64))], s)
        slots = g.op("Reshape", [slots, g.ints(s, 1, 1, -1)], s)
        invalid = g.op("Greater", [slots, max_pos], s)
        ctx_indices = g.op("Where", [invalid, sentinel, slots], s)  # [B, 1, L]
        for cache, out in ((k_cache, keys), (v_cache, values)):
            if spec.continuous_batching:
                operands = [cache, "batch_index", ctx_indices]
                out.append(g.op("CtxGatherBlockedKVCB", operands, s, domain=QAIC_DOMAIN))
            else:
                operands = [cache, g.op("Expand", [ctx_indices, per_head], s)]
                out.append(g.op("CtxGatherBlockedKV", operands, s, domain=QAIC_DOMAIN))
        block_slots.append(slots)
        block_invalid.append(invalid)

    k_all = g.op("Concat", keys, s, axis=2)
    v_all = g.op("Concat", values, s, axis=2)
    invalid = g.op("Concat", block_invalid, s, axis=2)
    mask = causal_mask(g, g.op("Concat", block_slots, s, axis=2), s)
    return k_all, _zero_invalid(g, v_all, invalid, s), mask
