"""The parts of the generated decoder that every export kind shares: embeddings, rope, norms, the
MLP and the logits head. Attention, where the kinds differ, is in ``attention.py``.

Weights are drawn from the builder's generator in a fixed order that does not depend on the
export kind, so two exports of one seed (a prefill-only graph and its decode graph, say) hold
the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from paged_rewrite.builder import ring
from paged_rewrite.builder.functions import QTI_DOMAIN
from paged_rewrite.builder.graph_builder import GraphBuilder

if TYPE_CHECKING:
    from paged_rewrite.builder.qeff_export import ExportSpec

_ROPE_THETA = 10000.0


def _rope_tables(spec: ExportSpec) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """cos/sin tables ``[max_position, head_dim]`` (theta 10000, rotate_half layout)."""
    inv_freq = 1.0 / (_ROPE_THETA ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim))
    freqs = np.outer(np.arange(spec.max_position, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


@dataclass(frozen=True)
class Prefix:
    """What the layers take from the model's prefix: the embedded tokens, rope cos/sin
    ``[B, 1, S, D]``, the attention mask ``[B, 1, S, keys]`` (True = hidden) when the full-context
    layers share one (None: each layer builds its own), and the ring layer's window mask."""

    hidden: str
    cos: str
    sin: str
    mask: str | None
    window_mask: str | None = None


def embeddings_and_rope(g: GraphBuilder, spec: ExportSpec) -> Prefix:
    """Token embeddings, rope cos/sin gathered by position, and the shared attention mask."""
    emb = g.normal("model.embed_tokens.weight", spec.vocab_size, spec.hidden_size)
    hidden = g.op("Gather", [emb, "input_ids"], "/model/embed_tokens")
    cos_t, sin_t = _rope_tables(spec)
    cos_w = g.weight("model.cos_cached", cos_t)
    sin_w = g.weight("model.sin_cached", sin_t)

    s = "/model"
    mask: str | None = None
    window: str | None = None
    if spec.prefill_only:
        mask = _chunk_causal_mask(g, s)
        if spec.sliding_window:
            window = ring.chunk_window_mask(g, mask, s)
    else:
        if not spec.blocked_kv_num_blocks:  # BlockedKV layers mask the positions their blocks cover
            full = f"past_key.{ring.RING_LAYER + 1}" if spec.sliding_window else "past_key.0"
            ctx = g.op("Gather", [g.op("Shape", [full], s), g.const(s, np.array(2, np.int64))], s, axis=0)
            slots = g.op(
                "Range", [g.const(s, np.array(0, np.int64)), ctx, g.const(s, np.array(1, np.int64))], s
            )
            mask = causal_mask(g, g.op("Reshape", [slots, g.ints(s, 1, 1, -1)], s), s)
        if spec.sliding_window:
            window = ring.window_mask(g, s)
    cos = g.op("Unsqueeze", [g.op("Gather", [cos_w, "position_ids"], s, axis=0), g.ints(s, 1)], s)
    sin = g.op("Unsqueeze", [g.op("Gather", [sin_w, "position_ids"], s, axis=0), g.ints(s, 1)], s)
    return Prefix(hidden=hidden, cos=cos, sin=sin, mask=mask, window_mask=window)


def causal_mask(g: GraphBuilder, slots: str, scope: str) -> str:
    """``[B, 1, S, C]``: cache slot ``slots[0, 0, c]`` lies after query ``position_ids[b, s]``."""
    query_pos = g.op("Unsqueeze", ["position_ids", g.ints(scope, -1)], scope)
    mask = g.op("Greater", [slots, query_pos], scope)
    return g.op("Unsqueeze", [mask, g.ints(scope, 1)], scope)


def _chunk_causal_mask(g: GraphBuilder, scope: str) -> str:
    """``[B, 1, S, S]`` over the chunk's own tokens: key ``k`` is hidden from query ``q`` if it comes
    later (``pos[k] > pos[q]``) or, for a real query, if it is padding (``pos[k] < 0``). A padding
    query sees only the padding keys, so its row stays finite (no all-masked softmax, no NaN in
    the K/V it writes)."""
    query_pos = g.op("Unsqueeze", ["position_ids", g.ints(scope, -1)], scope)  # [B, S, 1]
    key_pos = g.op("Unsqueeze", ["position_ids", g.ints(scope, 1)], scope)  # [B, 1, S]
    later = g.op("Greater", [key_pos, query_pos], scope)
    zero = g.const(scope, np.array(0, np.int64))
    padding_key = g.op("Less", [key_pos, zero], scope)
    real_query = g.op("GreaterOrEqual", [query_pos, zero], scope)
    hidden = g.op("Or", [later, g.op("And", [padding_key, real_query], scope)], scope)
    return g.op("Unsqueeze", [hidden, g.ints(scope, 1)], scope)


def rms_norm(g: GraphBuilder, spec: ExportSpec, x: str, scope: str) -> str:
    """``CustomRMSNorm``; ones weight named after ``scope`` (``/model/norm`` -> ``model.norm.weight``)."""
    w = g.ones(scope[1:].replace("/", ".") + ".weight", spec.hidden_size)
    return g.op("CustomRMSNorm", [x, w], scope, domain=QTI_DOMAIN, epsilon=float(spec.rms_eps))


def apply_rope(g: GraphBuilder, spec: ExportSpec, x: str, pre: Prefix, scope: str) -> str:
    """``x * cos + rotate_half(x) * sin`` for ``x`` in ``[B, heads, S, D]``."""
    half = spec.head_dim // 2
    axis = g.ints(scope, 3)
    x1 = g.op("Slice", [x, g.ints(scope, 0), g.ints(scope, half), axis], scope)
    x2 = g.op("Slice", [x, g.ints(scope, half), g.ints(scope, spec.head_dim), axis], scope)
    rotated = g.op("Concat", [g.op("Neg", [x2], scope), x1], scope, axis=-1)
    return g.op("Add", [g.op("Mul", [x, pre.cos], scope), g.op("Mul", [rotated, pre.sin], scope)], scope)


def repeat_kv(g: GraphBuilder, spec: ExportSpec, x: str, scope: str) -> str:
    """``[B, kv_heads, C, D]`` -> ``[B, heads, C, D]`` (each KV head repeated consecutively)."""
    n_rep = spec.num_heads // spec.num_kv_heads
    if n_rep == 1:
        return x
    x = g.op("Unsqueeze", [x, g.ints(scope, 2)], scope)
    x = g.op("Expand", [x, g.ints(scope, 1, 1, n_rep, 1, 1)], scope)
    return g.op("Reshape", [x, g.ints(scope, 0, spec.num_heads, -1, spec.head_dim)], scope)


def mlp(g: GraphBuilder, spec: ExportSpec, layer: int, x: str) -> str:
    """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))``."""
    s = f"/model/layers.{layer}/mlp"
    w = f"model.layers.{layer}.mlp"
    wg = g.normal(f"{w}.gate_proj.weight", spec.hidden_size, spec.intermediate_size)
    wu = g.normal(f"{w}.up_proj.weight", spec.hidden_size, spec.intermediate_size)
    wd = g.normal(f"{w}.down_proj.weight", spec.intermediate_size, spec.hidden_size)
    gate = g.op("MatMul", [x, wg], f"{s}/gate_proj")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{s}/act_fn")], f"{s}/act_fn")
    up = g.op("MatMul", [x, wu], f"{s}/up_proj")
    return g.op("MatMul", [g.op("Mul", [act, up], s), wd], f"{s}/down_proj")


def final_norm_and_head(g: GraphBuilder, spec: ExportSpec, x: str) -> str:
    """Final norm, pick the hidden state at ``argmax(position_ids)`` per row (TLM: the ``n`` states
    ending there), lm_head -> ``logits``."""
    x = rms_norm(g, spec, x, "/model/norm")
    lm_head = g.normal("lm_head.weight", spec.hidden_size, spec.vocab_size)
    s = ""
    last = g.op("ArgMax", ["position_ids"], s, axis=1, keepdims=1)
    if spec.num_logits_to_keep:
        last = _kept_positions(g, last, s)
    last = g.op("Unsqueeze", [last, g.ints(s, -1)], s)
    x = g.op("GatherND", [x, last], s, batch_dims=1)
    return g.op("MatMul", [x, lm_head], "/lm_head", output="logits")


def _kept_positions(g: GraphBuilder, last: str, s: str) -> str:
    """TLM: ``[B, n]`` indices ``first .. first + n - 1`` into the sequence axis, ``n`` the length of
    ``num_logits_to_keep`` and ``first = last + 1 - n`` (0 where that is negative), ``last``
    ``[B, 1]`` being each row's ``argmax(position_ids)``; as QEfficient's TLM export picks them."""
    zero, one = g.const(s, np.array(0, np.int64)), g.const(s, np.array(1, np.int64))
    keep = g.op("Gather", [g.op("Shape", ["num_logits_to_keep"], s), zero], s, axis=0)
    first = g.op("Sub", [g.op("Add", [last, one], s), keep], s)
    first = g.op("Where", [g.op("Less", [last, keep], s), zero, first], s)
    offsets = g.op("Reshape", [g.op("Range", [zero, keep, one], s), g.ints(s, 1, -1)], s)
    return g.op("Add", [first, offsets], s)
