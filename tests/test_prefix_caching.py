"""Prefix caching end to end: full blocks of a prefilled prompt are named by content (a hash
chain), kept with the cache's own reference after their request leaves, evicted least recently
used first under pool pressure, and a new request whose prompt starts with them skips their
prefill — with logits equal, bit for bit, to the uncached run on the real exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CTX_LEN, DIMS, feature_manifest, fixture_model
from derived_models import with_lora_ids
from models import qeff_export

from paged_rewrite import rewrite
from paged_rewrite.errors import UnsupportedPatternError
from paged_rewrite.runtime.block_manager import BlockManager, OutOfBlocksError, shuffled_order
from paged_rewrite.runtime.driver import chunk_row
from paged_rewrite.runtime.extra_inputs import ExtraInputs
from paged_rewrite.runtime.prefix_cache import block_hashes
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner, Row
from paged_rewrite.runtime.serving import Request, Server

BLOCK = 16
SHARED = 64  # the common prefix: 4 blocks, 2 prefill chunks of 32
CHUNK = 32


def test_block_hashes_chain_the_prefix() -> None:
    tokens = np.arange(50)
    hashes = list(block_hashes(tokens, 16))
    assert len(hashes) == 3  # the partial tail has no name
    other = tokens.copy()
    other[0] = 999  # the first block differs: so does every later name, though their tokens agree
    assert all(a != b for a, b in zip(hashes, block_hashes(other, 16), strict=True))
    assert list(block_hashes(tokens[:48], 16)) == hashes


def test_match_reference_counts_and_lru_eviction() -> None:
    manager = BlockManager(9, 4, prefix_caching=True)  # 8 usable blocks of 4 tokens
    prompt = np.arange(10)
    assert manager.match_prefix("A", prompt) == 0
    manager.append("A", 10)  # A prefilled 10 tokens: blocks 1, 2, 3 (the third holds 2)
    manager.cache_prompt("A", prompt)
    assert len(manager.prefix_cache or []) == 2  # two full blocks named
    # B shares the 8-token prefix; a whole-prompt hit still leaves the last token to compute.
    assert manager.match_prefix("B", np.r_[prompt[:8], 50, 51]) == 8
    assert manager.blocks_of("B") == manager.blocks_of("A")[:2]
    assert manager.match_prefix("C", prompt[:8]) == 4
    manager.free("A")
    manager.free("B")
    manager.free("C")
    assert manager.num_used_blocks == 2 and manager.num_available_blocks == 8  # cached, idle, reusable
    # Pool pressure: 7 blocks for D leave only 1 free, so the least recently released cached
    # block goes (A's second block: released after the first, but B and C released the first later).
    manager.append("D", 28)
    assert manager.num_free_blocks == 0 and len(manager.prefix_cache or []) == 1
    assert manager.match_prefix("E", prompt) == 4  # the first block is still cached
    with pytest.raises(OutOfBlocksError):
        manager.append("D", 8)


def test_a_cached_block_a_sequence_holds_is_never_evicted() -> None:
    """B takes A's two cached blocks; they are then not idle, so pool pressure cannot evict them:
    an allocation that finds only B's blocks cached fails rather than take one from under B."""
    manager = BlockManager(5, 4, prefix_caching=True)  # 4 usable blocks of 4 tokens
    prompt = np.arange(9)
    manager.match_prefix("A", prompt)
    manager.append("A", 9)  # 3 blocks, 2 of them full
    manager.cache_prompt("A", prompt)
    manager.free("A")
    assert manager.num_available_blocks == 4  # 2 free, 2 cached and idle
    assert manager.match_prefix("B", prompt) == 8
    assert manager.num_available_blocks == 2  # B holds the cached ones now
    manager.append("C", 8)  # the two free blocks
    with pytest.raises(OutOfBlocksError):
        manager.append("C", 1)
    assert len(manager.prefix_cache or []) == 2 and manager.cached_prefix(prompt) == manager.blocks_of("B")
    manager.free("B")  # now only the cache holds them: the next allocation may take one
    manager.append("C", 1)
    assert len(manager.prefix_cache or []) == 1


@pytest.fixture(scope="module")
def builder_paged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prefix_builder")
    paged = folder / "paged.onnx"
    rewrite(qeff_export(folder / "model.onnx"), paged, BLOCK, ctx_len=CTX_LEN)
    return paged


def test_a_refused_admission_leaves_the_eviction_order_alone(
    builder_paged: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a then b leave two cached blocks each (a's released first: the least recently used). "big"
    is admitted and needs the whole pool, so as it prefills it evicts the two least recently used
    cached blocks. "c" arrives with it, starts with a's prompt, and is refused every iteration
    while big runs (the pool is big's): looking at a's blocks for that check is not using them,
    so big evicts a's blocks, not b's, and c, admitted after big, finds nothing cached."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 200, 33), rng.integers(0, 200, 33)  # 2 full blocks each + 1 token
    manager = BlockManager(11, BLOCK, prefix_caching=True)  # 10 usable blocks
    server = Server(PagedRunner(builder_paged, manager, CTX_LEN // BLOCK, check_isolation=False), CHUNK, 8)
    server.run([Request("a", a, 1, 0.0), Request("b", b, 1, 1.0)])
    cached = {name: manager.cached_prefix(np.r_[prompt, 0]) for name, prompt in (("a", a), ("b", b))}
    assert [len(blocks) for blocks in cached.values()] == [2, 2] and manager.num_free_blocks == 6
    evicted: list[int] = []
    cache = manager.prefix_cache
    assert cache is not None
    evict = cache.evict
    monkeypatch.setattr(cache, "evict", lambda: evicted.append(evict()) or evicted[-1])

    big = Request("big", rng.integers(0, 200, 120), 2, 10.0)  # 8 blocks: the 6 free + 2 evicted
    c = Request("c", np.r_[a[:32], rng.integers(0, 200, 11)], 1, 10.0)  # 3 blocks, 2 of them a's
    served = {s.request.name: s for s in server.run([big, c])}
    assert served["c"].admitted_at >= served["big"].finished_at  # refused while big ran
    assert sorted(evicted[:2]) == sorted(cached["a"])  # big's evictions: a's, the least recently used
    assert served["c"].cached_tokens == 0


@pytest.fixture(scope="module")
def shared_prompts() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    prefix = rng.integers(0, 200, SHARED)
    return {name: np.r_[prefix, rng.integers(0, 200, n)] for name, n in (("A", 20), ("B", 25))}


def _serve(
    runner: PagedRunner | ContiguousRunner, name: str, prompt: np.ndarray, start: int, decode: np.ndarray
) -> list[np.ndarray]:
    """Prefill ``prompt`` from ``start`` in 32-token chunks, then decode the given tokens."""
    logits = []
    for first in range(start, len(prompt), CHUNK):
        logits.append(runner.step([chunk_row(name, prompt, first, CHUNK)], "prefill"))
    for t, token in enumerate(decode):
        row = Row(name, np.array([token]), np.array([len(prompt) + t]))
        logits.append(runner.step([row], "decode"))
    return logits


@pytest.mark.parametrize(
    ("name", "corpus"),
    [("llama_default", "qeff"), ("llama_cb", "qeff"), ("qwen2_cb", "features"), ("llama4_text", "features")],
)
def test_a_prefix_hit_gives_the_uncached_logits(
    paged_fixture, paged_feature_fixture, shared_prompts: dict[str, np.ndarray], name: str, corpus: str
) -> None:
    """A prefills S + a, offers its blocks, decodes and leaves. B = S + b starts on A's four
    cached blocks and prefills from position 64: the same calls as B's uncached run from there on
    (its chunks start at 0, 32, 64), so its logits equal the uncached run's and the original's."""
    if corpus == "qeff":
        original, paged, _ = paged_fixture(name, BLOCK)
    else:
        original, paged = paged_feature_fixture(name, BLOCK)
    dims = {"ctx_len": CTX_LEN, "full_batch_size": 4}
    decode = np.random.default_rng(2).integers(0, 200, 8)
    a, b = shared_prompts["A"], shared_prompts["B"]

    cached = PagedRunner(paged, BlockManager(20, BLOCK, shuffled_order(20, 5), prefix_caching=True), 8)
    assert cached.start("A", a) == 0
    _serve(cached, "A", a, 0, decode[:3])
    cached.cache_prompt("A", a)
    shared_blocks = cached.manager.blocks_of("A")[:4]
    cached.release("A")
    assert cached.start("B", b) == SHARED
    assert cached.manager.blocks_of("B") == shared_blocks  # the same physical blocks, not copies
    hit = _serve(cached, "B", b, SHARED, decode)

    uncached = PagedRunner(paged, BlockManager(20, BLOCK, shuffled_order(20, 6)), 8)
    cold = _serve(uncached, "B", b, 0, decode)
    contiguous = _serve(ContiguousRunner(original, dims), "B", b, 0, decode)
    assert len(hit) == len(cold) - SHARED // CHUNK
    for got, want, reference in zip(hit, cold[SHARED // CHUNK :], contiguous[SHARED // CHUNK :], strict=True):
        assert np.array_equal(got, want) and np.array_equal(got, reference)
    assert all(not r.foreign_blocks_changed for r in cached.isolation)


def test_the_server_skips_cached_prefill_and_serves_the_same_tokens(
    paged_fixture, shared_prompts: dict[str, np.ndarray]
) -> None:
    _, paged, _ = paged_fixture("llama_default", BLOCK)
    requests = [Request("A", shared_prompts["A"], 6, 0.0), Request("B", shared_prompts["B"], 6, 1e6)]
    served = {}
    for caching in (True, False):
        runner = PagedRunner(paged, BlockManager(20, BLOCK, prefix_caching=caching), 8, check_isolation=False)
        server = Server(runner, CHUNK, max_running=4)
        served[caching] = {s.request.name: s for s in server.run(requests)}
        prefills = [s for s in server.steps if s.kind == "prefill"]
        assert len(prefills) == (4 if caching else 6)  # B: one chunk instead of three
    assert served[True]["B"].cached_tokens == SHARED and served[False]["B"].cached_tokens == 0
    for name in "AB":
        assert served[True][name].tokens == served[False][name].tokens
        assert len(served[True][name].tokens) == 6


def test_prefix_caching_is_refused_where_blocks_are_not_content(tmp_path: Path) -> None:
    """With --shared-window-table, gpt_oss layer 0 is a 32-slot ring in the first table columns:
    those blocks hold the last 32 positions, rewritten as the sequence grows, named by nothing the
    full group's hash chain can see. (With its own table the ring group caches per window:
    tests/test_window_groups.py.)"""
    paged = tmp_path / "paged.onnx"
    rewrite(fixture_model("gpt_oss_swa_moe"), paged, BLOCK, ctx_len=CTX_LEN, dims=DIMS["gpt_oss_swa_moe"],
            shared_window_table=True)  # fmt: skip
    manager = BlockManager(20, BLOCK, prefix_caching=True)
    with pytest.raises(UnsupportedPatternError, match="ring-buffer layers overwrite the first table columns"):
        PagedRunner(paged, manager, CTX_LEN // BLOCK, DIMS["gpt_oss_swa_moe"])


def test_prefix_caching_is_refused_with_non_kv_retained_states(paged_feature_fixture) -> None:
    """Llava's language decoder feeds back ``vision_embeds``: image tokens' K/V depend on it, so
    equal token ids do not make equal blocks. The same runner without prefix caching is fine."""
    _, paged = paged_feature_fixture("llava_lang_kv_offload", BLOCK)
    context = feature_manifest("llava_lang_kv_offload")["scenario"]["ctx_len"]
    PagedRunner(paged, BlockManager(20, BLOCK), context // BLOCK)
    with pytest.raises(UnsupportedPatternError, match="non-KV retained states"):
        PagedRunner(paged, BlockManager(20, BLOCK, prefix_caching=True), context // BLOCK)


def test_prefix_caching_is_refused_with_lora_ids(tmp_path: Path) -> None:
    """A ``lora_ids`` input: each row's K/V follow its adapter, not its tokens alone. (The
    corpus's LoRA export does not load in onnxruntime; this is the builder's, with the input.)"""
    paged = tmp_path / "paged.onnx"
    rewrite(
        with_lora_ids(qeff_export(tmp_path / "model.onnx"), tmp_path / "lora.onnx"),
        paged,
        BLOCK,
        ctx_len=CTX_LEN,
    )
    lora = ExtraInputs(lora_ids={"A": 2})
    runner = PagedRunner(paged, BlockManager(20, BLOCK), CTX_LEN // BLOCK, extra_inputs=lora)
    assert runner.extra_names == ["lora_ids"]
    runner.step([Row("A", np.arange(5), np.arange(5))])  # it runs, with its adapter id fed
    with pytest.raises(UnsupportedPatternError, match="LoRA adapter"):
        PagedRunner(paged, BlockManager(20, BLOCK, prefix_caching=True), CTX_LEN // BLOCK, extra_inputs=lora)


def test_an_evicted_prefix_is_recomputed_exactly(
    paged_fixture, shared_prompts: dict[str, np.ndarray]
) -> None:
    """Under pressure the cached prefix is evicted: B then misses and prefills from 0, with the
    same logits as a run that never cached anything."""
    _, paged, _ = paged_fixture("llama_default", BLOCK)
    a, b = shared_prompts["A"], shared_prompts["B"]
    runner = PagedRunner(paged, BlockManager(9, BLOCK, prefix_caching=True), 8)
    runner.start("A", a)
    _serve(runner, "A", a, 0, [])
    runner.cache_prompt("A", a)
    runner.release("A")
    other = np.arange(120) % 200  # 8 blocks: the whole pool, so all 5 of A's cached blocks go
    runner.start("X", other)
    _serve(runner, "X", other, 0, [])
    runner.release("X")
    assert runner.start("B", b) == 0  # the chain's first block was evicted: nothing matches
    fresh = PagedRunner(paged, BlockManager(9, BLOCK), 8)
    for got, want in zip(_serve(runner, "B", b, 0, [5, 6]), _serve(fresh, "B", b, 0, [5, 6]), strict=True):
        assert np.array_equal(got, want)
