"""Decoder layers as model-local functions, as QEfficient's ``use_onnx_subfunctions`` export emits them.

Each kind of layer is one function, defined once from the first layer of that kind and called once
per layer (``/model/layers.{i}/QEffLlamaDecoderLayer``). The cache ops run inside it: the call
passes the layer's ``past_key.{i}`` / ``past_value.{i}`` in and gets the retained states back as
the function's first two outputs (``past_key.{i}_RetainedState``, ``past_value.{i}_RetainedState``
at the call, ``..._InternalRetainedState`` in the body), the layer's hidden state third. Its
inputs, in QEfficient's order, are those of the following the body uses: ``hidden_states``,
``cos_cached``, ``sin_cached``, ``past_key.{i}``, ``batch_index``, ``position_ids``,
``past_value.{i}``, ``attention_mask`` (the mask the prefix computes once), ``comp_ctx_lengths``
(CCL: each layer cuts the mask to its compute context itself), then the layer's
weights in the order the layer draws them. With a sliding window, the ring layer and the
full-context layers trace differently, so each has its own function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import onnx
from onnx import helper

from paged_rewrite.builder.functions import OPSET, QAIC_DOMAIN, QTI_DOMAIN
from paged_rewrite.builder.graph_builder import GraphBuilder
from paged_rewrite.builder.layers import Prefix
from paged_rewrite.builder.ring import RING_LAYER

if TYPE_CHECKING:
    from paged_rewrite.builder.qeff_export import ExportSpec

LAYER_DOMAIN = "QEfficient.transformers.models.llama.modeling_llama"
"""Domain of the layer functions (the module that defines the layer class, as torch names it)."""
LAYER_FUNCTION = "QEffLlamaDecoderLayer"
RING_LAYER_FUNCTION = "QEffLlamaSlidingDecoderLayer"

BuildLayer = Callable[[GraphBuilder, "ExportSpec", int, str, Prefix], str]


@dataclass(frozen=True)
class _Defined:
    function: onnx.FunctionProto
    used: list[int]  # positions in _operands() the body reads


def _operands(layer: int, weights: list[str]) -> list[str]:
    return [
        "hidden_states",
        "cos_cached",
        "sin_cached",
        f"past_key.{layer}",
        "batch_index",
        "position_ids",
        f"past_value.{layer}",
        "attention_mask",
        "comp_ctx_lengths",
        *weights,
    ]


def layers_as_functions(
    g: GraphBuilder, spec: ExportSpec, pre: Prefix, build_layer: BuildLayer
) -> tuple[str, list[onnx.FunctionProto]]:
    """Append one call per layer to ``g``; return the last layer's hidden state and the layer
    functions, in the order they are first called."""
    formal = replace(
        pre,
        hidden="hidden_states",
        cos="cos_cached",
        sin="sin_cached",
        mask=None if pre.mask is None else "attention_mask",
        window_mask=None if pre.window_mask is None else "attention_mask",
    )
    defined: dict[str, _Defined] = {}
    x = pre.hidden
    for layer in range(spec.num_layers):
        ring = bool(spec.sliding_window) and layer == RING_LAYER
        name = RING_LAYER_FUNCTION if ring else LAYER_FUNCTION
        first_weight = len(g.initializers)
        with g.capture() as body:  # every layer is built, so weights are drawn as without functions
            out = build_layer(g, spec, layer, "hidden_states", formal)
        operands = _operands(layer, [t.name for t in g.initializers[first_weight:]])
        if name not in defined:
            defined[name] = _define(name, layer, body, operands, out)
        actual = {
            "hidden_states": x,
            "cos_cached": pre.cos,
            "sin_cached": pre.sin,
            "attention_mask": (pre.window_mask if ring else pre.mask) or "",
        }
        inputs = [actual.get(operands[i], operands[i]) for i in defined[name].used]
        scope = f"/model/layers.{layer}/{name}"
        x = f"{scope}_output_2"
        outputs = [f"past_key.{layer}_RetainedState", f"past_value.{layer}_RetainedState", x]
        g.nodes.append(helper.make_node(name, inputs, outputs, name=scope, domain=LAYER_DOMAIN))
    return x, [d.function for d in defined.values()]


def _define(name: str, layer: int, body: list[onnx.NodeProto], operands: list[str], out: str) -> _Defined:
    """The function whose body is ``body`` (layer ``layer``'s nodes)."""
    internal = {
        f"past_{kind}.{layer}_RetainedState": f"past_{kind}.{layer}_InternalRetainedState"
        for kind in ("key", "value")
    }
    produced: set[str] = set()
    read: set[str] = set()
    for node in body:
        for names in (node.input, node.output):
            for k, value in enumerate(names):
                names[k] = internal.get(value, value)
        read.update(i for i in node.input if i and i not in produced)
        produced.update(node.output)
    used = [i for i, operand in enumerate(operands) if operand in read]
    missing = read - {operands[i] for i in used}
    assert not missing, f"layer {layer} reads {sorted(missing)}, which no function input provides"
    function = helper.make_function(
        LAYER_DOMAIN,
        name,
        [operands[i] for i in used],
        [*internal.values(), out],
        body,
        [helper.make_opsetid(d, v) for d, v in (("", OPSET), (QTI_DOMAIN, 1), (QAIC_DOMAIN, 1))],
    )
    return _Defined(function, used)
