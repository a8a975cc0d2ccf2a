"""How much graph does paging add? Node counts of every corpus export after inlining every
model-local function (what the QAIC compiler lowers), original against paged.

    python benchmarks/node_counts.py [--kv-block-size 16] [--fixtures ../shared/fixtures]
    python benchmarks/node_counts.py --builder-window-layers 2,4,8,24

Reads ``qeff/*`` and ``qeff-features/**`` in place (weights are not loaded). The feature exports
are rewritten with the context and ring length of their own manifest's scenario.
``--builder-window-layers`` instead counts the project's builder models with a 32-token ring layer
beside full-context layers (two address groups, as gpt_oss has) at each depth, context 128: how the
index ops' fixed cost compares with what paging saves per cache as a model gets deeper.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnx.inliner

from paged_rewrite import rewrite


def inlined_nodes(model: onnx.ModelProto) -> int:
    return len(onnx.inliner.inline_local_functions(model).graph.node)


def options_for(folder: Path) -> dict[str, object]:
    manifest = json.loads((folder / "manifest.json").read_text())
    scenario = manifest.get("scenario", {})
    options: dict[str, object] = {}
    if "ctx_len" in scenario:
        options["ctx_len"] = int(scenario["ctx_len"])
    window = scenario.get("sliding_window_kv_len")
    if window:
        options["dims"] = {"sliding_window": int(window)}
    return options


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kv-block-size", type=int, default=16)
    parser.add_argument(
        "--fixtures", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    )
    parser.add_argument("--builder-window-layers", default=None, metavar="L1,L2,...")
    args = parser.parse_args()
    if args.builder_window_layers:
        builder_depths(args.kv_block_size, [int(n) for n in args.builder_window_layers.split(",")])
        return
    models = sorted((args.fixtures / "qeff").glob("*/model.onnx"))
    models += sorted((args.fixtures / "qeff-features").glob("**/model.onnx"))
    print(f"kv_block_size {args.kv_block_size}; nodes after inlining every local function")
    print("| export | original | paged | paged / original | index ops (main graph) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for path in models:
            name = str(path.parent.relative_to(args.fixtures))
            options = options_for(path.parent)
            if "ctx_len" in options:
                options["ctx_len"] = max(int(options["ctx_len"]), args.kv_block_size)  # type: ignore[call-overload]
            target = Path(tmp) / "paged.onnx"
            rewrite(path, target, args.kv_block_size, **options)  # type: ignore[arg-type]
            original = onnx.load(path, load_external_data=False)
            paged = onnx.load(target, load_external_data=False)
            before, after = inlined_nodes(original), inlined_nodes(paged)
            index_ops = Counter(
                n.op_type
                for n in paged.graph.node
                if n.op_type.startswith("Paged") and not n.op_type.startswith("PagedCtx")
            )
            listed = ", ".join(f"{op} {count}" for op, count in sorted(index_ops.items()))
            print(f"| {name} | {before} | {after} | {after / before:.3f} | {listed} |", flush=True)


def builder_depths(kv_block_size: int, depths: list[int]) -> None:
    from paged_rewrite.builder import ExportSpec, write_qeff_export

    print(f"builder, one 32-token ring layer + full layers, kv_block_size {kv_block_size}, context 128")
    print("| layers | original | paged | paged / original |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for layers in depths:
            folder = Path(tmp) / f"l{layers}"
            spec = ExportSpec(num_layers=layers, sliding_window=32, max_position=256)
            source = write_qeff_export(folder / "model.onnx", spec, sparse_weights=True)
            target = folder / "paged.onnx"
            rewrite(source, target, kv_block_size, ctx_len=128, dims={"sliding_window": 32})
            before = inlined_nodes(onnx.load(source, load_external_data=False))
            after = inlined_nodes(onnx.load(target, load_external_data=False))
            print(f"| {layers} | {before} | {after} | {after / before:.3f} |", flush=True)


if __name__ == "__main__":
    main()
