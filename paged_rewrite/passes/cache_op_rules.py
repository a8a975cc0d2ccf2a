"""What each QEfficient ``Ctx*`` op is, and which paged op replaces it when it moves KV.

A rule names the op it matches (domain ``com.qualcomm.cloud``, op type and operand count), where
its data, positions and other operands sit, the axis its positions index (what its function body
must show: see ``ctx_op_body``), and the paged op it emits with the operand order of that op.
Matching and emitting stand side by side, so adding a variant is adding a row.

A rule never decides alone that an op moves KV: the finder also checks the data operand (a rank-4
graph input returned as a retained state, written at token positions along axis 2). Ops whose
rule emits nothing (``emits=None``) move other data with the same machinery — MoE activations,
sampler penalty buffers — and are always left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

QEFF_DOMAIN = "com.qualcomm.cloud"
KV_POSITION_AXIS = 2  # [batch, kv_heads, ctx_len, head_dim]: positions index axis 2


@dataclass(frozen=True)
class CtxOpRule:
    """One Ctx op: its role, the input slots that matter, and what it becomes.

    ``emits_operands`` lists, in the paged op's input order, either the name of an input slot
    of the matched op (``"positions"``, ``"updates"``, ...) or one of the paged inputs
    ``"block_table"`` / ``"slot_id"`` / ``"slot_period"`` (a constant per cache, see the op's
    spec). Slots not listed (``batch_index``) stop addressing the cache: in the paged model the
    ``block_table`` row of a batch row identifies its sequence.
    """

    op_type: str
    role: str  # "write" or "read"
    slots: tuple[str, ...]  # the matched op's inputs, by position
    position_axis: int  # the data axis its positions index (its body must agree)
    emits: str | None  # None: the op never moves KV and is left alone
    emits_operands: tuple[str, ...] = ()

    def operand(self, name: str) -> int:
        return self.slots.index(name)

    @property
    def positions_slot(self) -> str:
        return "positions" if self.role == "write" else "ctx_indices"

    @property
    def may_move_kv(self) -> bool:
        return self.emits is not None and self.position_axis == KV_POSITION_AXIS


_WRITE = ("cache", "block_table", "slot_id", "positions", "updates", "slot_period")
_READ_CCL = ("cache", "block_table", "ctx_indices", "comp_ctx_len")
_READ = ("cache", "block_table", "ctx_indices")

RULES: tuple[CtxOpRule, ...] = (
    # KV cache writes
    CtxOpRule("CtxScatter", "write", ("cache", "positions", "updates"), 2, "PagedCtxScatter", _WRITE),
    CtxOpRule("CtxScatterCB", "write", ("cache", "batch_index", "positions", "updates"), 2, "PagedCtxScatter", _WRITE),
    # KV cache reads (with the CCL length operand, and the two-operand form of releases before CCL)
    CtxOpRule("CtxGather", "read", ("cache", "ctx_indices", "comp_ctx_len"), 2, "PagedCtxGather", _READ_CCL),
    CtxOpRule("CtxGather", "read", ("cache", "ctx_indices"), 2, "PagedCtxGatherPositions", _READ),
    CtxOpRule("CtxGatherCB", "read", ("cache", "batch_index", "ctx_indices", "comp_ctx_len"), 2, "PagedCtxGather", _READ_CCL),
    CtxOpRule("CtxGatherCB", "read", ("cache", "batch_index", "ctx_indices"), 2, "PagedCtxGatherPositions", _READ),
    CtxOpRule("CtxGatherBlockedKV", "read", ("cache", "ctx_indices"), 2, "PagedCtxGatherPositions", _READ),
    CtxOpRule("CtxGatherBlockedKVCB", "read", ("cache", "batch_index", "ctx_indices"), 2, "PagedCtxGatherPositions", _READ),
    # Never KV: rank-3 activations (MoE prefill) and [batch, vocab] sampler buffers, indexed on axis 1
    CtxOpRule("CtxScatter3D", "write", ("cache", "positions", "updates"), 1, None),
    CtxOpRule("CtxScatter3DInt", "write", ("cache", "positions", "updates"), 1, None),
    CtxOpRule("CtxScatterCB3D", "write", ("cache", "batch_index", "positions", "updates"), 1, None),
    CtxOpRule("CtxGather3D", "read", ("cache", "ctx_indices"), 1, None),
)  # fmt: skip

_BY_SIGNATURE = {(rule.op_type, len(rule.slots)): rule for rule in RULES}
_EMITTED = {rule.emits for rule in RULES if rule.emits}


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
