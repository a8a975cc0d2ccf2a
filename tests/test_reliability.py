"""Hardening: invalid flags, unsafe external-data paths, atomic output under interruption, inputs
never opened for writing, and sequences kept apart whatever a buggy runtime feeds the model.

The runtime property test draws PAGED_REWRITE_PROPERTY_STEPS steps (default 150, seeded); the
long mode is ``PAGED_REWRITE_PROPERTY_STEPS=1000 pytest tests/test_reliability.py``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from contract import contract_writes, zero_rows_are_zero
from models import qeff_export

from paged_rewrite import NotAModelError, UsageError, rewrite
from paged_rewrite.builder import ExportSpec, write_qeff_export
from paged_rewrite.cli import main
from paged_rewrite.model_io import external_tensors
from paged_rewrite.runtime.runners import unexpected_writes

STEPS = int(os.environ.get("PAGED_REWRITE_PROPERTY_STEPS", "150"))


def cli(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("flags", "code"),
    [
        (["--kv-block-size", "0"], 2),
        (["--kv-block-size", "-16"], 2),
        (["--kv-block-size", "16.5"], 2),
        (["--kv-block-size", "256", "--ctx-len", "128"], 2),  # larger than the context
        (["--kv-block-size", "16", "--dim", "ctx_len"], 2),
        (["--kv-block-size", "16", "--num-blocks", "1"], 2),
    ],
)
def test_invalid_flags(tmp_path: Path, flags: list[str], code: int) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    exit_code, output = cli(source, "-o", tmp_path / "out.onnx", *flags)
    assert exit_code == code, output
    assert "Traceback" not in output and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_output_folder_not_writable(tmp_path: Path) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    code, output = cli(source, "-o", "/proc/paged.onnx", "--kv-block-size", 16)  # not writable, even for root
    assert code == 6 and "cannot write" in output


def _with_location(tmp_path: Path, location: str) -> Path:
    source = write_qeff_export(tmp_path / "model.onnx", ExportSpec(), sparse_weights=True)
    model = onnx.load(source, load_external_data=False)
    for tensor in external_tensors(model):
        next(e for e in tensor.external_data if e.key == "location").value = location
    onnx.save(model, tmp_path / "evil.onnx")
    return tmp_path / "evil.onnx"


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, kind: str) -> None:
    outside = tmp_path.parent / f"{tmp_path.name}_outside.data"
    outside.write_bytes(b"\0" * 16)
    if kind == "symlink":
        (tmp_path / "link.data").symlink_to(outside)
    location = {"absolute": str(outside), "dotdot": f"../{outside.name}", "symlink": "link.data"}[kind]
    evil = _with_location(tmp_path, location)
    with pytest.raises(NotAModelError, match="unsafe external data location"):
        rewrite(evil, tmp_path / "out.onnx", 16)
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt: type
) -> None:
    source = write_qeff_export(tmp_path / "src" / "model.onnx", ExportSpec(), sparse_weights=True)
    (tmp_path / "out").mkdir()

    def fail(*_: object, **__: object) -> None:
        raise interrupt("interrupted mid-write")

    monkeypatch.setattr(onnx.checker, "check_model", fail)  # after the model and data files are written
    with pytest.raises(interrupt):
        rewrite(source, tmp_path / "out" / "paged.onnx", 16, copy_weights=True)
    assert list((tmp_path / "out").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["model.data", "model.onnx"]


def test_cli_interrupt_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    monkeypatch.setattr(
        onnx.checker, "check_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt())
    )
    code, output = cli(source, "-o", tmp_path / "out.onnx", "--kv-block-size", 16)
    assert code == 130 and output.strip() == "paged-rewrite: interrupted: nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_inputs_are_never_opened_for_writing(tmp_path: Path) -> None:
    source = write_qeff_export(tmp_path / "model.onnx", ExportSpec(), sparse_weights=True)
    inputs = {str(source), str(source.with_suffix(".data"))}
    for path in inputs:
        os.chmod(path, 0o444)
    writes: list[str] = []

    def audit(event: str, args: tuple[object, ...]) -> None:
        if event == "open" and str(args[0]) in inputs:
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC)
            ):
                writes.append(f"{args[0]} {mode} {flags}")

    sys.addaudithook(audit)
    rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128)
    rewrite(
        source, tmp_path / "sub" / "paged.onnx" if False else tmp_path / "copy.onnx", 16, copy_weights=True
    )
    assert writes == []


def test_rows_stay_apart_and_valid_rows_stay_finite(paged_fixture) -> None:  # type: ignore[no-untyped-def]
    """A buggy runtime batches one well-formed row with garbage rows: random tables with -1,
    duplicates and the null block, wrong slot_id, positions -1 or out of range, all-padding rows,
    a null block full of NaN. After every step no block outside the rows' own and block 0 has
    changed, and the well-formed row's logits are finite (no NaN leaks across rows)."""
    _, paged, _ = paged_fixture("llama_default", 16)
    session = ort.InferenceSession(str(paged), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(11)
    num_pool, nb, bs = 24, 8, 16
    for _ in range(STEPS):
        batch, seq = int(rng.integers(2, 5)), int(rng.choice([1, 7, 32]))
        pools = {f"past_{k}.{layer}": rng.standard_normal((num_pool, 2, bs, 16)).astype(np.float32)
                 for k in ("key", "value") for layer in range(2)}  # fmt: skip
        for pool in pools.values():
            pool[0] = np.nan  # whatever the null block holds must never reach a valid row
        start = int(rng.integers(0, 128 - seq))
        own = rng.permutation(np.arange(1, 9))  # the valid row's private blocks
        table = rng.choice([-1, 0, *range(9, num_pool), num_pool + 2], size=(batch, nb)).astype(np.int64)
        table[0] = -1
        table[0, : (start + seq - 1) // bs + 1] = own[: (start + seq - 1) // bs + 1]
        positions = rng.choice([-1, 255, 130, *range(128)], size=(batch, seq)).astype(np.int64)
        positions[0] = np.arange(start, start + seq)
        if batch > 2:
            positions[-1] = -1  # an all-padding row
        if batch > 3:
            table[1] = -1  # a row with no block at all
        slot_id = rng.integers(-1, bs + 1, batch).astype(np.int64)
        slot_id[0] = start % bs
        feeds = {"input_ids": rng.integers(0, 256, (batch, seq)).astype(np.int64), "position_ids": positions,
                 "block_table": table, "slot_id": slot_id, **pools}  # fmt: skip
        out = dict(zip(names, session.run(None, feeds), strict=True))
        allowed = contract_writes(table, positions, slot_id, bs, num_pool)
        for name, before in pools.items():
            assert unexpected_writes(before, out[f"{name}_RetainedState"], allowed) == [], name
            assert zero_rows_are_zero(out[f"{name}_RetainedState"]), name  # whatever block 0 held
        assert np.isfinite(out["logits"][0]).all(), "NaN leaked into the valid row"


def test_outputs_never_overwrite_inputs(tmp_path: Path) -> None:
    source = write_qeff_export(tmp_path / "model.onnx", ExportSpec(), sparse_weights=True)
    data = source.with_suffix(".data")
    before = data.stat().st_size
    with pytest.raises(UsageError, match="overwrite the input"):
        rewrite(source, data, 16)  # -o model.data
    assert data.stat().st_size == before
    specs = tmp_path / "paged.specializations.json"
    specs.write_text(
        '{"specializations": [{"name": "D", "symbols": {"batch_size": "1", "seq_len": "1", "ctx_len": "128"}}]}'
    )
    with pytest.raises(UsageError, match="overwrite the input"):
        rewrite(source, tmp_path / "paged.onnx", 16, specializations=specs)
    assert not (tmp_path / "paged.onnx").exists()


def test_specialization_contradicting_the_context_is_refused(tmp_path: Path) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    specs = tmp_path / "s.json"
    specs.write_text('{"specializations": [{"name": "a", "symbols": {"batch_size": "1", "seq_len": "1", "ctx_len": "128"}},'
                     ' {"name": "b", "symbols": {"batch_size": "1", "seq_len": "1", "ctx_len": "512"}}]}')  # fmt: skip
    with pytest.raises(UsageError, match="'b' has ctx_len=512"):
        rewrite(source, tmp_path / "p.onnx", 16, ctx_len=128, specializations=specs)
    assert not (tmp_path / "p.onnx").exists()


def test_a_nameless_node_is_named_by_its_first_output(tmp_path: Path) -> None:
    """Node names are optional in ONNX: an error about a nameless node names what it computes."""
    from conftest import fixture_model

    from paged_rewrite import UnsupportedPatternError

    model = onnx.load(fixture_model("llama_default"))
    scatter = next(n for n in model.graph.node if n.op_type == "CtxScatter")
    scatter.name = ""
    scatter.input.append(scatter.input[1])  # an arity no rule knows
    onnx.save(model, tmp_path / "odd.onnx")
    with pytest.raises(UnsupportedPatternError) as error:
        rewrite(tmp_path / "odd.onnx", tmp_path / "p.onnx", 16)
    assert "the com.qualcomm.cloud::CtxScatter node computing 'past_key.0_RetainedState'" in str(error.value)


def test_consumers_of_a_name_not_watched_are_not_silently_empty() -> None:
    from onnx import helper

    from paged_rewrite.graph import Body

    graph = helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "g", [], [])
    body = Body(graph)
    body.watch({"a"})
    assert [node.op_type for node, _ in body.consumers("a")] == ["Relu"]
    with pytest.raises(KeyError, match="'b' were not indexed"):
        body.consumers("b")


def test_a_bug_inside_a_pass_is_one_line_naming_the_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception that is not one of our refusals is a bug: the line says in which pass."""
    from conftest import fixture_model

    from paged_rewrite.errors import InternalError
    from paged_rewrite.passes import page_writes

    def broken(*args: object) -> int:
        raise KeyError("slot")

    monkeypatch.setattr(page_writes, "_slot_period", broken)
    with pytest.raises(InternalError, match=r"model.onnx: in page_writes: KeyError: 'slot'$"):
        rewrite(fixture_model("llama_default"), tmp_path / "p.onnx", 16)
    result = CliRunner().invoke(
        main, [str(fixture_model("llama_default")), "-o", str(tmp_path / "q.onnx"), "--kv-block-size", "16"]
    )
    assert result.exit_code == 1
    model = fixture_model("llama_default")
    assert (
        result.stderr.strip() == f"paged-rewrite: internal error: {model}: in page_writes: KeyError: 'slot'"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_second_interrupt_during_the_roll_back_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C arrives while a failed write is being undone (a real SIGINT, sent from inside the
    roll-back's first file removal): the roll-back still finishes, then the interrupt is
    delivered. Nothing is left in the output folder."""
    import signal

    source = write_qeff_export(tmp_path / "src" / "model.onnx", ExportSpec(), sparse_weights=True)
    (tmp_path / "out").mkdir()

    def first_interrupt(*_: object, **__: object) -> None:
        raise KeyboardInterrupt  # after the data file is placed and the rest staged

    unlink = os.unlink
    sent: list[str] = []

    def unlink_then_interrupt(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        unlink(path, *args, **kwargs)  # type: ignore[arg-type]
        if not sent:
            sent.append(os.fspath(path))
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(onnx.checker, "check_model", first_interrupt)
    monkeypatch.setattr(os, "unlink", unlink_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        rewrite(source, tmp_path / "out" / "paged.onnx", 16, copy_weights=True)
    monkeypatch.undo()
    assert sent and list((tmp_path / "out").iterdir()) == []


def test_an_interrupt_once_the_output_has_landed_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real SIGINT while the backups of the replaced files are cleaned up, after the model is in
    place: nothing can be undone and everything asked for is written, so the rewrite completes
    (rather than reporting 'nothing was written' over a finished output)."""
    import signal

    from paged_rewrite import model_io

    source = qeff_export(tmp_path / "model.onnx")
    rewrite(source, tmp_path / "paged.onnx", 16, ctx_len=128)  # an earlier run: its files get replaced
    finish = model_io._FileSet.finish

    def finish_after_an_interrupt(files: model_io._FileSet) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        finish(files)

    monkeypatch.setattr(model_io._FileSet, "finish", finish_after_an_interrupt)
    report = rewrite(source, tmp_path / "paged.onnx", 32, ctx_len=128)
    monkeypatch.undo()
    assert (
        report.kv_block_size == 32
        and json.loads((tmp_path / "paged.onnx.json").read_text())["kv_block_size"] == 32
    )
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_interrupts_are_not_held_where_python_cannot_restore_the_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host that installed its own C-level SIGINT handler (``getsignal`` is None): nothing is
    replaced, so nothing needs restoring, and the block runs as is."""
    import signal

    from paged_rewrite import model_io

    monkeypatch.setattr(signal, "getsignal", lambda _signum: None)
    installed: list[object] = []
    monkeypatch.setattr(signal, "signal", lambda *args: installed.append(args))
    with model_io._interrupts_deferred():
        pass
    assert installed == []
