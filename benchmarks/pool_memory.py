"""How much KV memory does paging save? A serving simulation with the reference block manager.

    python benchmarks/pool_memory.py [--png docs/pool_usage.png]     # the plot needs matplotlib

Workload: 64 sequences in flight at all times, context limit 2048; when one finishes the next one
starts (640 in all). Lengths are skewed like chat traffic: prompt ~ lognormal(median 256 tokens,
sigma 1.0), output ~ lognormal(median 128, sigma 1.0), clipped so prompt + output <= 2048 (a few
sequences are long, most are short). Each step prefills arriving prompts and decodes one token for
every other sequence. A contiguous cache reserves 64 x 2048 slots whatever the lengths; the paged pool
holds only the blocks the sequences use. Reported per block size: peak and mean slots in use, the
contiguous/paged ratio at peak, and the waste (allocated but unused slots, averaged over time).
A second workload of short requests (prompt median 64, output median 64) and a prefix-sharing case
(64 requests sharing a 512-token system prompt, forked with copy on write) follow.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from paged_rewrite.runtime.block_manager import BlockManager

SLOTS, CTX = 64, 2048


@dataclass
class Trace:
    block_size: int
    slots_in_use: list[int]  # allocated blocks x block size, per step
    tokens: list[int]  # tokens actually held, per step

    @property
    def waste(self) -> float:
        allocated, used = np.array(self.slots_in_use, float), np.array(self.tokens, float)
        return float(((allocated - used) / np.maximum(allocated, 1)).mean())


def workload(
    rng: np.random.Generator, count: int, prompt_median: float, output_median: float
) -> list[tuple[int, int]]:
    prompts = np.clip(rng.lognormal(np.log(prompt_median), 1.0, count).astype(int), 4, CTX - 16)
    outputs = np.clip(rng.lognormal(np.log(output_median), 1.0, count).astype(int), 1, None)
    return [(int(p), int(min(o, CTX - p))) for p, o in zip(prompts, outputs, strict=True)]


def simulate(requests: list[tuple[int, int]], block_size: int) -> Trace:
    manager = BlockManager(SLOTS * CTX // block_size + 1, block_size)
    pending = list(enumerate(requests))
    active: dict[int, int] = {}  # request -> tokens still to generate
    trace = Trace(block_size, [], [])
    while pending or active:
        while pending and len(active) < SLOTS:
            index, (prompt, output) = pending.pop(0)
            manager.append(index, prompt)
            active[index] = output
        for index in active:
            manager.append(index, 1)
            active[index] -= 1
        trace.slots_in_use.append(manager.num_used_blocks * block_size)
        trace.tokens.append(sum(manager.length_of(i) for i in active))
        for index in [i for i, left in active.items() if left == 0]:
            manager.free(index)
            del active[index]
    return trace


def prefix_sharing(block_size: int, prefix: int = 512, requests: int = 64, own: int = 64) -> tuple[int, int]:
    """Blocks held by ``requests`` sequences that each add ``own`` tokens to a shared prompt."""
    unshared, shared = BlockManager(4096, block_size), BlockManager(4096, block_size)
    shared.append("system", prefix)
    for r in range(requests):
        unshared.append(r, prefix + own)
        shared.fork("system", r)
        shared.prepare_write(r, prefix + own)
        shared.append(r, own)
    shared.free("system")
    return unshared.num_used_blocks, shared.num_used_blocks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=640)
    args = parser.parse_args()
    reserved = SLOTS * CTX
    traces = {}
    for label, prompt_median, output_median in (("chat", 256, 128), ("short", 64, 64)):
        requests = workload(np.random.default_rng(0), args.requests, prompt_median, output_median)
        print(f"\n{label} workload: {len(requests)} requests, prompt median {np.median([p for p, _ in requests]):.0f}, "
              f"output median {np.median([o for _, o in requests]):.0f}, longest {max(p + o for p, o in requests)} tokens; "
              f"contiguous reservation {reserved} slots")  # fmt: skip
        print("| kv_block_size | peak slots in use | mean slots in use | contiguous / peak | waste (mean) |")
        print("|---|---|---|---|---|")
        for block_size in (16, 32, 64, 128):
            trace = simulate(requests, block_size)
            traces[(label, block_size)] = trace
            peak, mean = max(trace.slots_in_use), float(np.mean(trace.slots_in_use))
            print(f"| {block_size} | {peak} | {mean:.0f} | {reserved / peak:.1f}x | {trace.waste:.1%} |")
    print("\nprefix sharing: 64 requests, shared 512-token prompt + 64 own tokens each")
    print("| kv_block_size | blocks unshared | blocks shared | saving |")
    print("|---|---|---|---|")
    for block_size in (16, 32, 64, 128):
        alone, shared = prefix_sharing(block_size)
        print(f"| {block_size} | {alone} | {shared} | {1 - shared / alone:.0%} |")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(9, 4.5), dpi=110)
        for block_size in (16, 128):
            trace = traces[("chat", block_size)]
            axis.plot(np.array(trace.slots_in_use) / 1024, label=f"paged, kv_block_size {block_size}")
        axis.plot(np.array(traces[("chat", 16)].tokens) / 1024, label="tokens actually held", linestyle=":")
        axis.axhline(reserved / 1024, color="black", linestyle="--", label="contiguous: 64 x 2048 reserved")
        axis.set(xlabel="step", ylabel="KV slots per layer (thousands)", ylim=(0, reserved / 1024 * 1.08),
                 title="KV cache in use over time: 64 concurrent chat-like sequences, ctx 2048")  # fmt: skip
        axis.legend(loc="center right")
        figure.tight_layout()
        args.png.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.png)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
