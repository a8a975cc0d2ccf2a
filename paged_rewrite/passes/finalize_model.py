"""Finish the model: drop what no longer feeds anything, and embed the paged ops as
model-local functions (callees first) so any runtime can execute them."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from paged_rewrite.custom_ops import PAGED_DOMAIN, paged_function_protos


def finalize_model(model: ir.Model, keep_inputs: set[str], layout: dict[str, str]) -> list[str]:
    """Embed the paged ops, record ``layout`` in the metadata, remove dead nodes, inputs and functions.

    Returns the names of the original graph inputs that no longer feed anything and were
    removed (``keep_inputs`` are never removed, used or not).
    """
    for proto in paged_function_protos():
        function = ir.serde.deserialize_function(proto)
        model.functions[function.identifier()] = function
    model.opset_imports.setdefault(PAGED_DOMAIN, 1)
    for function in model.functions.values():
        if any(node.domain == PAGED_DOMAIN for node in function):
            function.opset_imports.setdefault(PAGED_DOMAIN, 1)
    model.metadata_props.update(layout)
    RemoveUnusedNodesPass()(model)
    removed = [
        str(value.name) for value in model.graph.inputs if not value.uses() and value.name not in keep_inputs
    ]
    for name in removed:
        model.graph.inputs.remove(next(v for v in model.graph.inputs if v.name == name))
    RemoveUnusedFunctionsPass()(model)  # type: ignore[no-untyped-call]
    RemoveUnusedOpsetsPass()(model)
    return removed
