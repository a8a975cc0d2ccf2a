"""How much graph does paging add? Node counts of every corpus export after inlining every
model-local function (what the QAIC compiler lowers), original against paged.

    python benchmarks/node_counts.py [--kv-block-size 16] [--fixtures ../shared/fixtures]

Reads ``qeff/*`` and ``qeff-features/**`` in place (weights are not loaded). The feature exports
are rewritten with the context and ring length of their own manifest's scenario.
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
