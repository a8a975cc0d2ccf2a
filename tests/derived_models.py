"""Variants of real QEfficient exports that the corpora do not hold, each derived from one by a
small, documented edit: an older op form, a renamed dim, a mislabelled op body, an extra
per-sequence state addressed by ``batch_index``."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

QEFF = "com.qualcomm.cloud"
OPSET = [helper.make_opsetid("", 17)]


def pre_ccl_gather(source: Path, path: Path) -> Path:
    """``source`` with QEfficient's two-operand ``CtxGather(data, ctx_indices)`` of releases
    before compute-context-length: the call loses ``comp_ctx_len`` and the body reads as many
    positions as ``ctx_indices`` holds (what the three-operand form does when the length is the
    full context, as in every non-CCL export)."""
    model = onnx.load(source)
    for node in model.graph.node:
        if node.op_type == "CtxGather":
            del node.input[2:]
    body = [
        helper.make_node("Shape", ["data"], ["data_shape"]),
        helper.make_node("Constant", [], ["zero"], value_ints=[0]),
        helper.make_node("Constant", [], ["two"], value_ints=[2]),
        helper.make_node("Constant", [], ["three"], value_ints=[3]),
        helper.make_node("Slice", ["data_shape", "zero", "two"], ["batch_heads"]),
        helper.make_node("Shape", ["ctx_indices"], ["index_shape"]),
        helper.make_node("Slice", ["index_shape", "two", "three"], ["length"]),
        helper.make_node("Concat", ["batch_heads", "length"], ["target"], axis=0),
        helper.make_node("Expand", ["ctx_indices", "target"], ["expanded"]),
        helper.make_node("Constant", [], ["last"], value_ints=[-1]),
        helper.make_node("Unsqueeze", ["expanded", "last"], ["indices"]),
        helper.make_node("GatherND", ["data", "indices"], ["return_val"], batch_dims=2),
    ]
    gather = helper.make_function(QEFF, "CtxGather", ["data", "ctx_indices"], ["return_val"], body, OPSET)
    _replace_function(model, gather)
    onnx.save(model, path)
    return path


def scatter_on_heads(source: Path, path: Path) -> Path:
    """``source`` whose ``CtxScatter`` body writes positions on axis 1 (heads) instead of axis 2:
    named like the cache op, but not the op the rewrite knows."""
    model = onnx.load(source)
    function = next(f for f in model.functions if f.name == "CtxScatter")
    concat = next(n for n in function.node if n.op_type == "Concat" and n.output[0] == "indices")
    del concat.input[1]  # drop the head component: positions now index axis 1
    onnx.save(model, path)
    return path


def renamed_dim(source: Path, path: Path, old: str, new: str) -> Path:
    """``source`` with symbolic dim ``old`` renamed ``new`` on every graph input and output."""
    model = onnx.load(source)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = new
    onnx.save(model, path)
    return path


def cb_with_penalty_buffer(source: Path, path: Path, vocab: int = 256) -> Path:
    """A continuous-batching export (``source``) with one more retained state that is not KV: a
    sampler-style ``[full_batch_size, vocab]`` buffer written by ``CtxScatterCB3D(buffer,
    batch_index, input_ids, ones)`` — the shape QEfficient's on-device sampler adds — so
    ``batch_index`` keeps a reader after the KV ops are paged."""
    model = onnx.load(source)
    graph = model.graph
    graph.input.append(
        helper.make_tensor_value_info("past_seen_tokens", TensorProto.FLOAT, ["full_batch_size", vocab])
    )
    graph.output.append(
        helper.make_tensor_value_info(
            "past_seen_tokens_RetainedState", TensorProto.FLOAT, ["full_batch_size", vocab]
        )
    )
    graph.node.extend(
        [
            helper.make_node("Shape", ["input_ids"], ["/penalty/Shape_output_0"], name="/penalty/Shape"),
            helper.make_node(
                "ConstantOfShape",
                ["/penalty/Shape_output_0"],
                ["/penalty/ones"],
                name="/penalty/ConstantOfShape",
                value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
            ),
            helper.make_node(
                "CtxScatterCB3D",
                ["past_seen_tokens", "batch_index", "input_ids", "/penalty/ones"],
                ["past_seen_tokens_RetainedState"],
                name="/penalty/CtxScatterCB3D",
                domain=QEFF,
            ),
        ]
    )
    body = [
        helper.make_node("Shape", ["batch_index"], ["batch_shape"]),
        helper.make_node("Constant", [], ["zero"], value_ints=[0]),
        helper.make_node("Gather", ["batch_shape", "zero"], ["batch_size"]),
        helper.make_node("Shape", ["position_ids"], ["position_shape"]),
        helper.make_node("Constant", [], ["one"], value_ints=[1]),
        helper.make_node("Gather", ["position_shape", "one"], ["seq_len"]),
        helper.make_node("Concat", ["batch_size", "seq_len", "one"], ["exp_shape"], axis=0),
        helper.make_node("Constant", [], ["two"], value_ints=[2]),
        helper.make_node("Unsqueeze", ["batch_index", "two"], ["batch_column"]),
        helper.make_node("Expand", ["batch_column", "exp_shape"], ["batch_idx"]),
        helper.make_node("Unsqueeze", ["position_ids", "two"], ["position_column"]),
        helper.make_node("Expand", ["position_column", "exp_shape"], ["ctx_idx"]),
        helper.make_node("Concat", ["batch_idx", "ctx_idx"], ["indices"], axis=2),
        helper.make_node("ScatterND", ["data", "indices", "updates"], ["return_val"]),
    ]
    model.functions.append(
        helper.make_function(
            QEFF,
            "CtxScatterCB3D",
            ["data", "batch_index", "position_ids", "updates"],
            ["return_val"],
            body,
            OPSET,
        )
    )
    onnx.save(model, path)
    return path


def _replace_function(model: onnx.ModelProto, function: onnx.FunctionProto) -> None:
    kept = [f for f in model.functions if (f.domain, f.name) != (function.domain, function.name)]
    del model.functions[:]
    model.functions.extend([*kept, function])


def cb_with_adapter_gather(source: Path, path: Path) -> Path:
    """A continuous-batching export (``source``) that also gathers rows of a stacked adapter
    weight with ``CtxGatherCB(weights, lora_ids, indices, length)``, as QEfficient's LoRA does
    next to the KV gathers: the definition must stay (a parameter of it is named
    ``batch_index``), while the graph's ``batch_index`` no longer feeds anything once paged."""
    model = onnx.load(source)
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("lora_ids", TensorProto.INT64, ["batch_size", 1]))
    graph.initializer.extend(
        [
            helper.make_tensor("adapter_weights", TensorProto.FLOAT, [3, 1, 4, 8], [0.5] * 96),
            helper.make_tensor("adapter_rows", TensorProto.INT64, [1, 1, 4], [0, 1, 2, 3]),
            helper.make_tensor("adapter_length", TensorProto.INT64, [], [4]),
        ]
    )
    graph.node.append(
        helper.make_node(
            "CtxGatherCB",
            ["adapter_weights", "lora_ids", "adapter_rows", "adapter_length"],
            ["adapter"],
            name="/lora/CtxGatherCB",
            domain=QEFF,
        )
    )
    graph.output.append(helper.make_tensor_value_info("adapter", TensorProto.FLOAT, ["batch_size", 1, 4, 8]))
    onnx.save(model, path)
    return path


def with_lora_ids(source: Path, path: Path) -> Path:
    """An export (``source``) whose rows each pick an adapter by ``lora_ids`` int64 ``[batch_size,
    1]`` (a ``Gather`` of stacked adapter weights, an extra output): QEfficient's LoRA input, on a
    graph onnxruntime runs (its own ``CtxGatherCB`` on adapter weights does not load there)."""
    model = onnx.load(source)
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("lora_ids", TensorProto.INT64, ["batch_size", 1]))
    graph.initializer.append(helper.make_tensor("adapter_weights", TensorProto.FLOAT, [3, 4], [0.5] * 12))
    graph.node.append(
        helper.make_node("Gather", ["adapter_weights", "lora_ids"], ["adapter"], name="/lora/Gather")
    )
    graph.output.append(helper.make_tensor_value_info("adapter", TensorProto.FLOAT, ["batch_size", 1, 4]))
    onnx.save(model, path)
    return path


def without_function(source: Path, path: Path, name: str) -> Path:
    """``source`` with the model-local function ``name`` deleted (its calls stay)."""
    model = onnx.load(source)
    kept = [f for f in model.functions if f.name != name]
    del model.functions[:]
    model.functions.extend(kept)
    onnx.save(model, path)
    return path


def read_positions_through_split(source: Path, path: Path) -> Path:
    """``source`` (a subfunction export) whose layer reads its cache at output 1 of
    ``Split(Concat(ctx_indices * 0, ctx_indices))``: the same positions, from the second output
    of a two-output node, so a rewrite that moves the computation out of the layer must take
    that output, not the first (which is all zeros)."""
    model = onnx.load(source)
    layer = next(f for f in model.functions if any(n.op_type == "CtxGather" for n in f.node))
    gathers = [n for n in layer.node if n.op_type == "CtxGather"]
    positions = gathers[0].input[1]
    assert all(n.input[1] == positions for n in gathers)
    added = [
        helper.make_node(
            "Constant", [], ["split.zero"], value=helper.make_tensor("z", TensorProto.INT64, [], [0])
        ),
        helper.make_node("Mul", [positions, "split.zero"], ["split.zeros"]),
        helper.make_node("Concat", ["split.zeros", positions], ["split.both"], axis=-1),
        helper.make_node("Split", ["split.both"], ["split.first", "split.second"], axis=-1),  # halves
    ]
    first = list(layer.node).index(gathers[0])
    nodes = [*layer.node[:first], *added, *layer.node[first:]]
    for node in gathers:
        node.input[1] = "split.second"
    del layer.node[:]
    layer.node.extend(nodes)
    onnx.save(model, path)
    return path


def positions_renamed_for_one_call(source: Path, path: Path) -> Path:
    """``source`` (a subfunction export) whose second layer call gets ``position_ids`` through an
    ``Identity``: the same values under another name, so the calls no longer feed the layer's
    positions input from one main-graph value."""
    model = onnx.load(source)
    layers = {(f.domain, f.name) for f in model.functions if any(n.op_type == "CtxScatter" for n in f.node)}
    calls = [n for n in model.graph.node if (n.domain, n.op_type) in layers]
    assert len(calls) >= 2
    renamed = helper.make_node(
        "Identity", ["position_ids"], ["position_ids.renamed"], name="position_ids.renamed"
    )
    calls[1].input[list(calls[1].input).index("position_ids")] = "position_ids.renamed"
    nodes = list(model.graph.node)
    nodes.insert(nodes.index(calls[1]), renamed)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, path)
    return path


def read_before_write(source: Path, path: Path, cache: str) -> Path:
    """``source`` whose read of ``cache`` takes the cache input as given instead of the output of
    the cache's write: the layer attends over the cache as it was before the call (the current
    token's own K or V not yet there). QEfficient never exports this; a paged read of a pool that
    no write of the call produced must still return zeros for invalid positions."""
    model = onnx.load(source)
    written = {
        n.output[0] for n in model.graph.node if n.op_type.startswith("CtxScatter") and n.input[0] == cache
    }
    reads = [n for n in model.graph.node if n.op_type.startswith("CtxGather") and n.input[0] in written]
    assert len(reads) == 1, f"{source}: expected one read of {cache}'s write"
    reads[0].input[0] = cache
    onnx.save(model, path)
    return path


def writes_in_a_function(source: Path, path: Path, layers: list[int]) -> Path:
    """``source`` with the two cache writes (``CtxScatter`` of ``past_key.{i}`` and
    ``past_value.{i}``) of each layer ``i`` in ``layers`` moved into one model-local function,
    ``ChunkWrites(past_key, past_value, positions, key, value)``, called once per layer with that
    layer's operands: a layer body shared by several layers, as in a subfunction export. The
    layer's ``Shape`` of its written key cache moves in too (a third output); the reads stay in the
    main graph."""
    model = onnx.load(source)
    body = [
        helper.make_node("CtxScatter", ["past_key", "positions", "key"], ["key_out"], domain=QEFF),
        helper.make_node("CtxScatter", ["past_value", "positions", "value"], ["value_out"], domain=QEFF),
        helper.make_node("Shape", ["key_out"], ["key_shape"]),
    ]
    imports = [helper.make_opsetid("", 17), helper.make_opsetid(QEFF, 1)]
    inputs = ["past_key", "past_value", "positions", "key", "value"]
    outputs = ["key_out", "value_out", "key_shape"]
    model.functions.append(helper.make_function("derived", "ChunkWrites", inputs, outputs, body, imports))
    model.opset_import.append(helper.make_opsetid("derived", 1))
    nodes = list(model.graph.node)
    for layer in layers:
        key = next(n for n in nodes if n.op_type == "CtxScatter" and n.input[0] == f"past_key.{layer}")
        value = next(n for n in nodes if n.op_type == "CtxScatter" and n.input[0] == f"past_value.{layer}")
        shape = next(n for n in nodes if n.op_type == "Shape" and n.input[0] == key.output[0])
        assert key.input[1] == value.input[1]
        call = helper.make_node(
            "ChunkWrites",
            [key.input[0], value.input[0], key.input[1], key.input[2], value.input[2]],
            [key.output[0], value.output[0], shape.output[0]],
            name=f"/model/layers.{layer}/ChunkWrites",
            domain="derived",
        )
        nodes[nodes.index(key)] = call
        nodes.remove(value)
        nodes.remove(shape)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, path)
    return path


def chunk_writes_bounded(source: Path, path: Path, bound: int = 64) -> Path:
    """``source`` (Llama 4) whose chunked layers write ``p % 32`` only below position ``bound``
    and ``p`` itself from there on: ``Where(Not(Equal(p, -1)) and p < bound, Mod(p, 32), p)``. Not
    a ring: positions past ``bound`` land past the first 32 slots."""
    model = onnx.load(source)
    nodes = list(model.graph.node)
    producers = {out: n for n in nodes for out in n.output}
    scatters = [n for n in nodes if n.op_type == "CtxScatter"]
    writes = {
        producers[n.input[1]].output[0]: producers[n.input[1]] for n in scatters if n.input[1] in producers
    }
    for where in writes.values():  # the global layer writes at position_ids itself
        bound_value = helper.make_node(
            "Constant",
            [],
            [f"{where.name}.bound"],
            value=helper.make_tensor("b", TensorProto.INT64, [], [bound]),
        )
        below = helper.make_node("Less", ["position_ids", f"{where.name}.bound"], [f"{where.name}.below"])
        both = helper.make_node("And", [where.input[0], f"{where.name}.below"], [f"{where.name}.both"])
        nodes[nodes.index(where) : nodes.index(where)] = [bound_value, below, both]
        where.input[0] = f"{where.name}.both"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, path)
    return path


def chunk_writes_reshaped(source: Path, path: Path) -> Path:
    """``source`` (Llama 4) whose chunked layers' write positions pass through an ``Unsqueeze``
    and a ``Squeeze`` after the ``Where``: the same values, in a form the strict ring structure
    does not accept, so the caches stay in ``block_table``, wrapping."""
    model = onnx.load(source)
    nodes = list(model.graph.node)
    producers = {out: n for n in nodes for out in n.output}
    for scatter in [n for n in nodes if n.op_type == "CtxScatter" and n.input[1] in producers]:
        positions = scatter.input[1]
        axes = helper.make_node(
            "Constant", [], [f"{positions}.axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [0])
        )
        up = helper.make_node("Unsqueeze", [positions, f"{positions}.axes"], [f"{positions}.up"])
        down = helper.make_node("Squeeze", [f"{positions}.up", f"{positions}.axes"], [f"{positions}.down"])
        if f"{positions}.down" not in producers:
            nodes[nodes.index(scatter) : nodes.index(scatter)] = [axes, up, down]
            producers[f"{positions}.down"] = down
        scatter.input[1] = f"{positions}.down"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, path)
    return path


def chunk_writes_without_padding_test(source: Path, path: Path) -> Path:
    """``source`` (Llama 4) whose chunked layers write at ``Mod(p, 32)`` itself, the padding
    ``Where`` bypassed: padding ``-1`` then writes slot ``-1 % 32 = 31``, as the original does."""
    model = onnx.load(source)
    producers = {out: n for n in model.graph.node for out in n.output}
    for scatter in [n for n in model.graph.node if n.op_type == "CtxScatter" and n.input[1] in producers]:
        where = producers[scatter.input[1]]
        mod = next(producers[x] for x in where.input[1:] if x in producers and producers[x].op_type == "Mod")
        scatter.input[1] = mod.output[0]
    onnx.save(model, path)
    return path


def layer_writes_at_positions(source: Path, path: Path, layer: int) -> Path:
    """``source`` whose layer ``layer`` writes its K and V at ``position_ids`` itself (a Llama 4
    chunked layer made to write like a global one; it still reads as before): a model whose first
    layer is not a ring while later ones are."""
    model = onnx.load(source)
    for node in model.graph.node:
        if node.op_type == "CtxScatter" and node.input[0] in (f"past_key.{layer}", f"past_value.{layer}"):
            node.input[1] = "position_ids"
    onnx.save(model, path)
    return path
