"""Recognise a Ctx op by what its body does, not by its name.

A QEfficient cache op is a model-local function. Before a call is rewritten, its definition must
do what the matched rule assumes: take the rule's operands, and perform one ``ScatterND`` (a
write) or ``GatherND`` (a read) on the data operand — returning the result, with the updates
operand as the scattered values — whose index tuples put the positions operand on the rule's
axis (axis 2 of ``[batch, heads, ctx_len, head_dim]`` for KV ops). The axis is read off the
body: ``batch_dims`` plus the number of index components, the positions being the last.
"""

from __future__ import annotations

import onnx

from paged_rewrite.passes.cache_op_rules import CtxOpRule

_STANDARD = ("", "ai.onnx")


def body_mismatch(rule: CtxOpRule, function: onnx.FunctionProto) -> str | None:
    """Why ``function`` does not perform ``rule``'s op, or None when it does."""
    if len(function.input) != len(rule.slots) or len(function.output) != 1:
        return (
            f"its definition takes {len(function.input)} inputs and {len(function.output)} outputs; "
            f"the rule expects ({', '.join(rule.slots)}) and one output"
        )
    core_op = "ScatterND" if rule.role == "write" else "GatherND"
    cores = [n for n in function.node if n.op_type == core_op and n.domain in _STANDARD]
    if len(cores) != 1:
        return f"its body has {len(cores)} {core_op} nodes; a {rule.role} op has exactly one"
    core = cores[0]
    formal = dict(zip(rule.slots, function.input, strict=True))
    if core.input[0] != formal["cache"]:
        return f"its {core_op} does not act on its data operand {formal['cache']!r}"
    if core.output[0] != function.output[0]:
        return f"it does not return the result of its {core_op}"
    if rule.role == "write" and core.input[2] != formal["updates"]:
        return f"its ScatterND does not write its updates operand {formal['updates']!r}"
    producers = {name: node for node in function.node for name in node.output}
    components = _index_components(core.input[1], producers)
    batch_dims = next((a.i for a in core.attribute if a.name == "batch_dims"), 0)
    axis = batch_dims + len(components) - 1
    if axis != rule.position_axis:
        return f"its {core_op} indexes axis {axis} with the positions; the rule expects axis {rule.position_axis}"
    positions = formal[rule.positions_slot]
    if positions not in _ancestors(components[-1], producers):
        return f"its positions operand {positions!r} does not index axis {axis}"
    return None


def _index_components(indices: str, producers: dict[str, onnx.NodeProto]) -> list[str]:
    """The per-axis parts of an index tensor: the inputs of the last-axis ``Concat`` that built it,
    or the tensor itself (one coordinate per tuple, e.g. ``Unsqueeze(ctx_indices, -1)``)."""
    node = producers.get(indices)
    if node is not None and node.op_type == "Concat" and node.domain in _STANDARD:
        return list(node.input)
    return [indices]


def _ancestors(name: str, producers: dict[str, onnx.NodeProto]) -> set[str]:
    seen: set[str] = set()
    frontier = [name]
    while frontier:
        current = frontier.pop()
        if current in seen:
            continue
        seen.add(current)
        node = producers.get(current)
        if node is not None:
            frontier.extend(node.input)
    return seen
