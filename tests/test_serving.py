"""The continuous-batching server loop (``runtime.serving``) on the real CB export and its paged
rewrite: every request is served in full, the original is bounded by its cache rows, the paged
model by its pool (admission reserves each request's blocks, so nothing is ever preempted)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import CTX_LEN

from paged_rewrite.runtime import serving
from paged_rewrite.runtime.block_manager import BlockManager
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner
from paged_rewrite.runtime.serving import Request, Server

BLOCK = 16


def _requests() -> list[Request]:
    rng = np.random.default_rng(4)
    lengths = [40, 9, 70, 23, 55, 12]
    return [Request(f"r{i}", rng.integers(0, 200, n), 5) for i, n in enumerate(lengths)]  # all at once


def _recorded(runner: PagedRunner | ContiguousRunner) -> list[tuple[str, list, np.ndarray]]:
    """Record every call of ``runner``: its kind, each row's (sequence, last position), logits."""
    calls: list[tuple[str, list, np.ndarray]] = []
    step = runner.step

    def recording(rows, phase=None):  # type: ignore[no-untyped-def]
        logits = step(rows, phase)
        calls.append((phase, [(r.seq, int(r.position_ids.max())) for r in rows], logits))
        return logits

    runner.step = recording  # type: ignore[method-assign]
    return calls


def prefill_call_lengths(runner: PagedRunner | ContiguousRunner) -> list[int]:
    """The length of every prefill call ``runner`` makes from now on, as they are made."""
    lengths: list[int] = []
    step = runner.step

    def recording(rows, phase=None):  # type: ignore[no-untyped-def]
        if phase == "prefill":
            lengths.append(len(rows[0].input_ids))
        return step(rows, phase)

    runner.step = recording  # type: ignore[method-assign]
    return lengths


def test_original_and_paged_serve_every_request(paged_fixture) -> None:
    original, paged, _ = paged_fixture("llama_cb", BLOCK)
    contiguous = Server(ContiguousRunner(original, {"ctx_len": CTX_LEN, "full_batch_size": 4}), 32, 64)
    runner = PagedRunner(paged, BlockManager(40, BLOCK, prefix_caching=True), CTX_LEN // BLOCK)
    pooled = Server(runner, 32, 64)
    served = {name: {s.request.name: s for s in server.run(_requests())} for name, server in
              (("original", contiguous), ("paged", pooled))}  # fmt: skip
    for results in served.values():
        assert sorted(results) == [f"r{i}" for i in range(6)]
        assert all(len(s.tokens) == 5 and s.finished_at >= s.first_token_at >= s.request.arrival
                   for s in results.values())  # fmt: skip
    # Different batches (the paged model runs 6 at once, decoding live rows only), same greedy tokens.
    assert all(served["original"][n].tokens == served["paged"][n].tokens for n in served["paged"])
    assert contiguous.peak_running == 4 and pooled.peak_running == 6  # cache rows vs pool blocks
    assert all(not r.foreign_blocks_changed for r in runner.isolation)
    decode_widths = [s.table_columns for s in pooled.steps if s.kind == "decode"]
    assert decode_widths and max(decode_widths) <= 8 and min(decode_widths) < 8  # narrowed tables


def test_in_the_originals_batches_the_paged_model_gives_its_logits_bit_for_bit(paged_fixture) -> None:
    """The paged server held to the original's batches: 4 requests at most, every decode call
    padded to 4 rows. Then the two servers make the same calls (same rows, same positions, same
    order), and every call's logits are equal bit for bit, so every token is too."""
    original, paged, _ = paged_fixture("llama_cb", BLOCK)
    contiguous = ContiguousRunner(original, {"ctx_len": CTX_LEN, "full_batch_size": 4})
    runner = PagedRunner(paged, BlockManager(40, BLOCK, prefix_caching=True), CTX_LEN // BLOCK)
    calls = {"original": _recorded(contiguous), "paged": _recorded(runner)}
    servers = {"original": Server(contiguous, 32, 64), "paged": Server(runner, 32, 4, decode_rows=4)}
    served = {
        name: {s.request.name: s.tokens for s in server.run(_requests())} for name, server in servers.items()
    }
    assert served["original"] == served["paged"] and all(len(t) == 5 for t in served["paged"].values())
    assert [c[:2] for c in calls["original"]] == [c[:2] for c in calls["paged"]]
    assert sum(kind == "decode" for kind, _, _ in calls["paged"]) > 1
    for (kind, rows, want), (_, _, got) in zip(calls["original"], calls["paged"], strict=True):
        live = [index for index, (seq, _) in enumerate(rows) if seq is not None]
        assert np.array_equal(got[live], want[live]), (kind, rows)
    assert all(len(rows) == 4 for kind, rows, _ in calls["paged"] if kind == "decode")
    with pytest.raises(ValueError, match="below max_running"):
        Server(runner, 32, 8, decode_rows=4)


def test_admission_waits_for_blocks_and_never_runs_out(paged_fixture) -> None:
    _, paged, _ = paged_fixture("llama_cb", BLOCK)
    runner = PagedRunner(paged, BlockManager(12, BLOCK), CTX_LEN // BLOCK, check_isolation=False)
    server = Server(runner, 32, 64)  # 11 blocks: the two longest requests (5 blocks each) never fit together
    results = server.run(_requests())
    assert len(results) == 6 and all(len(s.tokens) == 5 for s in results)
    assert server.peak_running < 6
    assert runner.manager.num_free_blocks == 11  # every block back in the pool


def test_a_request_larger_than_the_pool_is_refused(paged_fixture) -> None:
    _, paged, _ = paged_fixture("llama_cb", BLOCK)
    server = Server(PagedRunner(paged, BlockManager(4, BLOCK), CTX_LEN // BLOCK), 32, 64)
    with pytest.raises(ValueError, match="does not fit the KV budget even alone"):
        server.run([Request("big", np.arange(60), 10)])  # 5 blocks, the pool has 3


def test_a_request_arriving_as_the_server_empties_is_admitted(paged_fixture, monkeypatch) -> None:
    """The last running request finishes in the same iteration as the next one arrives: the
    newcomer is admitted on the next pass, not taken for one that can never fit. Every call takes
    one second here (a fake clock): "a" prefills in [0, 1), decodes in [1, 2) and leaves at 2; "b"
    arrives at 1.5, while "a" runs."""
    ticks = itertools.count()
    monkeypatch.setattr(serving.time, "perf_counter", lambda: float(next(ticks)))  # 0, 1, 2, ...: 1 s a call
    _, paged, _ = paged_fixture("llama_cb", BLOCK)
    server = Server(PagedRunner(paged, BlockManager(12, BLOCK), CTX_LEN // BLOCK), 32, 64)
    done = server.run([Request("a", np.arange(20), 2, 0.0), Request("b", np.arange(30), 2, 1.5)])
    assert [(s.request.name, s.finished_at) for s in done] == [("a", 2.0), ("b", 4.0)]


def test_prefill_calls_shrink_to_the_shortest_compiled_length_that_holds_them(paged_fixture) -> None:
    """With prefill lengths 8 and 16 besides the 32-token chunk, a prompt's last chunk is padded to
    the shortest length that holds it; every request still gets the tokens it gets with
    full-chunk padding, on the original as on the paged model."""
    original, paged, _ = paged_fixture("llama_cb", BLOCK)

    def serve(runner: PagedRunner | ContiguousRunner, lengths: tuple[int, ...]) -> tuple[dict, list[int]]:
        prefill_lengths = prefill_call_lengths(runner)
        server = Server(runner, 32, 4, prefill_lengths=lengths)
        return {s.request.name: s.tokens for s in server.run(_requests())}, prefill_lengths

    def paged_runner() -> PagedRunner:
        return PagedRunner(paged, BlockManager(40, BLOCK), CTX_LEN // BLOCK)

    def contiguous_runner() -> ContiguousRunner:
        return ContiguousRunner(original, {"ctx_len": CTX_LEN, "full_batch_size": 4})

    full, full_lengths = serve(paged_runner(), ())
    fitted, fitted_lengths = serve(paged_runner(), (8, 16))
    assert set(full_lengths) == {32}
    # prompts 40, 9, 70, 23, 55, 12 tokens: chunks of 32, the last one as short as it may be
    per_prompt = [[32, 8], [16], [32, 32, 8], [32], [32, 32], [16]]
    assert sorted(fitted_lengths) == sorted(n for chunks in per_prompt for n in chunks)
    assert fitted == full
    assert serve(contiguous_runner(), (8, 16))[0] == full
    with pytest.raises(ValueError, match="must lie in"):
        Server(paged_runner(), 32, 4, prefill_lengths=(64,))


def test_what_a_prefix_hit_leaves_is_prefilled_at_the_shortest_length(paged_fixture) -> None:
    """B shares A's first 48 tokens (3 blocks): with prefix caching B prefills only its last 9
    tokens, in one 16-token call (lengths 8, 16 beside the 32-token chunk), and gets the tokens
    an uncached server with full-chunk padding gives it."""
    _, paged, _ = paged_fixture("llama_cb", BLOCK)
    rng = np.random.default_rng(9)
    a = rng.integers(0, 200, 70)
    b = np.r_[a[:48], rng.integers(0, 200, 9)]
    runner = PagedRunner(paged, BlockManager(40, BLOCK, prefix_caching=True), CTX_LEN // BLOCK)
    lengths = prefill_call_lengths(runner)
    server = Server(runner, 32, 4, prefill_lengths=(8, 16))
    served = {s.request.name: s for s in server.run([Request("A", a, 4, 0.0), Request("B", b, 4, 1e6)])}
    assert served["B"].cached_tokens == 48
    assert lengths == [32, 32, 8, 16]  # A: 32 + 32 + 6 (padded to 8); B: its 9 uncached tokens
    cold = PagedRunner(paged, BlockManager(40, BLOCK), CTX_LEN // BLOCK)
    (alone,) = Server(cold, 32, 4, prefill_lengths=()).run([Request("B", b, 4)])
    assert served["B"].tokens == alone.tokens
