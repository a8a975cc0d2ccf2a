"""Rewrite wall time, peak memory and bytes read on 70B-shaped graphs, against the floor of a
plain ``onnx.load(path, load_external_data=False)`` + ``onnx.save`` of the same graph.

    python benchmarks/rewrite_scale.py [--layers 2 32 80] [--repeat 5] [--json out.json]

Models come from the project's builder: Llama-70B shapes (hidden 8192, 64 query / 8 KV heads,
head_dim 128, MLP 28672, vocab 128256) with their float32 weights in a sparse external data file
(~3.5 GB per layer apparent, almost nothing on disk). Each measurement runs in a fresh process, the cases interleaved;
the timed region excludes interpreter start-up and imports. Reported per case: median wall time,
its ratio to the floor's median, peak RSS (VmHWM, imports included), bytes the process read
during the timed region (/proc/self/io rchar), and whether any Python-level open() touched a
.data file (an audit hook).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
case, model, out = sys.argv[1:4]
import onnx
if case != "floor":  # the package loads its modules on first use: load them before the clock
    import paged_rewrite
    from paged_rewrite.api import rewrite
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
def rchar():
    return int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" else None)
read0, start = rchar(), time.perf_counter()
if case == "floor":
    onnx.save(onnx.load(model, load_external_data=False), out)
else:
    rewrite(model, out, 128, ctx_len=4096, full_check=(case == "rewrite+full-check"))
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "peak_rss": status("VmHWM"), "read_bytes": rchar() - read0,
                  "data_opened": any(p.endswith(".data") for p in opened)}))
"""

CASES = ("floor", "rewrite", "rewrite+full-check")


def run_once(case: str, model: Path, index: int) -> dict[str, float]:
    out = model.with_name(f"out_{case}_{index}.onnx")
    done = subprocess.run([sys.executable, "-c", CHILD, case, str(model), str(out)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    for leftover in model.parent.glob(f"out_{case}_{index}*"):
        leftover.unlink()
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure_all(model: Path, repeat: int) -> dict[str, dict[str, float]]:
    """Cases interleaved run by run, so the machine's drift hits each case alike."""
    runs: dict[str, list[dict[str, float]]] = {case: [] for case in CASES}
    for index in range(repeat):
        for case in CASES:
            runs[case].append(run_once(case, model, index))
    return {
        case: {
            "seconds": statistics.median(r["seconds"] for r in results),
            "peak_rss_mb": max(r["peak_rss"] for r in results) / 2**20,
            "read_mb": max(r["read_bytes"] for r in results) / 2**20,
            "data_opened": any(r["data_opened"] for r in results),
        }
        for case, results in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32, 80])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from paged_rewrite.builder import ExportSpec, write_qeff_export

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            spec = ExportSpec(num_layers=layers, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128,
                              intermediate_size=28672, vocab_size=128256, max_position=4096)  # fmt: skip
            model = write_qeff_export(
                Path(tmp) / f"llama70b_{layers}" / "model.onnx", spec, sparse_weights=True
            )
            weights_gb = model.with_suffix(".data").stat().st_size / 1e9
            row = {"layers": layers, "onnx_mb": model.stat().st_size / 2**20, "weights_gb": weights_gb}
            row.update(measure_all(model, args.repeat))
            results.append(row)
            floor = row["floor"]["seconds"]
            for case in CASES:
                m = row[case]
                print(f"{layers:3d} layers ({row['onnx_mb']:.1f} MB graph, {weights_gb:.0f} GB weights) {case:20s} "
                      f"{m['seconds']:.3f} s  {m['seconds'] / floor:4.1f}x floor  peak RSS {m['peak_rss_mb']:.0f} MB  "
                      f"read {m['read_mb']:.1f} MB  .data opened: {m['data_opened']}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
