"""What an object-model IR costs on a 70B-size graph: load + save through onnx_ir and through
onnx-graphsurgeon, against the floor of a plain protobuf ``onnx.load`` + ``onnx.save``, and
against paged-rewrite's in-place protobuf rewrite (load + rewrite + save, no check).

    python benchmarks/library_choice.py [--layers 80] [--repeat 5]

(onnx-graphsurgeon is not a dependency of the project: ``pip install onnx-graphsurgeon`` first;
it is skipped when absent.) Medians of in-process runs after one warm-up each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnx


def timed(run: Callable[[], object], repeat: int) -> float:
    run()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import onnx_ir as ir

    from paged_rewrite.builder import ExportSpec, write_qeff_export
    from paged_rewrite.model_io import load_model
    from paged_rewrite.pipeline import RewriteOptions, rewrite_model

    with tempfile.TemporaryDirectory() as tmp:
        spec = ExportSpec(num_layers=args.layers, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128,
                          intermediate_size=28672, vocab_size=128256, max_position=4096)  # fmt: skip
        model = write_qeff_export(Path(tmp) / "model.onnx", spec, sparse_weights=True)
        out = str(Path(tmp) / "out.onnx")

        def ours() -> None:
            loaded = load_model(model)
            rewrite_model(loaded, RewriteOptions(128, 4096))
            Path(out).write_bytes(loaded.SerializeToString())

        cases: dict[str, Callable[[], object]] = {
            "floor: onnx.load + onnx.save": lambda: onnx.save(
                onnx.load(model, load_external_data=False), out
            ),
            "onnx_ir: ir.load + ir.save": lambda: ir.save(ir.load(model), out),
            "paged-rewrite: load + rewrite + save (protobuf in place)": ours,
        }
        try:
            import onnx_graphsurgeon as gs

            cases["onnx-graphsurgeon: import_onnx + export_onnx + save"] = lambda: onnx.save(
                gs.export_onnx(gs.import_onnx(onnx.load(model, load_external_data=False))), out
            )
        except ImportError:
            print("onnx-graphsurgeon not installed: skipped")
        floor = None
        for name, run in cases.items():
            seconds = timed(run, args.repeat)
            floor = floor or seconds
            print(
                f"{args.layers} layers  {name:58s} {seconds:7.3f} s  {seconds / floor:5.1f}x floor",
                flush=True,
            )


if __name__ == "__main__":
    main()
