"""Is the paged model as fast as the original? Prefill and decode step times in onnxruntime (CPU),
original vs paged, on identical inputs, at several context fills and batch sizes.

    python benchmarks/paged_speed.py [--layers 12] [--ctx 2048] [--block 128] [--repeat 15] [--profile]
                                     [--steps prefill,decode]

The model is the project's builder at ~130M parameters (12 layers, hidden 768, 12 query / 4 KV heads,
head_dim 64, MLP 3072, vocab 16000), context 2048. Each case feeds the original a contiguous cache
``[B, 4, ctx, 64]`` and the paged model a pool of ``B * num_kv_blocks + 1`` blocks with every row's
table a shuffled set of blocks; caches hold the same random values at every logical position.
Reported: median wall time per call, and the ratio paged / original of the medians and of the
minimums (the cost without interference from other jobs). ``--profile`` adds per-op-type
totals from onnxruntime's profiler for one decode case.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from paged_rewrite import rewrite
from paged_rewrite.builder import ExportSpec, write_qeff_export
from paged_rewrite.runtime.sessions import open_session, sentinel_overrides


def feeds_for(batch: int, seq: int, start: int, ctx: int, block: int, heads: int, head_dim: int, layers: int,
              rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:  # fmt: skip
    """Original and paged inputs holding the same logical cache."""
    tokens = {
        "input_ids": rng.integers(0, 16000, (batch, seq)).astype(np.int64),
        "position_ids": np.tile(np.arange(start, start + seq, dtype=np.int64), (batch, 1)),
    }
    num_kv_blocks = ctx // block
    table = (
        rng.permutation(np.arange(1, batch * num_kv_blocks + 1))
        .reshape(batch, num_kv_blocks)
        .astype(np.int64)
    )
    original, paged = dict(tokens), dict(tokens)
    paged["block_table"] = table
    paged["slot_id"] = np.full(batch, start % block, dtype=np.int64)
    for layer in range(layers):
        for kind in ("key", "value"):
            cache = rng.standard_normal((batch, heads, ctx, head_dim)).astype(np.float32)
            pool = np.zeros((batch * num_kv_blocks + 1, heads, block, head_dim), np.float32)
            blocks = cache.reshape(batch, heads, num_kv_blocks, block, head_dim).transpose(0, 2, 1, 3, 4)
            pool[table.ravel()] = blocks.reshape(-1, heads, block, head_dim)
            original[f"past_{kind}.{layer}"] = cache
            paged[f"past_{kind}.{layer}"] = pool
    return original, paged


def paired_times(
    sessions: tuple[ort.InferenceSession, ort.InferenceSession],
    feeds: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    repeat: int,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[float], list[float]]:
    """Seconds per call of each session, calls alternating so machine drift hits both."""
    for session, inputs in zip(sessions, feeds, strict=True):
        for _ in range(2):
            session.run(None, inputs)
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for index, (session, inputs) in enumerate(zip(sessions, feeds, strict=True)):
            start = clock()
            session.run(None, inputs)
            samples[index].append(clock() - start)
    return samples


def paired_medians(
    sessions: tuple[ort.InferenceSession, ort.InferenceSession],
    feeds: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    repeat: int,
) -> tuple[float, float]:
    """Median seconds per call of each session (see ``paired_times``)."""
    original, paged = paired_times(sessions, feeds, repeat)
    return statistics.median(original), statistics.median(paged)


def op_profile(model: Path, feeds: dict[str, np.ndarray], patch: bool, repeat: int) -> dict[str, float]:
    """Total microseconds per op type over ``repeat`` runs (onnxruntime's profiler)."""
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(model.with_suffix(""))
    keep = []
    if patch:
        for name, value in sentinel_overrides(model).items():
            keep.append(ort.OrtValue.ortvalue_from_numpy(value))
            options.add_initializer(name, keep[-1])
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(repeat):
        session.run(None, feeds)
    trace = json.loads(Path(session.end_profiling()).read_text())
    totals: collections.Counter[str] = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / repeat
    return dict(totals.most_common(8))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--steps", default="prefill,decode", help="which steps to time (comma-separated)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the process's CPU time per call (with --threads 1, the work done, whatever else runs)",
    )
    args = parser.parse_args()
    steps = [(128, "prefill 128"), (1, "decode")]
    steps = [step for step in steps if step[1].split()[0] in args.steps.split(",")]
    spec = ExportSpec(num_layers=args.layers, hidden_size=768, num_heads=12, num_kv_heads=4, head_dim=64,
                      intermediate_size=3072, vocab_size=16000, max_position=args.ctx)  # fmt: skip
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        original_path = write_qeff_export(Path(tmp) / "model.onnx", spec)
        paged_path = Path(tmp) / "paged.onnx"
        rewrite(original_path, paged_path, args.block, ctx_len=args.ctx)
        original = open_session(original_path, patch_sentinels=True, threads=args.threads)
        paged = open_session(paged_path, threads=args.threads)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        params = sum(int(np.prod(s)) for s in [(16000, 768)] * 2) + args.layers * (
            2 * 768 * 768 + 2 * 768 * 256 + 3 * 768 * 3072
        )
        print(f"model: {params / 1e6:.0f}M parameters, ctx {args.ctx}, kv_block_size {args.block}; "
              f"{args.repeat} calls each, {args.clock} clock, threads {args.threads or 'default'}", flush=True)  # fmt: skip
        # The minimum is the cost without interference (other jobs only ever add time); the median
        # is what a loaded machine sees. Both are ratios of the same run's alternating calls.
        print(
            "| step | batch | context fill | original (median) | paged (median) | paged / original, medians | paged / original, minimums |"
        )
        print("|---|---|---|---|---|---|---|")
        for seq, kind in steps:
            for batch in (1, 8):
                for fill in (0.1, 0.5, 0.9):
                    start = int(fill * args.ctx) // 128 * 128
                    a, b = feeds_for(batch, seq, start, args.ctx, args.block, 4, 64, args.layers, rng)
                    t_original, t_paged = paired_times((original, paged), (a, b), args.repeat, clock)
                    m_original, m_paged = statistics.median(t_original), statistics.median(t_paged)
                    print(f"| {kind} | {batch} | {fill:.0%} | {m_original * 1e3:.1f} ms | {m_paged * 1e3:.1f} ms "
                          f"| {m_paged / m_original:.3f} | {min(t_paged) / min(t_original):.3f} |", flush=True)  # fmt: skip
        if args.profile:
            a, b = feeds_for(8, 1, args.ctx // 2, args.ctx, args.block, 4, 64, args.layers, rng)
            for name, path, feeds, patch in (
                ("original", original_path, a, True),
                ("paged", paged_path, b, False),
            ):
                totals = op_profile(path, feeds, patch, args.repeat)
                print(
                    f"{name} decode, batch 8, 50% fill, us per call by op: "
                    + ", ".join(f"{op} {us:.0f}" for op, us in totals.items())
                )


if __name__ == "__main__":
    main()
