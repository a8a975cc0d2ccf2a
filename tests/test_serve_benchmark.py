"""``benchmarks/serve.py`` run small (one layer, a 1024-token context, 6 requests, ~15 s), so the
script cannot rot between the runs that produce BENCHMARKS.md. Its numbers are not looked at:
only that every part runs and what it reports is consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_the_serving_benchmark_runs_small(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    command = [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--layers", "1", "--ctx", "1024",
               "--requests", "6", "--repeat", "1", "--ttft-samples", "2", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["setup"] == {"layers": 1, "ctx": 1024, "requests": 6}
    # Blocks of 128, buckets 128, 256, 512, 1024: fills of 3%, 6%, 10% fit one block, 25% two, ...
    assert [row["columns"] for row in results["decode_vs_fill_ms"]] == [1, 1, 1, 2, 4, 8]
    assert list(results["ttft_alone_ms"]) == ["chunk_128", "chunk_64"]  # the serving chunk first
    for ttft in results["ttft_alone_ms"].values():
        assert ttft["samples"] == 2 and ttft["paged_hit_min"] > 0 and ttft["paged_cold_over_hit_paired"] > 0
    runs = ["original", "paged", "paged_prefix_caching_off", "paged_burst", "paged_light",
            "paged_light_prefix_caching_off"]  # fmt: skip
    assert len({results[run]["generated_tokens"] for run in runs}) == 1  # every run serves every token
    assert results["original"]["peak_running"] <= 8  # its cache rows
    assert results["paged_prefix_caching_off"]["prefix_hits"] == 0
    assert results["paged_light_prefix_caching_off"]["prefix_hits"] == 0
    assert results["paged_light"]["prefix_hits"] >= 1  # at 2 requests/s each system prompt is cached by then
    for comparison in results["system_prompt_ttft_prefix_caching_on_vs_off"].values():
        assert sorted(comparison) == sorted(
            f"ttft_system_{p}_ms_caching_{state}" for p in ("p50", "p95") for state in ("on", "off")
        )
        assert all(value > 0 for value in comparison.values())
