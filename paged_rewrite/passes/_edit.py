"""The one edit the rewrite passes share: a cache op becomes the two paged ops its rule emits,
its index op (shared with every cache of the same operands, see ``shared_index``) and its data op
(in place of the matched node: name and outputs kept)."""

from __future__ import annotations

from collections.abc import Mapping

from paged_rewrite.custom_ops import PAGED_DOMAIN
from paged_rewrite.graph import become
from paged_rewrite.passes.cache_op_rules import rule_for
from paged_rewrite.passes.shared_index import POOL, Operand, SharedIndex
from paged_rewrite.passes.sites import PagedLayout, Site


def replace_by_rule(
    site: Site, layout: PagedLayout, shared: SharedIndex, constants: Mapping[str, int] | None = None
) -> set[str]:
    """Request the site's index op and turn the node into its data op; ``constants`` supplies
    index operands the matched op lacks (``slot_period``). Returns the operands the node no
    longer reads."""
    node = site.node
    rule = rule_for(node.domain, node.op_type, len(node.input))
    assert rule is not None and rule.index is not None and rule.emits is not None, (
        f"no rule for {node.op_type}"
    )
    assert site.cache is not None
    table = layout.group_of(site.cache).table  # the group's own table: see shared_index
    paged: dict[str, Operand] = {"cache": POOL, "block_table": table, "slot_id": layout.slot_id}
    paged.update(constants or {})
    index_operands = [
        paged[name] if name in paged else node.input[rule.operand(name)] for name in rule.index.operands
    ]
    outputs = shared.request(site, rule.index.op_type, index_operands, rule.index.outputs)
    computed = dict(zip(rule.index.outputs, outputs, strict=True))
    operands = [
        computed[name] if name in computed else node.input[rule.operand(name)] for name in rule.emits_operands
    ]
    dropped = set(node.input) - set(operands)
    become(node, PAGED_DOMAIN, rule.emits, operands)
    return dropped
