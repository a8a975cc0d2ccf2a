"""How long the command line takes, as whole processes, against the floor a CI step pays anyway.

    python benchmarks/cli_startup.py [--fixture ../shared/fixtures/qeff/llama_default/model.onnx] [--repeat 9]

Each case runs as a fresh process (cold imports included), interleaved with its floor in the same
round, so machine noise hits both alike; reported are medians and the ratio case / floor:

- ``rewrite``: ``paged-rewrite FIXTURE -o OUT --kv-block-size 32 --ctx-len 128`` against
  ``python -c "import onnx; onnx.save(onnx.load(FIXTURE), OUT)"`` (load and save the same model);
- ``--help`` and ``inspect FIXTURE`` against ``python -c "import onnx"``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "paged_rewrite.cli"]


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fixture", type=Path, default=REPO.parent / "shared/fixtures/qeff/llama_default/model.onnx"
    )
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    model = str(args.fixture)
    with tempfile.TemporaryDirectory() as folder:
        out, floor_out = str(Path(folder) / "paged.onnx"), str(Path(folder) / "copy.onnx")
        cases = {
            "rewrite": (
                [*CLI, model, "-o", out, "--kv-block-size", "32", "--ctx-len", "128"],
                [sys.executable, "-c", f"import onnx; onnx.save(onnx.load({model!r}), {floor_out!r})"],
            ),
            "--help": ([*CLI, "--help"], [sys.executable, "-c", "import onnx"]),
            "inspect": (
                [*CLI, "inspect", model, "--kv-block-size", "32"],
                [sys.executable, "-c", "import onnx"],
            ),
        }
        for case, floor in cases.values():  # warm the file cache and bytecode once
            seconds(case), seconds(floor)
        times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in cases}
        for _ in range(args.repeat):
            for name, (case, floor) in cases.items():
                times[name][0].append(seconds(case))
                times[name][1].append(seconds(floor))
    results = {}
    for name, (case_times, floor_times) in times.items():
        case_s, floor_s = statistics.median(case_times), statistics.median(floor_times)
        results[name] = {
            "seconds": round(case_s, 3),
            "floor_seconds": round(floor_s, 3),
            "ratio": round(case_s / floor_s, 2),
        }
        print(f"{name:8s} {case_s:6.3f} s   floor {floor_s:6.3f} s   ratio {case_s / floor_s:4.2f}")
    print(json.dumps(results, sort_keys=True))


if __name__ == "__main__":
    main()
