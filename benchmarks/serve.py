"""Serving: the paged model against the original continuous-batching export at the same KV memory.

    python benchmarks/serve.py [--requests 96] [--rate 16] [--light-rate 2] [--seed 0] [--png docs/serving.png]
    python benchmarks/serve.py --layers 1 --ctx 1024 --requests 6 --repeat 1 --ttft-samples 2   # a smoke run

Models (the project's builder, one seed): a QEfficient-style continuous-batching export with
``--layers`` layers (2), hidden 256, 4 query / 2 KV heads, head_dim 64, MLP 512, vocab 4096, context
``--ctx`` (4096) and ``full_batch_size`` 8; its paged rewrite with ``kv_block_size`` 128 and the
default context buckets (128, 256, ..., 4096), pool 8 * 32 + 1 = 257 blocks: the original's 8 * 4096
token slots per cache tensor plus the null block. Both run in onnxruntime CPU with their caches
updated in place (``paged_rewrite.runtime.in_place``; a device keeps retained state in place, and the
per-step copy onnxruntime otherwise makes is reported separately below) through
``paged_rewrite.runtime.serving``: FCFS admission reserving each request's KV in full, one prefill call
of up to 128 tokens then one decode step per iteration, virtual time advanced by measured call times.
Both models are taken as compiled for prefill lengths 32 and 64 besides the 128-token chunk (three
prefill specializations per context bucket), so a call is padded to the shortest length that holds
its tokens: the last chunk of a prompt, or what a prefix hit leaves.
Every runner is warmed with an unrelated prompt before anything is timed on it.

Workload: Poisson arrivals at ``--rate`` requests/s (a load that saturates both servers: capacity and
throughput), and at ``--light-rate`` for the paged model alone (time to first token when it is not
queueing); user prompt ~ lognormal(median 128, sigma 0.8) clipped to [8, 1536] tokens, output ~
lognormal(median 48, sigma 0.7) clipped to [4, 384] tokens; half the requests start with one common
512-token system prompt. (The clips and the system prompt scale with ``--ctx``: those are at 4096.)
Random token ids, greedy decoding to exactly the drawn output length.

Reported: decode step time against context fill (batch 8, caches in place and copied); time to first
token of a system prompt + 64 user tokens alone, cold and with its system prompt cached, at the
serving chunk (128, the headline) and at 64 (medians, minimums and paired ratios); for the served
workloads tokens/s, peak concurrent sequences (the paged model's only limit is its pool; the same
requests all at once measure that limit), TTFT p50/p95 by prefix hit, and the wall time of each run;
and the same workloads on the paged model with prefix caching off, for TTFT p50/p95 of the
system-prompt requests with caching on and off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from paged_rewrite import rewrite
from paged_rewrite.buckets import pick_width
from paged_rewrite.builder import ExportSpec, write_qeff_export
from paged_rewrite.runtime.block_manager import BlockManager
from paged_rewrite.runtime.geometry import PagedGeometry
from paged_rewrite.runtime.in_place import run_in_place
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner
from paged_rewrite.runtime.serving import Request, Served, Server
from paged_rewrite.runtime.sessions import open_session

BLOCK, ROWS, CHUNK = 128, 8, 128
USER_TOKENS = 64  # the user part of the TTFT probe
# Prefill lengths compiled besides the chunk (one specialization each): a call prefilling fewer
# tokens is padded to the shortest that holds them (runtime.serving.Server), for both models.
PREFILL_LENGTHS = (32, 64)
MAX_RUNNING = 256  # no batch cap the pool could reach: the paged model's concurrency is its memory's
SYSTEM_MARK = "-system"  # names of the requests whose prompt starts with the common system prompt
FILLS = (1 / 32, 1 / 16, 1 / 10, 1 / 4, 1 / 2, 1.0)
R = TypeVar("R", PagedRunner, ContiguousRunner)


@dataclass(frozen=True)
class Setup:
    """The models' size and the workload's lengths, all at the defaults' scale for ``ctx = 4096``."""

    layers: int = 2
    ctx: int = 4096

    @property
    def spec(self) -> ExportSpec:
        return ExportSpec(num_layers=self.layers, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64,
                          intermediate_size=512, vocab_size=4096, continuous_batching=True)  # fmt: skip

    @property
    def pool(self) -> int:
        return ROWS * self.ctx // BLOCK + 1

    @property
    def system(self) -> int:
        return self.ctx // 8

    @property
    def max_user(self) -> int:
        return self.ctx * 3 // 8

    @property
    def max_output(self) -> int:
        return self.ctx * 3 // 32


def build(setup: Setup, folder: Path) -> tuple[Path, Path]:
    original = write_qeff_export(folder / "cb.onnx", setup.spec)
    rewrite(original, folder / "paged.onnx", BLOCK, ctx_len=setup.ctx, num_blocks=setup.pool)
    return original, folder / "paged.onnx"


def decode_vs_fill(setup: Setup, original: Path, paged: Path, repeat: int) -> list[dict[str, float]]:
    """Median decode step (ms) at batch 8, every row at the same position, per context fill:
    the original, the paged model with the narrowest bucket and with the full table; caches
    updated in place and, for the first two, copied (onnxruntime's default)."""
    sessions = {"original": open_session(original, patch_sentinels=True), "paged": open_session(paged)}
    widths = [-(-b // BLOCK) for b in PagedGeometry.of(paged).ctx_buckets]
    rng = np.random.default_rng(0)
    spec, ctx = setup.spec, setup.ctx
    names = [f"past_{k}.{layer}" for layer in range(spec.num_layers) for k in ("key", "value")]
    shape = (spec.num_kv_heads, spec.head_dim)
    caches = {n: rng.standard_normal((ROWS, shape[0], ctx, shape[1]), np.float32) for n in names}
    pools = {n: rng.standard_normal((setup.pool, shape[0], BLOCK, shape[1]), np.float32) for n in names}
    aliases = {n: f"{n}_RetainedState" for n in names}
    rows: list[dict[str, float]] = []
    for fill in FILLS:
        position = round(fill * ctx) - 1
        tokens = {"input_ids": rng.integers(0, spec.vocab_size, (ROWS, 1)),
                  "position_ids": np.full((ROWS, 1), position)}  # fmt: skip
        narrow = pick_width(position + 1, widths, BLOCK)
        cases = {
            "original": ("original", {**tokens, **caches, "batch_index": np.arange(ROWS)[:, None]}),
            "paged": ("paged", _paged_feeds(tokens, pools, narrow, position)),
            "paged_full_width": ("paged", _paged_feeds(tokens, pools, ctx // BLOCK, position)),
        }
        samples: dict[str, list[float]] = {f"{c}_{m}": [] for c in cases for m in ("in_place", "copy")}
        calls = [(case, mode) for case in cases for mode in ("in_place", "copy")]
        order = np.random.default_rng(len(rows))
        for index in range(repeat + 2):  # 2 warm-ups
            # Interleaved, so machine drift hits every case, in a new order each round: a call
            # right after another model's (its caches cold) is slower than one after the same
            # model's, and a fixed order would favour whichever case follows its own model.
            for case, mode in (calls[i] for i in order.permutation(len(calls))):
                model, feeds = cases[case]
                start = time.perf_counter()
                if mode == "in_place":
                    run_in_place(sessions[model], feeds, aliases, ["logits"])
                else:
                    sessions[model].run(None, feeds)
                if index >= 2:
                    samples[f"{case}_{mode}"].append(time.perf_counter() - start)
        # Medians and minimums (ms), and paired ratios: each paged call against the original call
        # of the same round. On a shared 2-core machine another process's burst can double a call;
        # it moves both calls of a pair, so the median of the pairs' ratios is the robust comparison.
        row = {"fill": fill, "columns": narrow, **{k: statistics.median(v) * 1e3 for k, v in samples.items()}}
        row.update({f"{k}_min": min(v) * 1e3 for k, v in samples.items()})
        for case in ("paged_in_place", "paged_copy", "paged_full_width_in_place"):
            original_case = "original_copy" if case.endswith("copy") else "original_in_place"
            pairs = zip(samples[case], samples[original_case], strict=True)
            row[f"{case}_over_original"] = statistics.median(p / o for p, o in pairs)
        rows.append(row)
        print(f"fill {fill:6.1%}: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items() if "place" in k))
    return rows


def _paged_feeds(tokens: dict[str, np.ndarray], pools: dict[str, np.ndarray], columns: int,
                 position: int) -> dict[str, np.ndarray]:  # fmt: skip
    table = np.arange(1, ROWS * columns + 1).reshape(ROWS, columns)  # distinct blocks per row
    return {**tokens, **pools, "block_table": table, "slot_id": np.full(ROWS, position % BLOCK)}


def workload(setup: Setup, count: int, rate: float, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    vocab = setup.spec.vocab_size
    system = rng.integers(0, vocab, setup.system)
    arrivals = np.cumsum(rng.exponential(1 / rate, count))
    requests = []
    for index, arrival in enumerate(arrivals):
        user = int(np.clip(rng.lognormal(np.log(128), 0.8), 8, setup.max_user))
        output = int(np.clip(rng.lognormal(np.log(48), 0.7), 4, setup.max_output))
        prompt = rng.integers(0, vocab, user)
        shared = rng.random() < 0.5
        if shared:
            prompt = np.r_[system, prompt]
        requests.append(Request(f"r{index}{SYSTEM_MARK if shared else ''}", prompt, output, float(arrival)))
    return requests


def paged_runner(setup: Setup, paged: Path, caching: bool = True) -> PagedRunner:
    manager = BlockManager(setup.pool, BLOCK, prefix_caching=caching)
    runner = PagedRunner(paged, manager, setup.ctx // BLOCK, check_isolation=False, in_place=True)
    return warmed(setup, runner, MAX_RUNNING)


def original_runner(setup: Setup, original: Path) -> ContiguousRunner:
    runner = ContiguousRunner(original, {"ctx_len": setup.ctx, "full_batch_size": ROWS}, in_place=True)
    return warmed(setup, runner, ROWS)


def make_server(runner: PagedRunner | ContiguousRunner, chunk: int, max_running: int) -> Server:
    """A server prefilling in chunks of ``chunk`` and in the shorter ``PREFILL_LENGTHS``."""
    return Server(runner, chunk, max_running, prefill_lengths=[n for n in PREFILL_LENGTHS if n < chunk])


def warmed(setup: Setup, runner: R, max_running: int) -> R:
    """``runner`` after serving an unrelated prompt as long as the TTFT probe, at both chunk
    lengths: a session's first calls pay for its allocations and first kernel runs, which no
    timed call should. (A paged runner's cache keeps the prompt's blocks, idle: nothing later
    starts with these random tokens, and idle cached blocks are as available as free ones.)"""
    rng = np.random.default_rng(99)
    for chunk in (CHUNK // 2, CHUNK):
        prompt = rng.integers(0, setup.spec.vocab_size, setup.system + USER_TOKENS)
        make_server(runner, chunk, max_running).run([Request(f"warm-{chunk}", prompt, 2)])
    for length in PREFILL_LENGTHS:  # one call at each shorter prefill length too
        prompt = rng.integers(0, setup.spec.vocab_size, length)
        make_server(runner, CHUNK, max_running).run([Request(f"warm-{length}", prompt, 2)])
    return runner


def ttft_cold_and_hit(
    setup: Setup, original: Path, paged: Path, samples: int, chunk: int
) -> dict[str, float]:
    """TTFT (ms) of a system prompt + 64 user tokens alone on an idle server, prefilled in chunks of
    ``chunk``: the paged model with nothing cached (cold), with the system prompt cached (hit), and
    the original (which cannot cache). One warmed runner per model, reused by every sample. Each
    sample draws new prompts (a cold probe finds nothing cached; the hit probe's system prompt was
    cached, untimed, by a request just before) and times its three probes back to back in random
    order; ratios are paired (each sample's cold against the same sample's hit), minimums too."""
    rng = np.random.default_rng(1)
    vocab = setup.spec.vocab_size
    runners: dict[str, PagedRunner | ContiguousRunner] = {
        "paged": paged_runner(setup, paged), "original": original_runner(setup, original)
    }  # fmt: skip
    limits = {"paged": MAX_RUNNING, "original": ROWS}

    def served(model: str, request: Request) -> Served:
        return make_server(runners[model], chunk, limits[model]).run([request])[0]

    times: dict[str, list[float]] = {"paged_cold": [], "paged_hit": [], "original": []}
    for index in range(samples):
        system = rng.integers(0, vocab, setup.system)
        served("paged", Request(f"seed{index}", np.r_[system, rng.integers(0, vocab, 40)], 1))
        hit = Request(f"hit{index}", np.r_[system, rng.integers(0, vocab, USER_TOKENS)], 1)
        cold = Request(f"cold{index}", rng.integers(0, vocab, setup.system + USER_TOKENS), 1)
        probes = {"paged_hit": ("paged", hit, setup.system), "paged_cold": ("paged", cold, 0),
                  "original": ("original", Request(f"original{index}", cold.prompt, 1), 0)}  # fmt: skip
        for key in rng.permutation(list(probes)):
            model, request, cached = probes[key]
            outcome = served(model, request)
            assert outcome.cached_tokens == cached, (key, outcome.cached_tokens)
            times[key].append(outcome.ttft)
    result = {f"{k}_median": statistics.median(v) * 1e3 for k, v in times.items()}
    result.update({f"{k}_min": min(v) * 1e3 for k, v in times.items()})
    for key in ("paged_cold", "original"):
        pairs = zip(times[key], times["paged_hit"], strict=True)
        result[f"{key}_over_hit_paired"] = statistics.median(c / h for c, h in pairs)
        result[f"{key}_over_hit_min"] = result[f"{key}_min"] / result["paged_hit_min"]
    result["samples"] = samples
    print(f"TTFT alone, chunk {chunk} (ms): " + ", ".join(f"{k} {v:.3g}" for k, v in result.items()))
    return result


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def serve(server: Server, requests: list[Request], label: str) -> tuple[dict[str, float], list[Served]]:
    start = time.perf_counter()
    served = server.run(requests)
    wall = time.perf_counter() - start
    generated = sum(len(s.tokens) for s in served)
    makespan = max(s.finished_at for s in served) - min(r.arrival for r in requests)
    hits = [s for s in served if s.cached_tokens > 0]
    system = [s for s in served if s.request.name.endswith(SYSTEM_MARK)]
    system_cold = [s for s in system if not s.cached_tokens]
    other = [s for s in served if not s.request.name.endswith(SYSTEM_MARK)]
    decode = [s for s in server.steps if s.kind == "decode"]
    summary = {
        "generated_tokens": generated,
        "makespan_s": makespan,
        "tokens_per_s": generated / makespan,
        "peak_running": server.peak_running,
        "ttft_p50_ms": percentile([s.ttft for s in served], 50),
        "ttft_p95_ms": percentile([s.ttft for s in served], 95),
        "ttft_system_p50_ms": percentile([s.ttft for s in system], 50),
        "ttft_system_p95_ms": percentile([s.ttft for s in system], 95),
        "ttft_system_hit_p50_ms": percentile([s.ttft for s in hits], 50),
        "ttft_system_hit_p95_ms": percentile([s.ttft for s in hits], 95),
        "ttft_system_cold_p50_ms": percentile([s.ttft for s in system_cold], 50),
        "ttft_system_cold_p95_ms": percentile([s.ttft for s in system_cold], 95),
        "ttft_no_system_p50_ms": percentile([s.ttft for s in other], 50),
        "ttft_no_system_p95_ms": percentile([s.ttft for s in other], 95),
        "prefix_hits": len(hits),
        "decode_steps": len(decode),
        "mean_decode_step_ms": statistics.mean(s.seconds for s in decode) * 1e3,
        "wall_s": wall,
    }
    print(f"{label}: " + ", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
    return summary, served


def plot(
    path: Path,
    fills: list[dict[str, float]],
    runs: dict[str, list[Served]],
    light: dict[str, list[Served]],
    uncached: dict[str, list[Served]],
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, relative, middle, right) = plt.subplots(1, 4, figsize=(20, 4.6))
    x = [100 * row["fill"] for row in fills]
    for key, label, style in (("original_in_place", "original (CB export)", "o-"),
                              ("paged_in_place", "paged, narrowed table", "s-"),
                              ("paged_full_width_in_place", "paged, full table", "^--")):  # fmt: skip
        left.plot(x, [row[key] for row in fills], style, label=label)
    left.set(
        xlabel="context fill (%)", ylabel="decode step, batch 8 (ms)", title="Decode step vs context fill"
    )
    left.legend()
    relative.axhline(1.0, color="C0", label="original")
    relative.plot(x, [row["paged_in_place_over_original"] for row in fills], "s-", color="C1",
                  label="paged, narrowed table")  # fmt: skip
    relative.plot(x, [row["paged_full_width_in_place_over_original"] for row in fills], "^--", color="C2",
                  label="paged, full table")  # fmt: skip
    relative.plot([0, 100], [0, 1], ":", color="gray", label="proportional to the fill")
    relative.set(xlabel="context fill (%)", ylabel="step time / original's (median of pairs)",
                 title="Decode step relative to the original")  # fmt: skip
    relative.legend(fontsize=8)
    for label, served in runs.items():
        events = sorted([(s.admitted_at, 1) for s in served] + [(s.finished_at, -1) for s in served])
        times, running = [0.0], [0]
        for when, change in events:
            times.append(when)
            running.append(running[-1] + change)
        middle.step(times, running, where="post", label=label)
    middle.set(
        xlabel="time (s, virtual)", ylabel="sequences in flight", title="Concurrency at equal KV memory"
    )
    middle.legend()
    for label, served in {**runs, **light}.items():
        groups = {"": served} if "original" in label else {
            ", system prompt cached": [s for s in served if s.cached_tokens],
            ", no cache hit": [s for s in served if not s.cached_tokens],
        }  # fmt: skip
        for suffix, group in groups.items():
            ttft = np.sort([s.ttft for s in group])
            right.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=label + suffix)
    for label, served in uncached.items():
        ttft = np.sort([s.ttft for s in served if s.request.name.endswith(SYSTEM_MARK)])
        right.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), ":", label=label + ", system prompt")
    right.set(xscale="log", xlabel="time to first token (s)", ylabel="share of requests",
              title="Time to first token")  # fmt: skip
    right.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--rate", type=float, default=16.0, help="mean arrivals per second (Poisson)")
    parser.add_argument("--light-rate", type=float, default=2.0, help="arrivals per second, paged model only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per decode-vs-fill case")
    parser.add_argument("--ttft-samples", type=int, default=15, help="samples per TTFT-alone case")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of both models")
    parser.add_argument("--ctx", type=int, default=4096,
                        help="context (tokens): a multiple of 128, at least 1024; the workload scales with it")  # fmt: skip
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.ctx % BLOCK or args.ctx // 8 < BLOCK:
        parser.error(
            f"--ctx {args.ctx}: a multiple of {BLOCK}, at least {8 * BLOCK} (the system prompt is a block)"
        )
    setup = Setup(args.layers, args.ctx)
    started = time.perf_counter()
    load_before = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    with tempfile.TemporaryDirectory() as tmp:
        original, paged = build(setup, Path(tmp))
        fills = decode_vs_fill(setup, original, paged, args.repeat)
        # The serving configuration's chunk first: the headline; half of it second.
        ttft = {f"chunk_{c}": ttft_cold_and_hit(setup, original, paged, args.ttft_samples, c)
                for c in (CHUNK, CHUNK // 2)}  # fmt: skip
        requests = workload(setup, args.requests, args.rate, args.seed)
        original_summary, original_served = serve(
            make_server(original_runner(setup, original), CHUNK, ROWS), requests, "original"
        )
        paged_summary, paged_served = serve(
            make_server(paged_runner(setup, paged), CHUNK, MAX_RUNNING), requests, "paged"
        )
        uncached_summary, uncached_served = serve(
            make_server(paged_runner(setup, paged, caching=False), CHUNK, MAX_RUNNING), requests,
            "paged, prefix caching off",
        )  # fmt: skip
        # Capacity: every request at once, so the pool alone bounds how many run together (the
        # original's bound is its 8 cache rows whatever the load).
        burst = [Request(r.name, r.prompt, r.max_new_tokens, 0.0) for r in requests]
        burst_summary, _ = serve(
            make_server(paged_runner(setup, paged), CHUNK, MAX_RUNNING), burst, "paged, all at once"
        )
        light = workload(setup, args.requests, args.light_rate, args.seed)
        light_summary, light_served = serve(
            make_server(paged_runner(setup, paged), CHUNK, MAX_RUNNING), light, "paged, light"
        )
        light_uncached_summary, _ = serve(
            make_server(paged_runner(setup, paged, caching=False), CHUNK, MAX_RUNNING), light,
            "paged, light, prefix caching off",
        )  # fmt: skip
    caching = {
        label: {f"{key}_caching_{state}": summary[key] for state, summary in (("on", on), ("off", off))
                for key in ("ttft_system_p50_ms", "ttft_system_p95_ms")}
        for label, on, off in (("load", paged_summary, uncached_summary),
                               ("light", light_summary, light_uncached_summary))
    }  # fmt: skip
    for label, values in caching.items():
        print(f"system-prompt TTFT, {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    results = {"setup": {"layers": setup.layers, "ctx": setup.ctx, "requests": args.requests},
               "decode_vs_fill_ms": fills, "prefill_lengths": [*PREFILL_LENGTHS, CHUNK], "ttft_alone_ms": ttft, "original": original_summary,
               "paged": paged_summary, "paged_prefix_caching_off": uncached_summary,
               "paged_burst": burst_summary, "paged_light": light_summary,
               "paged_light_prefix_caching_off": light_uncached_summary,
               "system_prompt_ttft_prefix_caching_on_vs_off": caching,
               "total_wall_s": time.perf_counter() - started, "load_average_before": load_before,
               "load_average_after": Path("/proc/loadavg").read_text().split()[0] if load_before != "?" else "?"}  # fmt: skip
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.png:
        runs = {f"original (8 cache rows), {args.rate:g} req/s": original_served,
                f"paged ({setup.pool}-block pool), {args.rate:g} req/s": paged_served}  # fmt: skip
        plot(args.png, fills, runs, {f"paged, {args.light_rate:g} req/s": light_served},
             {f"paged, prefix caching off, {args.rate:g} req/s": uncached_served})  # fmt: skip


if __name__ == "__main__":
    main()
