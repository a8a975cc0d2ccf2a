"""What each QEfficient cache op is, and which paged op replaces it.

A rule names the op it matches (domain ``com.qualcomm.cloud``), where its cache, positions and
other operands sit, and the paged op it emits with the operand order of that op. Matching and
emitting stand side by side, so adding a variant is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass

QEFF_DOMAIN = "com.qualcomm.cloud"


@dataclass(frozen=True)
class CacheOpRule:
    """One cache op: its role, the input slots that matter, and what it becomes.

    ``emits_operands`` lists, in the paged op's input order, either the name of an input slot
    of the matched op (``"positions"``, ``"updates"``, ...) or one of the paged inputs
    ``"block_table"`` / ``"slot_id"`` / ``"slot_period"`` (a constant per cache, see the op's spec). Slots not listed (``batch_index``) stop addressing the
    cache: in the paged model the ``block_table`` row of a batch row identifies its sequence.
    """

    op_type: str
    role: str  # "write" or "read"
    slots: tuple[str, ...]  # the matched op's inputs, by position
    emits: str
    emits_operands: tuple[str, ...]

    def operand(self, name: str) -> int:
        return self.slots.index(name)


RULES: dict[str, CacheOpRule] = {
    rule.op_type: rule
    for rule in (
        CacheOpRule("CtxScatter", "write", ("cache", "positions", "updates"),
                    "PagedCtxScatter", ("cache", "block_table", "slot_id", "positions", "updates", "slot_period")),
        CacheOpRule("CtxScatterCB", "write", ("cache", "batch_index", "positions", "updates"),
                    "PagedCtxScatter", ("cache", "block_table", "slot_id", "positions", "updates", "slot_period")),
        CacheOpRule("CtxGather", "read", ("cache", "ctx_indices", "comp_ctx_len"),
                    "PagedCtxGather", ("cache", "block_table", "ctx_indices", "comp_ctx_len")),
        CacheOpRule("CtxGatherCB", "read", ("cache", "batch_index", "ctx_indices", "comp_ctx_len"),
                    "PagedCtxGather", ("cache", "block_table", "ctx_indices", "comp_ctx_len")),
        CacheOpRule("CtxGatherBlockedKV", "read", ("cache", "ctx_indices"),
                    "PagedCtxGatherPositions", ("cache", "block_table", "ctx_indices")),
    )
}  # fmt: skip


def rule_for(domain: str, op_type: str) -> CacheOpRule | None:
    """The rule of a node's op, or None when it is not a known cache op."""
    return RULES.get(op_type) if domain == QEFF_DOMAIN else None


def is_cache_op_like(domain: str, op_type: str) -> bool:
    """A QEfficient-domain op that looks like a cache op (``Ctx*``), known or not."""
    return domain == QEFF_DOMAIN and op_type.startswith("Ctx")
