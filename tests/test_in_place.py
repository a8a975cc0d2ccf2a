"""KV caches updated in place (``runtime.in_place``): the same logits and caches as the default
copy-per-step run, on the original CB export and its paged rewrite; refused where the cache
input is read by more than its scatter (a layer function receives it)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CTX_LEN

from paged_rewrite.errors import UnsupportedPatternError
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import Scenario, drive, random_scenario
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner


def test_in_place_steps_equal_copying_steps(paged_fixture) -> None:
    original, paged, _ = paged_fixture("llama_cb", 16)
    scenario = random_scenario(256, [45, 9], 12, 32, seed=7)
    dims = {"ctx_len": CTX_LEN, "full_batch_size": 4}
    runs = []
    for in_place in (False, True):
        manager = BlockManager(12, 16, shuffled_order(12, 3))
        paged_runner = PagedRunner(paged, manager, CTX_LEN // 16, in_place=in_place)
        contiguous = ContiguousRunner(original, dims, in_place=in_place)
        steps = drive([contiguous, paged_runner], Scenario(scenario.sequences))
        assert all(np.array_equal(*step.logits) for step in steps)
        assert all(not r.foreign_blocks_changed for r in paged_runner.isolation)  # still checked
        runs.append((steps, paged_runner.pools, contiguous.kv_view("A")))
    (copied, copied_pools, copied_kv), (in_place_steps, pools, kv) = runs
    for a, b in zip(copied, in_place_steps, strict=True):
        assert np.array_equal(a.logits[1], b.logits[1])
    # Block 0 takes every write that must not land; which of several lands last is not defined.
    assert all(np.array_equal(copied_pools[name][1:], pools[name][1:]) for name in pools)
    # The original's padding goes to its last slot, as several writes: compare what A wrote.
    assert all(np.array_equal(copied_kv[name][:, :, :57], kv[name][:, :, :57]) for name in kv)


def test_in_place_is_refused_when_a_function_receives_the_cache(paged_fixture) -> None:
    _, paged, _ = paged_fixture("llama_subfunctions", 16)
    with pytest.raises(UnsupportedPatternError, match="cannot update the KV caches in place"):
        PagedRunner(paged, BlockManager(8, 16), CTX_LEN // 16, in_place=True)
