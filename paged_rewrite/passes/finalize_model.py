"""Finish the model: embed the paged ops as model-local functions, record the layout in the
metadata, and drop what no longer feeds anything (inputs such as ``batch_index``, the replaced
ops' function definitions)."""

from __future__ import annotations

from typing import Any

import onnx

from paged_rewrite.custom_ops import PAGED_DOMAIN, paged_function_protos
from paged_rewrite.graph import used_names
from paged_rewrite.passes.add_paged_inputs import PagedLayout
from paged_rewrite.passes.cache_op_rules import rule_for
from paged_rewrite.passes.find_cache_sites import CacheSites, default_opset


def finalize_model(sites: CacheSites, layout: PagedLayout, metadata: dict[str, str]) -> list[str]:
    """Returns the names of the original graph inputs that no longer feed anything and were removed."""
    model = sites.model
    for body in sites.bodies:
        body.commit()
    _remove_unused_functions(model)
    opset = default_opset(model)
    for function in paged_function_protos():
        for entry in function.opset_import:  # bodies use ops unchanged from opset 13 on
            if entry.domain == "":
                entry.version = opset
        model.functions.append(function)
    _import_domain(model.opset_import)
    for function in model.functions:
        if any(node.domain == PAGED_DOMAIN for node in function.node):
            _import_domain(function.opset_import)
    for key, value in sorted(metadata.items()):
        entry = next((p for p in model.metadata_props if p.key == key), None)
        if entry is None:
            entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    # Only an input whose last reader was a replaced cache op (batch_index) can have become dead.
    candidates = layout.dropped & {v.name for v in model.graph.input}
    used = (
        used_names([model.graph, *model.functions]) | {o.name for o in model.graph.output}
        if candidates
        else set()
    )
    removed = [v.name for v in model.graph.input if v.name in candidates and v.name not in used]
    kept = [v for v in model.graph.input if v.name not in removed]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return removed


def _import_domain(imports: Any) -> None:  # a repeated OperatorSetIdProto field
    if not any(entry.domain == PAGED_DOMAIN for entry in imports):
        entry = imports.add()
        entry.domain, entry.version = PAGED_DOMAIN, 1


def _remove_unused_functions(model: onnx.ModelProto) -> None:
    """Drop the definitions of the replaced cache ops: every call to them was rewritten (the
    finder refuses a model with any other use), so none is called any more."""
    kept = [f for f in model.functions if rule_for(f.domain, f.name) is None]
    del model.functions[:]
    model.functions.extend(kept)
