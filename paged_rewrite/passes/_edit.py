"""The one edit the rewrite passes share: a cache op becomes the paged op its rule emits."""

from __future__ import annotations

from paged_rewrite.custom_ops import PAGED_DOMAIN
from paged_rewrite.graph import become
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.cache_op_rules import rule_for
from paged_rewrite.passes.sites import Site


def replace_by_rule(site: Site, layout: PagedLayout, extra: dict[str, str] | None = None) -> None:
    """Turn a cache op into the paged op its rule emits, in place (name and outputs kept), with
    the operands in the paged op's order; ``extra`` supplies operands the matched op lacks."""
    node = site.node
    rule = rule_for(node.domain, node.op_type, len(node.input))
    assert rule is not None and rule.emits is not None, f"no cache-op rule for {node.op_type}"
    paged = {"block_table": layout.block_table, "slot_id": layout.slot_id, **(extra or {})}
    operands = [
        paged[name] if name in paged else node.input[rule.operand(name)] for name in rule.emits_operands
    ]
    layout.dropped.update(set(node.input) - set(operands))
    become(node, PAGED_DOMAIN, rule.emits, operands)
