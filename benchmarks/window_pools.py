"""How much KV memory do per-window pools save on hybrid (sliding-window + full) models?

    python benchmarks/window_pools.py --png docs/window_pools.png     # the plot needs '.[bench]'

1. Pool bytes at equal capacity. The gpt-oss fixture (one 128-slot ring layer per full layer:
   gpt-oss's 1:1 mix) is rewritten twice for 64 rows at each context up to 32768, kv_block_size
   128: with a table and pool per window (the default) and with ``--shared-window-table`` (every
   pool full-context). Pool bytes are read from the rewritten models: each pool input's shape
   under the specializations the rewrite wrote (their default pool sizes: every row at the full
   context, every row's ring), times the element size. The Gemma-3 shape (5 local layers of
   window 1024 per global layer) takes the per-layer pool bytes of the same fixture rewritten with
   window 1024 and weighs them 5:1 (the fixture has one layer of each kind). Equal capacity is
   checked, not assumed: both layouts' block managers (one free list per group against one for
   all) take 64 sequences to the full context with the pools the specializations give.
2. A real oversubscribed run in onnxruntime on the gpt-oss fixture (kv_block_size 16, context
   128, window 32): waves of 4 sequences each decode past the window (the ring turns up to three
   times) and are released for the next wave; the ring pool holds 4 rings (9 blocks), the
   single-table layout's ring layer a full pool (33). Both runs are compared with the original
   export step by step, and their pool bytes and step times are measured in the same run.
3. Llama 4's chunked attention: the ``llama4_text`` feature fixture (three chunked layers per
   global one, as Llama 4 interleaves them; chunk 32, a constant of its graph) rewritten for 64
   rows at kv_block_size 16 with its chunked layers in a ring pool (the default) and in the one
   table (``--shared-window-table``, the layout before they had a table of their own); pool bytes
   as in 1, at contexts of 4, 16 and 64 chunks. Equal capacity checked as in 1.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from paged_rewrite import rewrite
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import drive, random_scenario
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "qeff" / "gpt_oss_swa_moe" / "model.onnx"
LLAMA4 = REPO.parent / "shared" / "fixtures" / "qeff-features" / "llama4_text" / "model.onnx"
CHUNK, CHUNK_BLOCK = 32, 16  # the fixture's attention_chunk_size (a constant of its graph)
ROWS, BLOCK = 64, 128
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
SHAPES = {"gpt-oss (1:1, window 128)": (128, 1), "Gemma 3 (5:1, window 1024)": (1024, 5)}


def pool_bytes(paged: Path) -> dict[str, int]:
    """Bytes of each pool input under the rewrite's specializations (the same in every entry)."""
    model = onnx.load(paged, load_external_data=False)
    symbols = json.loads(paged.with_name("paged.specializations.json").read_text())["specializations"][0][
        "symbols"
    ]
    sizes = {}
    for value in model.graph.input:
        if not value.name.startswith("past_"):
            continue
        dims = [d.dim_value or int(symbols[d.dim_param]) for d in value.type.tensor_type.shape.dim]
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).itemsize
        sizes[value.name] = math.prod(dims) * itemsize
    return sizes


def layer_bytes(window: int, ctx: int, shared: bool, folder: Path) -> tuple[int, int]:
    """(ring layer, full layer) pool bytes, K and V, of the fixture rewritten for ROWS rows."""
    out = folder / f"w{window}_c{ctx}_{'shared' if shared else 'groups'}" / "paged.onnx"
    dims = {"sliding_window": window, "batch_size": ROWS}
    rewrite(FIXTURE, out, BLOCK, ctx_len=ctx, dims=dims, ctx_buckets=[ctx], shared_window_table=shared)
    sizes = pool_bytes(out)
    return sizes["past_key.0"] + sizes["past_value.0"], sizes["past_key.1"] + sizes["past_value.1"]


def holds_everyone(
    ctx: int, window: int, full_blocks: int, ring_blocks: int | None, block: int = BLOCK
) -> bool:
    """Whether the block managers of a layout take ROWS sequences to ``ctx`` tokens: one free
    list for every layer (``ring_blocks`` None), or the full one and a ring group's."""
    managers = [BlockManager(full_blocks, block)]
    if ring_blocks is not None:
        managers.append(BlockManager(ring_blocks, block, window=window))
    try:
        for row in range(ROWS):
            for manager in managers:
                manager.append(row, ctx)
    except RuntimeError:
        return False
    return True


def memory_table(folder: Path) -> dict[str, list[float]]:
    ratios: dict[str, list[float]] = {}
    print("| model shape | context | rows | KV bytes, table per window | KV bytes, single table | ratio |")
    print("|---|---|---|---|---|---|")
    for label, (window, local_per_global) in SHAPES.items():
        ratios[label] = []
        for ctx in CONTEXTS:
            ring, full = layer_bytes(window, ctx, False, folder)
            ring_shared, full_shared = layer_bytes(window, ctx, True, folder)
            groups = local_per_global * ring + full
            single = local_per_global * ring_shared + full_shared
            per_block = full // (ROWS * (ctx // BLOCK) + 1)  # K + V bytes of one block of a layer
            assert holds_everyone(ctx, window, full // per_block, ring // per_block)
            assert holds_everyone(ctx, window, full_shared // per_block, None)
            ratios[label].append(groups / single)
            if ctx == CONTEXTS[-1] or ctx == 4096:
                print(f"| {label} | {ctx} | {ROWS} | {groups / 2**20:.1f} MiB | {single / 2**20:.1f} MiB | "
                      f"{groups / single:.1%} |")  # fmt: skip
    return ratios


def oversubscribed_run(folder: Path, waves: int = 3, rows: int = 4) -> None:
    """Section 2 of the module doc."""
    results = {}
    for shared in (False, True):
        out = folder / f"run_{'shared' if shared else 'groups'}" / "paged.onnx"
        dims = {"sliding_window": 32}
        rewrite(FIXTURE, out, 16, ctx_len=128, dims=dims, shared_window_table=shared)
        full_pool = 1 + rows * 8
        full = BlockManager(
            full_pool, 16, shuffled_order(full_pool, 1), ring_lengths=[] if not shared else [32]
        )
        rings = (
            {}
            if shared
            else {
                "block_table_w32": BlockManager(1 + rows * 2, 16, shuffled_order(1 + rows * 2, 2), window=32)
            }
        )
        paged = PagedRunner(out, full, 8, dims, window_managers=rings)
        reference = ContiguousRunner(FIXTURE, {"ctx_len": 128, **dims})
        exact, steps, seconds = True, 0, 0.0
        for wave in range(waves):
            lengths = [31 - 3 * r for r in range(rows)]  # prompts shorter than the ring
            scenario = random_scenario(256, lengths, num_decode=90, chunk_len=16, seed=wave)
            started = time.perf_counter()
            for step in drive([reference, paged], scenario):
                exact &= bool(np.array_equal(step.logits[0], step.logits[1]))
                steps += 1
            seconds += time.perf_counter() - started
            for script in scenario.sequences:
                paged.release(script.name)
                reference.release(script.name)
        breaches = sum(bool(r.foreign_blocks_changed) for r in paged.isolation)
        kv = sum(pool.nbytes for pool in paged.pools.values())
        results[shared] = (
            kv,
            seconds,
            exact,
            steps,
            breaches,
            {t: m.num_blocks for t, m in paged.managers.items()},
        )
    kv, seconds, exact, steps, breaches, pools = results[False]
    kv_single, seconds_single, exact_single, _, breaches_single, pools_single = results[True]
    print(f"\nreal run: {waves} waves x {rows} sequences, {steps} steps per layout")
    print(
        "| layout | pools (blocks) | KV bytes | vs single table | bit-exact vs original | isolation breaches |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| table per window | {pools} | {kv} | {kv / kv_single:.1%} | {exact} | {breaches} |")
    print(f"| single table | {pools_single} | {kv_single} | 100% | {exact_single} | {breaches_single} |")
    print(
        f"time of the run (both drive the original too): {seconds / seconds_single:.2f}x the single table's"
    )


def chunked_table(folder: Path) -> None:
    """Section 3 of the module doc."""
    print(
        f"\nLlama 4 fixture, 3 chunked : 1 global layer, chunk {CHUNK}, kv_block_size {CHUNK_BLOCK}, {ROWS} rows"
    )
    print(
        "| context | chunk / context | KV bytes, ring pool for the chunks | KV bytes, single table | ratio |"
    )
    print("|---|---|---|---|---|")
    for ctx in (4 * CHUNK, 16 * CHUNK, 64 * CHUNK):
        sizes = {}
        for shared in (False, True):
            out = folder / f"llama4_c{ctx}_{'shared' if shared else 'groups'}" / "paged.onnx"
            rewrite(LLAMA4, out, CHUNK_BLOCK, ctx_len=ctx, dims={"batch_size": ROWS}, ctx_buckets=[ctx],
                    shared_window_table=shared)  # fmt: skip
            sizes[shared] = pool_bytes(out)
        grouped, single = sum(sizes[False].values()), sum(sizes[True].values())
        per_block = sizes[True]["past_key.3"] // (ROWS * (ctx // CHUNK_BLOCK) + 1)  # one block, K or V
        full, ring = sizes[False]["past_key.3"] // per_block, sizes[False]["past_key.0"] // per_block
        assert holds_everyone(ctx, CHUNK, full, ring, CHUNK_BLOCK)
        assert holds_everyone(ctx, CHUNK, sizes[True]["past_key.0"] // per_block, None, CHUNK_BLOCK)
        print(f"| {ctx} | 1/{ctx // CHUNK} | {grouped / 2**20:.2f} MiB | {single / 2**20:.2f} MiB | "
              f"{grouped / single:.1%} |")  # fmt: skip


def plot(ratios: dict[str, list[float]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.2), dpi=110)
    for label, values in ratios.items():
        axis.plot(CONTEXTS, [100 * v for v in values], marker="o", label=label)
    axis.axhline(100, color="black", linestyle="--", label="single table (every pool full-context)")
    axis.set_xscale("log", base=2)
    axis.set(xlabel="context (tokens)", ylabel="KV bytes, % of the single-table layout", ylim=(0, 110),
             title=f"Per-window pools at equal capacity: {ROWS} rows, kv_block_size {BLOCK}")  # fmt: skip
    axis.legend(loc="lower left")
    figure.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    print(f"\nwrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        ratios = memory_table(Path(scratch))
        oversubscribed_run(Path(scratch))
        chunked_table(Path(scratch))
    if args.png:
        plot(ratios, args.png)


if __name__ == "__main__":
    main()
