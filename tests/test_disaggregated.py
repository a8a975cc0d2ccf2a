"""Disaggregated serving (issue 9): a sequence prefilled by the paged prefill-only graph is
decoded by the paged decode graph of the same model, from the same pools and the same block
table, bit for bit as the original pair does it (docs/disaggregated.md is the hand-off).

The pair comes from the builder in QEfficient's two shapes: ``prefill_only`` (``CtxScatter``
only, attention within the chunk) and the decode graph, with the same weights. The original
pair hands the prefill graph's retained states to the decode graph; the paged pair hands over
nothing but the pools and the block manager's table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from paged_rewrite import rewrite
from paged_rewrite.builder import ExportSpec, build_qeff_export
from paged_rewrite.runtime.block_manager import NULL_BLOCK, BlockManager, shuffled_order
from paged_rewrite.runtime.runners import PagedRunner, Row
from paged_rewrite.runtime.sessions import open_session

CTX_LEN = 128
PROMPT_LEN = 37  # one prefill chunk of exactly the prompt; crosses 16- and 32-token pages
NUM_DECODE = 30  # ends at position 66: decode allocates new blocks on the way
SPEC = ExportSpec(seed=11)
SEQ = "A"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("disaggregated")
    prefill, decode = folder / "prefill.onnx", folder / "decode.onnx"
    onnx.save(build_qeff_export(ExportSpec(seed=SPEC.seed, prefill_only=True)), prefill)
    onnx.save(build_qeff_export(SPEC), decode)
    return prefill, decode


def _prompt() -> np.ndarray:
    return np.random.default_rng(5).integers(0, SPEC.vocab_size, PROMPT_LEN).astype(np.int64)


def _original_pair(prefill: Path, decode: Path) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Logits of the prefill call and of every greedy decode step, and the retained states after
    the prefill: the original prefill-only graph's retained states are the decode graph's caches."""
    prefill_session = open_session(prefill, patch_sentinels=True)
    decode_session = open_session(decode, patch_sentinels=True)
    names = [i.name for i in decode_session.get_inputs() if i.name.startswith("past_")]
    shape = (1, SPEC.num_kv_heads, CTX_LEN, SPEC.head_dim)
    caches = {name: np.zeros(shape, np.float32) for name in names}
    outputs = ["logits", *(f"{name}_RetainedState" for name in names)]

    def call(session: object, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids[None], "position_ids": positions[None], **caches}
        logits, *retained = session.run(outputs, feeds)  # type: ignore[attr-defined]
        caches.update(zip(names, retained, strict=True))
        return np.asarray(logits[:, -1])

    logits = [call(prefill_session, _prompt(), np.arange(PROMPT_LEN))]
    after_prefill = dict(caches)
    for t in range(NUM_DECODE):
        token = np.array([logits[-1].argmax()], np.int64)
        logits.append(call(decode_session, token, np.array([PROMPT_LEN + t])))
    return logits, after_prefill


def _logical(pool: np.ndarray, blocks: list[int], length: int, block_size: int) -> np.ndarray:
    """Positions ``[0, length)`` of a sequence, ``[heads, length, head_dim]``, read through its table."""
    return np.stack([pool[blocks[p // block_size], :, p % block_size] for p in range(length)], axis=1)


def test_prefill_only_graph_is_qeff_shaped_and_shares_the_weights(pair: tuple[Path, Path]) -> None:
    prefill, decode = (onnx.load(p) for p in pair)
    onnx.checker.check_model(str(pair[0]), full_check=True)
    assert [f.name for f in prefill.functions] == ["CustomRMSNorm", "CtxScatter"]
    ops = [n.op_type for n in prefill.graph.node if n.domain == "com.qualcomm.cloud"]
    assert ops == ["CtxScatter"] * 2 * SPEC.num_layers  # writes only: the cache is never read back
    assert [i.name for i in prefill.graph.input] == [i.name for i in decode.graph.input]
    assert [o.name for o in prefill.graph.output] == [o.name for o in decode.graph.output]
    weights = {t.name: t.SerializeToString() for t in decode.graph.initializer}
    assert {t.name: t.SerializeToString() for t in prefill.graph.initializer} == weights


def test_prefill_only_graph_prefills_as_the_decode_graph_does(pair: tuple[Path, Path]) -> None:
    """The prefill graph is a faithful prefill: the decode graph run on the same chunk agrees."""
    prefill, decode = (open_session(p, patch_sentinels=True) for p in pair)
    names = [i.name for i in decode.get_inputs() if i.name.startswith("past_")]
    feeds = {"input_ids": _prompt()[None], "position_ids": np.arange(PROMPT_LEN)[None]}
    feeds |= {n: np.zeros((1, SPEC.num_kv_heads, CTX_LEN, SPEC.head_dim), np.float32) for n in names}
    for a, b in zip(prefill.run(None, feeds), decode.run(None, feeds), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kv_block_size", [16, 32])
def test_paged_prefill_then_paged_decode_matches_the_original_pair(
    pair: tuple[Path, Path], tmp_path: Path, kv_block_size: int
) -> None:
    want, original_caches = _original_pair(*pair)
    paged_prefill, paged_decode = tmp_path / "prefill.onnx", tmp_path / "decode.onnx"
    for source, target in zip(pair, (paged_prefill, paged_decode), strict=True):
        rewrite(source, target, kv_block_size, ctx_len=CTX_LEN)
    num_kv_blocks = CTX_LEN // kv_block_size

    # One pool per cache tensor, shared by both graphs; blocks handed out in shuffled order.
    # The pools start as noise: whatever a recycled block held must not leak into the logits,
    # and any stray write shows.
    num_blocks = 1 + -(-(PROMPT_LEN + NUM_DECODE) // kv_block_size) + 3
    manager = BlockManager(num_blocks, kv_block_size, shuffled_order(num_blocks, seed=kv_block_size))
    prefill_runner = PagedRunner(paged_prefill, manager, num_kv_blocks)
    rng = np.random.default_rng(kv_block_size)
    prefill_runner.pools = {
        name: rng.standard_normal(pool.shape).astype(pool.dtype)
        for name, pool in prefill_runner.pools.items()
    }
    initial = {name: pool.copy() for name, pool in prefill_runner.pools.items()}

    got = [prefill_runner.step([Row(SEQ, _prompt(), np.arange(PROMPT_LEN))])]
    blocks = manager.blocks_of(SEQ)
    for name, pool in prefill_runner.pools.items():  # the pools now hold what the original retained
        written = original_caches[name][0, :, :PROMPT_LEN]
        assert np.array_equal(_logical(pool, blocks, PROMPT_LEN, kv_block_size), written), name

    # The hand-off: the decode graph takes the same pools and the same block manager (table).
    decode_runner = PagedRunner(paged_decode, manager, num_kv_blocks)
    assert [c.input for c in decode_runner.caches] == [c.input for c in prefill_runner.caches]
    decode_runner.pools = prefill_runner.pools
    for t in range(NUM_DECODE):
        token = np.array([got[-1].argmax()], np.int64)
        got.append(decode_runner.step([Row(SEQ, token, np.array([PROMPT_LEN + t]))]))

    for step, (w, g) in enumerate(zip(want, got, strict=True)):
        assert np.array_equal(w, g), f"step {step} ({'prefill' if step == 0 else 'decode'})"
    assert manager.length_of(SEQ) == PROMPT_LEN + NUM_DECODE
    for runner in (prefill_runner, decode_runner):
        assert all(not r.foreign_blocks_changed for r in runner.isolation)

    # Outside the sequence's written slots and the null block, no pool byte changed.
    owned = manager.blocks_of(SEQ)
    written = {(owned[p // kv_block_size], p % kv_block_size) for p in range(PROMPT_LEN + NUM_DECODE)}
    changed = {
        (name, block, slot)
        for name, pool in decode_runner.pools.items()
        for block, slot in zip(*np.nonzero((pool != initial[name]).any(axis=(1, 3))), strict=True)
        if block != NULL_BLOCK and (block, slot) not in written
    }
    assert not changed
