"""What each QEfficient ``Ctx*`` op is, and which paged op replaces it when it moves KV.

A rule names the op it matches (domain ``com.qualcomm.cloud``, op type and operand count), where
its data, positions and other operands sit, the axis its positions index (what its function body
must show: see ``ctx_op_body``), and the two paged ops it emits: the index op that computes its
addresses (shared by every cache with the same operands) and the data op that moves its bytes.
Matching and emitting stand side by side, so adding a variant is adding a row.

A rule never decides alone that an op moves KV: the finder also checks the data operand (a rank-4
graph input returned as a retained state, written at token positions along axis 2). Ops whose
rule emits nothing (``emits=None``) move other data with the same machinery — MoE activations,
sampler penalty buffers — and are always left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from paged_rewrite.domain import QEFF_DOMAIN

KV_POSITION_AXIS = 2  # [batch, kv_heads, ctx_len, head_dim]: positions index axis 2


@dataclass(frozen=True)
class IndexOp:
    """The paged op that computes a cache op's addresses, once per call for every cache whose
    operands are the same (``shared_index``): its operands, by the name of an input slot of the
    matched op or a paged input (``"block_table"``, ``"slot_id"``, ``"slot_period"``: a constant
    per cache), and the values it returns to the data op."""

    op_type: str
    operands: tuple[str, ...]
    outputs: tuple[str, ...]


WRITE_INDEX = IndexOp(
    "PagedWriteIndex",
    ("cache", "block_table", "slot_id", "positions", "slot_period"),
    ("write_index", "zeros"),
)
_READ_OUTPUTS = ("rows", "row_shape")
READ_INDEX = IndexOp("PagedReadIndex", ("cache", "block_table", "ctx_indices"), _READ_OUTPUTS)
READ_INDEX_CCL = IndexOp(
    "PagedReadIndexCCL", ("cache", "block_table", "ctx_indices", "comp_ctx_len"), _READ_OUTPUTS
)


@dataclass(frozen=True)
class CtxOpRule:
    """One Ctx op: its role, the input slots that matter, and what it becomes.

    A KV op becomes two: its addresses (``index``, shared between caches) and a data op
    (``emits``) per cache, whose ``emits_operands`` name, in its input order, an input slot of
    the matched op or an output of the index op. Slots not listed (``batch_index``) stop
    addressing the cache: in the paged model the ``block_table`` row of a batch row identifies
    its sequence.
    """

    op_type: str
    role: str  # "write" or "read"
    slots: tuple[str, ...]  # the matched op's inputs, by position
    position_axis: int  # the data axis its positions index (its body must agree)
    index: IndexOp | None  # None: the op never moves KV and is left alone
    emits: str | None = None
    emits_operands: tuple[str, ...] = ()

    def operand(self, name: str) -> int:
        return self.slots.index(name)

    @property
    def positions_slot(self) -> str:
        return "positions" if self.role == "write" else "ctx_indices"

    @property
    def may_move_kv(self) -> bool:
        return self.emits is not None and self.position_axis == KV_POSITION_AXIS


_SCATTER = ("PagedCtxScatter", ("cache", "write_index", "updates", "zeros"))
_GATHER = ("PagedCtxGather", ("cache", *_READ_OUTPUTS))

RULES: tuple[CtxOpRule, ...] = (
    # KV cache writes
    CtxOpRule("CtxScatter", "write", ("cache", "positions", "updates"), 2, WRITE_INDEX, *_SCATTER),
    CtxOpRule("CtxScatterCB", "write", ("cache", "batch_index", "positions", "updates"), 2, WRITE_INDEX, *_SCATTER),
    # KV cache reads (with the CCL length operand, and the two-operand form of releases before CCL)
    CtxOpRule("CtxGather", "read", ("cache", "ctx_indices", "comp_ctx_len"), 2, READ_INDEX_CCL, *_GATHER),
    CtxOpRule("CtxGather", "read", ("cache", "ctx_indices"), 2, READ_INDEX, *_GATHER),
    CtxOpRule("CtxGatherCB", "read", ("cache", "batch_index", "ctx_indices", "comp_ctx_len"), 2, READ_INDEX_CCL, *_GATHER),
    CtxOpRule("CtxGatherCB", "read", ("cache", "batch_index", "ctx_indices"), 2, READ_INDEX, *_GATHER),
    CtxOpRule("CtxGatherBlockedKV", "read", ("cache", "ctx_indices"), 2, READ_INDEX, *_GATHER),
    CtxOpRule("CtxGatherBlockedKVCB", "read", ("cache", "batch_index", "ctx_indices"), 2, READ_INDEX, *_GATHER),
    # Never KV: rank-3 activations (MoE prefill) and [batch, vocab] sampler buffers, indexed on axis 1
    CtxOpRule("CtxScatter3D", "write", ("cache", "positions", "updates"), 1, None),
    CtxOpRule("CtxScatter3DInt", "write", ("cache", "positions", "updates"), 1, None),
    CtxOpRule("CtxScatterCB3D", "write", ("cache", "batch_index", "positions", "updates"), 1, None),
    CtxOpRule("CtxGather3D", "read", ("cache", "ctx_indices"), 1, None),
)  # fmt: skip

_BY_SIGNATURE = {(rule.op_type, len(rule.slots)): rule for rule in RULES}
_EMITTED = {op for rule in RULES if rule.emits and rule.index for op in (rule.index.op_type, rule.emits)}


def rule_for(domain: str, op_type: str, num_inputs: int) -> CtxOpRule | None:
    """The rule of an op called with ``num_inputs`` operands, or None when none matches."""
    return _BY_SIGNATURE.get((op_type, num_inputs)) if domain == QEFF_DOMAIN else None


def is_ctx_op(domain: str, op_type: str) -> bool:
    """A QEfficient-domain op that looks like a cache op (``Ctx*``), known or not."""
    return domain == QEFF_DOMAIN and op_type.startswith("Ctx")


def known_arities(op_type: str) -> list[int]:
    """The operand counts the rules know for ``op_type`` (empty for an unknown op)."""
    return sorted(len(rule.slots) for rule in RULES if rule.op_type == op_type)


def emitted_ops() -> set[str]:
    return set(_EMITTED)
