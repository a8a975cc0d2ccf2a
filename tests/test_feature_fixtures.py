"""Parity of paged rewrites with their originals on the feature corpus
(``../shared/fixtures/qeff-features``): compute-context-length (CCL), the speculative-decoding
target model (TLM), prefill-only with a write-only ring layer, ``kv_cache_prefix`` names,
``retain_full_kv``, Gemma 2 with its window crossed, Llama 4 chunked attention, the Llava language
decoder (``vision_embeds`` retained state, ``image_idx``) and continuous batching.

Each fixture's own reference scenario (``reference.npz``) runs as the corpus's
``tools/replay_ort.py`` runs it — each sequence alone at batch 1, its prefill chunks then its
decode steps; the CB fixture's decode in its 4-row layout — through the original (sentinels
patched) and the paged model (one pool, blocks handed out in shuffled order, tables narrowed per
step to the smallest context bucket covering the call; at block size 32 also with the full table
every step), with the extra inputs fed by ``ExtraInputs``. Same calls, same batches: the logits
must be equal bit for bit, agree with the corpus's own onnxruntime logits, and with HF on the rows
where the original does.
The prefill-only fixture returns one logits row per sequence; its proof is the final KV, read
back through the block table and compared with the original's final retained states.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import (
    FEATURE_FIXTURES,
    RUNNABLE_FEATURE_FIXTURES,
    feature_dims,
    feature_fixture_model,
    feature_manifest,
)
from onnx import TensorProto, helper

from paged_rewrite import rewrite
from paged_rewrite.runtime.block_manager import BlockManager, shuffled_order
from paged_rewrite.runtime.driver import Scenario, SequenceScript, drive, prefill_rows
from paged_rewrite.runtime.extra_inputs import CompCtxSchedule, ExtraInputs, UnknownInputError
from paged_rewrite.runtime.runners import ContiguousRunner, PagedRunner, Row
from paged_rewrite.runtime.sessions import sentinel_overrides
from paged_rewrite.runtime.states import CacheIO, OtherStates
from paged_rewrite.runtime.verify import PagedGeometry, final_kv_diff, verify

BLOCK_SIZES = [16, 32, 128]
# gpt_oss_prefill_only's context is 64 tokens; a 128-token block is refused as larger than it.
BLOCK_SIZES_OF = {"gpt_oss_prefill_only": [16, 32, 64]}
# Tables narrowed per step at every block size, and the full table at block size 32.
CASES = [
    (name, bs, False) for name in RUNNABLE_FEATURE_FIXTURES for bs in BLOCK_SIZES_OF.get(name, BLOCK_SIZES)
] + [(name, 32, True) for name in RUNNABLE_FEATURE_FIXTURES]
ORT_TOLERANCE = 1e-5  # the corpus's logits come from another onnxruntime build


def _reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FEATURE_FIXTURES / name / "reference.npz") as ref:
        return {key: ref[key] for key in ref.files}


def feature_index() -> dict:  # type: ignore[type-arg]
    return json.loads((FEATURE_FIXTURES / "INDEX.json").read_text())


def reference_scenario(ref: dict[str, np.ndarray], manifest: dict) -> Scenario:  # type: ignore[type-arg]
    """The fixture's calls: prompts from the prefill chunks, teacher-forced decode tokens (``[n]``,
    or ``[n, k]`` for TLM's k-token steps); CB decodes in the fixture's row layout."""
    names = manifest["scenario"]["sequences"]
    scripts = []
    for s in names:
        ids, pos = ref[f"{s}_prefill_input_ids"][:, 0].ravel(), ref[f"{s}_prefill_position_ids"][:, 0].ravel()
        prompt = ids[pos >= 0]
        assert np.array_equal(pos[pos >= 0], np.arange(len(prompt)))
        tokens = ref[f"{s}_decode_input_ids"][:, 0]  # [n, k]
        script = SequenceScript(s, prompt, len(tokens), tokens[:, 0] if tokens.shape[1] == 1 else tokens)
        for t in range(script.num_decode):  # the driver's positions are the fixture's
            assert np.array_equal(script.decode_row(t, 0).position_ids, ref[f"{s}_decode_position_ids"][t, 0])
        scripts.append(script)
    chunk_len = ref[f"{names[0]}_prefill_input_ids"].shape[-1]
    if not manifest["variant"]["continuous_batching"]:
        return Scenario(scripts, chunk_len=chunk_len, schedule="sequential")
    layout: list[str | None] = [None] * manifest["scenario"]["full_batch_size"]
    for s, slot in zip(names, ref["cb_slots"], strict=True):
        layout[int(slot)] = s
        assert np.array_equal(
            ref["cb_decode_input_ids"][:, int(slot), 0], ref[f"{s}_decode_input_ids"][:, 0, 0]
        )
    assert np.array_equal(ref["cb_decode_batch_index"].ravel(), np.arange(len(layout)))
    return Scenario(scripts, chunk_len=chunk_len, decode_rows=layout)


def reference_extra_inputs(ref: dict[str, np.ndarray], manifest: dict, scenario: Scenario) -> ExtraInputs:  # type: ignore[type-arg]
    """The fixture's extra inputs: its constants, and for CCL the schedule whose choices are the
    fixture's per-step lengths (checked here, step by step)."""
    constants = {name: ref[key] for name, key in manifest["scenario"].get("const_inputs", {}).items()}
    if "ccl" not in manifest.get("features_runtime", []):
        return ExtraInputs(constants=constants)
    names = manifest["scenario"]["sequences"]
    prefill = {int(x) for s in names for x in ref[f"{s}_prefill_ccl"]}
    decode = {int(x) for s in names for x in ref[f"{s}_decode_ccl"]} | {
        int(x) for x in ref.get("cb_decode_ccl", [])
    }
    schedule = CompCtxSchedule(tuple(sorted(prefill)), tuple(sorted(decode)))
    for script in scenario.sequences:
        chunks = prefill_rows(script, scenario.chunk_len)
        assert [schedule.length("prefill", [row]) for row in chunks] == list(
            ref[f"{script.name}_prefill_ccl"]
        )
        steps = [schedule.length("decode", [script.decode_row(t, 0)]) for t in range(script.num_decode)]
        assert steps == list(ref[f"{script.name}_decode_ccl"])
    return ExtraInputs(comp_ctx_lengths=schedule, constants=constants)


def model_dims(manifest: dict) -> dict[str, int]:  # type: ignore[type-arg]
    """The scenario's values of the originals' symbolic dims, non-KV states' included."""
    scenario = manifest["scenario"]
    dims = {"ctx_len": scenario["ctx_len"], **feature_dims(manifest)}
    dims["full_batch_size"] = scenario.get("full_batch_size", 4)
    for state in manifest["cache_tensors"]["other_retained_states"]:
        for dim, size in zip(state["symbolic_shape"], state["scenario_shape"], strict=True):
            if isinstance(dim, str):
                dims[dim] = size
    return dims


def _run_reference(paged_feature_fixture, name: str, kv_block_size: int, full_width: bool = False):  # type: ignore[no-untyped-def]
    original, paged = paged_feature_fixture(name, kv_block_size)
    manifest, ref = feature_manifest(name), _reference(name)
    # The sentinels found by structure are the ones the corpus patches.
    patch = {o["name"]: o["ort_value"] for o in manifest["ort_sentinel_patch"]["overrides"]}
    assert {const: int(value) for const, value in sentinel_overrides(original).items()} == patch
    scenario = reference_scenario(ref, manifest)
    extras = reference_extra_inputs(ref, manifest, scenario)
    dims = model_dims(manifest)
    ctx_len = dims["ctx_len"]
    assert ctx_len % kv_block_size == 0
    needed = sum(-(-s.length // kv_block_size) for s in scenario.sequences)
    num_blocks = 1 + needed + 2
    rings = PagedGeometry.of(paged).ring_lengths
    manager = BlockManager(num_blocks, kv_block_size, shuffled_order(num_blocks, seed=kv_block_size), rings)
    slots = {
        s: int(slot)
        for s, slot in zip(manifest["scenario"]["sequences"], ref.get("cb_slots", []), strict=False)
    }
    contiguous = ContiguousRunner(original, dims, slots, extra_inputs=extras)
    paged_runner = PagedRunner(paged, manager, ctx_len // kv_block_size, dims, extras, full_width=full_width)
    steps = drive([contiguous, paged_runner], scenario)
    return manifest, ref, scenario, steps, contiguous, paged_runner


# The corpus README's expected deviations. gpt_oss_kv_prefix A, from its logits row 1 on:
# prefill chunk 1 crosses the 32-slot ring, and the original writes that chunk's padding into
# ring slot 31, over live data; the paged model sends padding to the null block, as the contract
# demands (test_the_only_deviation_is_the_originals_padding_write shows it is the only
# difference). gemma2_ctx256 A ignores its window in the original and in the paged model alike:
# equal to the original, unequal to HF on the rows the corpus flags.
ORIGINAL_FAULTS = {"gpt_oss_kv_prefix": {"A": 1}}  # sequence -> first unfaithful logits row


@pytest.mark.parametrize(("name", "kv_block_size", "full_width"), CASES)
def test_paged_matches_original_on_the_reference_scenario(
    paged_feature_fixture, name: str, kv_block_size: int, full_width: bool
) -> None:
    manifest, ref, scenario, steps, contiguous, paged_runner = _run_reference(
        paged_feature_fixture, name, kv_block_size, full_width
    )
    # Only the KV caches are paged (not vision_embeds), whatever they are called (past_key.0_llm).
    assert sorted(paged_runner.pools) == sorted(manifest["cache_tensors"]["kv"])
    faults = ORIGINAL_FAULTS.get(name, {})
    rows: dict[str, list[np.ndarray]] = defaultdict(list)
    rows_per_call: dict[str, list[int]] = defaultdict(list)
    for step in steps:
        want, got = step.logits
        for index, seq in enumerate(step.sequences):
            if not seq:
                continue  # an idle CB row
            if len(rows[seq]) < faults.get(seq, len(ref[f"{seq}_ort_logits"])):
                assert np.array_equal(want[index], got[index]), f"step {step.index} ({step.kind}) {seq}"
            kept = got[index].reshape(-1, got.shape[-1])  # a TLM decode step keeps several rows
            rows[seq].extend(kept)
            rows_per_call[seq].append(len(kept))
    assert all(not record.foreign_blocks_changed for record in paged_runner.isolation)
    # Tables narrowed to the context in use (the runner's default), never short of a row's
    # context; a prefill-only graph has one bucket, its whole context (add_paged_inputs._buckets).
    # Or the full table every step.
    widths = [record.columns for record in paged_runner.table_widths]
    assert all(not record.rows_cut for record in paged_runner.table_widths)
    full = manifest["scenario"]["ctx_len"] // kv_block_size
    if full_width:
        assert set(widths) == {full}
    else:
        assert min(widths) < full or name == "gpt_oss_prefill_only" or full == 1
    faithful_sequences = [s for s in scenario.sequences if s.name not in faults]
    assert final_kv_diff(contiguous, paged_runner, Scenario(faithful_sequences)) == 0.0

    tolerance = feature_index()["tolerance_used_for_flags"]
    for s in manifest["scenario"]["sequences"]:
        logits = np.stack(rows[s])
        assert logits.shape == ref[f"{s}_ort_logits"].shape
        if f"{s}_rows_per_step" in ref:
            assert rows_per_call[s] == list(ref[f"{s}_rows_per_step"])
        same = slice(0, faults.get(s, len(logits)))
        assert np.abs(logits[same] - ref[f"{s}_ort_logits"][same]).max() <= ORT_TOLERANCE
        faithful = ref[f"{s}_original_matches_hf"]
        assert np.abs(logits[faithful] - ref[f"{s}_hf_logits"][faithful]).max() <= tolerance
        assert np.array_equal(logits[faithful].argmax(-1), ref[f"{s}_hf_argmax"][faithful])


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal within the tolerance between two onnxruntime builds (the corpus's states are its own)."""
    return bool(np.abs(got.astype(np.float64) - want).max(initial=0.0) <= ORT_TOLERANCE)


@pytest.mark.parametrize("kv_block_size", BLOCK_SIZES_OF["gpt_oss_prefill_only"])
def test_prefill_only_final_kv_equals_the_originals(paged_feature_fixture, kv_block_size: int) -> None:
    """The prefill-only graph never reads its cache: its proof is what it leaves in the pools. The
    full layer holds positions ``[0, len)``; the sliding layer, written with the last 32 tokens in
    order (slot i = position max_pos-31+i, not ring order), is read back through the ring's table
    columns in the original's slot layout: every slot of the blocks the sequence holds (the
    others went to the null block, the table having no block there). Bit for bit against the
    original run here; within tolerance of the corpus's final states (another onnxruntime)."""
    name = "gpt_oss_prefill_only"
    manifest, ref, scenario, _, contiguous, paged_runner = _run_reference(
        paged_feature_fixture, name, kv_block_size
    )
    window = manifest["scenario"]["sliding_window_kv_len"]
    for script in scenario.sequences:
        want = contiguous.kv_view(script.name)
        got = paged_runner.kv_view(script.name, {cache: view.shape[2] for cache, view in want.items()})
        held = len(paged_runner.manager.blocks_of(script.name)) * kv_block_size
        for cache, original in want.items():
            stored = ref[f"final_state__{script.name}__{cache}"]
            length = original.shape[2]
            slots = slice(0, min(held, window)) if length == window else slice(0, script.length)
            assert np.array_equal(got[cache][:, :, slots], original[:, :, slots]), (script.name, cache)
            assert _close(got[cache][:, :, slots], stored[:, :, slots]), (script.name, cache)
            if length != window:  # past the prompt, the original wrote only its padding, in the last slot
                assert not stored[:, :, script.length : length - 1].any()


@pytest.mark.parametrize("kv_block_size", [32])
def test_vlm_final_states_equal_the_originals(paged_feature_fixture, kv_block_size: int) -> None:
    """Llava's language decoder: the KV read back through the table and the non-KV retained state
    ``vision_embeds`` (fed back, never paged) equal the original's final retained states."""
    name = "llava_lang_kv_offload"
    _, ref, scenario, _, contiguous, paged_runner = _run_reference(paged_feature_fixture, name, kv_block_size)
    for script in scenario.sequences:
        written = slice(0, script.length)
        want = contiguous.kv_view(script.name)
        for cache, view in paged_runner.kv_view(script.name).items():
            assert np.array_equal(view[:, :, written], want[cache][:, :, written]), cache
            assert _close(view[:, :, written], ref[f"final_state__{script.name}__{cache}"][:, :, written])
        vision = paged_runner.states.of(script.name)["vision_embeds"]
        assert np.array_equal(vision, contiguous.states.of(script.name)["vision_embeds"])
        assert np.array_equal(vision, ref[f"final_state__{script.name}__vision_embeds"])


def test_vlm_image_tokens_read_the_fed_back_vision_embeds(paged_feature_fixture) -> None:
    """The corpus prompts hold no image token; here 20 of them read real (random) image features
    from ``vision_embeds``, which each runner holds as a non-KV state and feeds back every call.
    Both models agree bit for bit, and the features do change the logits."""
    name = "llava_lang_kv_offload"
    original, paged = paged_feature_fixture(name, 16)
    manifest = feature_manifest(name)
    dims = model_dims(manifest)
    image_token = manifest["hf_config"]["image_token_index"]
    rng = np.random.default_rng(7)
    prompt = rng.integers(0, image_token, 45)
    prompt[3:23] = image_token
    script = SequenceScript("A", prompt, 8)
    features = rng.standard_normal((1, dims["vision_size"], manifest["hidden_size"])).astype(np.float32)
    logits = []
    for vision_embeds in (features, np.zeros_like(features)):
        manager = BlockManager(8, 16, shuffled_order(8, seed=2))
        contiguous = ContiguousRunner(original, dims)
        paged_runner = PagedRunner(paged, manager, dims["ctx_len"] // 16, dims)
        for runner in (contiguous, paged_runner):
            runner.states.shared["vision_embeds"] = vision_embeds
        steps = drive([contiguous, paged_runner], Scenario([script], schedule="sequential"))
        for step in steps:
            assert np.array_equal(*step.logits), step.index
        logits.append(steps[-1].logits[1])
    assert not np.array_equal(*logits)


def test_the_only_deviation_is_the_originals_padding_write(paged_feature_fixture) -> None:
    """gpt_oss_kv_prefix A: fed its prefill chunks without padding, the original has no padding to
    write into its ring, and then equals, bit for bit, the paged model fed the padded chunks."""
    name = "gpt_oss_kv_prefix"
    original, paged = paged_feature_fixture(name, 16)
    manifest, ref = feature_manifest(name), _reference(name)
    script = reference_scenario(ref, manifest).sequences[0]
    dims = model_dims(manifest)
    manager = BlockManager(12, 16, shuffled_order(12, seed=1), PagedGeometry.of(paged).ring_lengths)
    contiguous, paged_runner = ContiguousRunner(original, dims), PagedRunner(paged, manager, 128 // 16, dims)
    for chunk in prefill_rows(script, 32):
        valid = chunk.position_ids >= 0
        unpadded = Row(chunk.seq, chunk.input_ids[valid], chunk.position_ids[valid])
        assert np.array_equal(contiguous.step([unpadded], "prefill"), paged_runner.step([chunk], "prefill"))
    for t in range(script.num_decode):
        row = script.decode_row(t, 0)
        assert np.array_equal(contiguous.step([row], "decode"), paged_runner.step([row], "decode")), t


@pytest.mark.parametrize("name", RUNNABLE_FEATURE_FIXTURES)
def test_verify_passes(paged_feature_fixture, name: str) -> None:
    """``verify`` feeds each feature's extra inputs by itself (what ``paged-rewrite verify`` runs)."""
    original, paged = paged_feature_fixture(name, 32)
    report = verify(original, paged, seed=3)
    assert report.ok, report.summary()
    assert report.max_abs_diff == 0.0 and report.kv_max_abs_diff == 0.0
    assert (
        any(len([s for s in step.sequences if s]) >= 2 for step in report.steps)
        or name == "gpt_oss_prefill_only"
    )


def test_an_unknown_extra_input_is_refused_by_name(tmp_path: Path) -> None:
    model = onnx.load(feature_fixture_model("llama_ccl"))
    model.graph.input.append(
        helper.make_tensor_value_info("temperatures", TensorProto.FLOAT, ["batch_size", 1])
    )
    path = tmp_path / "with_temperatures.onnx"
    onnx.save(model, path)
    with pytest.raises(UnknownInputError, match="'temperatures'"):
        ContiguousRunner(path, {"ctx_len": 128})
    constants = {"temperatures": np.ones((1, 1), np.float32)}  # fed once given
    runner = ContiguousRunner(path, {"ctx_len": 128}, extra_inputs=ExtraInputs(constants=constants))
    assert runner.step([Row("A", np.arange(3), np.arange(3))]).shape == (1, 256)


def test_extra_inputs_follow_the_step() -> None:
    """The policy alone: CCL covers the step (or falls back to the largest length), TLM keeps one
    row in prefill and every token's row in decode, LoRA ids follow the rows' sequences."""
    chunk = Row("A", np.arange(32), np.r_[np.arange(32, 45), np.full(19, -1)])
    draft = Row("B", np.arange(4), np.arange(60, 64))
    extras = ExtraInputs(CompCtxSchedule((32, 96), (16, 48, 80)), lora_ids={"B": 2})
    names = ["comp_ctx_lengths", "num_logits_to_keep", "lora_ids"]
    prefill = extras.feeds(names, [chunk], "prefill", 128)
    assert prefill["comp_ctx_lengths"].shape == (96,) and prefill["num_logits_to_keep"].shape == (1, 1)
    decode = extras.feeds(names, [Row.idle(4), draft], "decode", 128)
    assert decode["comp_ctx_lengths"].shape == (80,) and decode["num_logits_to_keep"].shape == (4, 1)
    assert decode["lora_ids"].tolist() == [[0], [2]]
    late = Row("B", np.arange(1), np.array([100]))
    assert extras.feeds(names, [late], "decode", 128)["comp_ctx_lengths"].shape == (80,)
    assert ExtraInputs().feeds(names, [late], "decode", 128)["comp_ctx_lengths"].shape == (128,)
    assert CompCtxSchedule.spread(128) == CompCtxSchedule((32, 64, 128), (32, 64, 128))


def test_other_states_are_kept_per_row_or_shared() -> None:
    """A state batched like the tokens (a sampler's penalty buffer) follows its sequence from call
    to call; any other (vision_embeds) is one tensor for every call."""
    penalty = CacheIO("penalty", "penalty_RetainedState", ("batch_size", 8), np.bool_)
    vision = CacheIO("vision_embeds", "vision_embeds_RetainedState", ("vision_batch_size", "vision_size", 4))
    states = OtherStates([penalty, vision], "batch_size", {"vision_size": 3})
    feeds = states.feeds(["A", None])
    assert feeds["penalty"].shape == (2, 8) and feeds["vision_embeds"].shape == (1, 3, 4)
    marked = np.zeros((2, 8), bool)
    marked[0, 5] = True
    states.keep(
        ["A", None], {"penalty_RetainedState": marked, "vision_embeds_RetainedState": np.ones((1, 3, 4))}
    )
    assert states.feeds(["B", "A"])["penalty"][:, 5].tolist() == [False, True]
    assert states.of("A")["vision_embeds"].sum() == 12


def test_prefill_only_at_block_128_with_a_context_of_one_block(tmp_path: Path) -> None:
    """The prefill-only export's scenario context (64) is smaller than a 128-token block, so the
    block-128 case runs at a context of one block: the original at ctx_len 128 against its paged
    rewrite, through verify's whole-context prefill."""
    original = feature_fixture_model("gpt_oss_prefill_only")
    paged = tmp_path / "paged.onnx"
    rewrite(original, paged, 128, ctx_len=128, dims={"sliding_window": 32})
    report = verify(original, paged, seed=128)
    assert report.ok and report.max_abs_diff == 0.0 and report.kv_max_abs_diff == 0.0, report.summary()
