"""Fuzzing the command line with malformed models.

Every case must end one of two ways: exit 0 with an output that passes the ONNX checker (a
mutation can leave a perfectly rewritable model, e.g. a flipped weight byte), or a documented
non-zero exit code with a one-line error and no traceback. Either way the input is unchanged and
nothing but the output (on success) is left in the output folder.

The normal test run draws PAGED_REWRITE_FUZZ_CASES cases (default 300, seeded); the long mode is
``PAGED_REWRITE_FUZZ_CASES=10000 pytest tests/test_fuzz.py`` (see the README's Reliability section).
"""

from __future__ import annotations

import hashlib
import os
import random
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from conftest import fixture_model
from models import qeff_export

from paged_rewrite.cli import main

CASES = int(os.environ.get("PAGED_REWRITE_FUZZ_CASES", "300"))
SEED = int(os.environ.get("PAGED_REWRITE_FUZZ_SEED", "20261125"))
DOCUMENTED_EXITS = {0, 2, 3, 4, 5, 6}  # see the README; 1 would be an internal error (a bug)
SOURCES = ["llama_default", "llama_cb", "llama_subfunctions", "gpt2_default", "llama_blockedkv"]

Mutation = Callable[[random.Random, bytes, onnx.ModelProto], bytes]


def truncate(rng: random.Random, data: bytes, _: onnx.ModelProto) -> bytes:
    return data[: rng.randrange(len(data))]


def flip_bytes(rng: random.Random, data: bytes, _: onnx.ModelProto) -> bytes:
    mutable = bytearray(data)
    for _ in range(rng.choice([1, 2, 8, 64])):
        mutable[rng.randrange(len(mutable))] ^= 1 << rng.randrange(8)
    return bytes(mutable)


def structural(rng: random.Random, _: bytes, model: onnx.ModelProto) -> bytes:
    """A valid protobuf with one structural defect."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    caches = [v for v in graph.input if v.name.startswith("past_")]
    choice = rng.randrange(12)
    if choice == 0 and model.functions:  # a missing function
        del model.functions[rng.randrange(len(model.functions))]
    elif choice == 1 and caches:  # wrong dtype on a cache
        rng.choice(caches).type.tensor_type.elem_type = rng.choice(
            [onnx.TensorProto.INT64, onnx.TensorProto.BOOL]
        )
    elif choice == 2 and caches:  # wrong rank on a cache
        dims = rng.choice(caches).type.tensor_type.shape.dim
        del dims[rng.randrange(len(dims))]
    elif choice == 3 and caches:  # disagreeing dims
        rng.choice(caches).type.tensor_type.shape.dim[rng.choice([0, 2])].dim_param = "other"
    elif choice == 4:  # a dangling node input
        node = rng.choice(graph.node)
        if node.input:
            node.input[rng.randrange(len(node.input))] = "does_not_exist"
    elif choice == 5:  # a cycle
        a, b = rng.sample(range(len(graph.node)), 2)
        if graph.node[a].input and graph.node[b].output:
            graph.node[a].input[0] = graph.node[b].output[0]
    elif choice == 6 and caches:  # huge dims
        rng.choice(caches).type.tensor_type.shape.dim[rng.choice([1, 3])].dim_value = 2**62
    elif choice == 7:  # an empty graph
        del graph.node[:]
    elif choice == 8:  # nodes out of order
        nodes = list(graph.node)
        rng.shuffle(nodes)
        del graph.node[:]
        graph.node.extend(nodes)
    elif choice == 9:  # a cache op losing its inputs
        ctx = [
            n
            for body in [graph.node, *(f.node for f in model.functions)]
            for n in body
            if n.op_type.startswith("Ctx")
        ]
        if ctx:
            del rng.choice(ctx).input[:]
    elif choice == 10:  # duplicate graph input names
        graph.input.append(rng.choice(graph.input))
    else:  # a retained output dropped
        outputs = [o for o in graph.output if o.name.endswith("_RetainedState")]
        if outputs:
            graph.output.remove(rng.choice(outputs))
    return model.SerializeToString()


MUTATIONS: list[Mutation] = [truncate, flip_bytes, structural, structural]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, onnx.ModelProto]]:
    paths = [fixture_model(name) for name in SOURCES]  # skips (or fails, in CI) without the corpus
    paths.append(qeff_export(tmp_path_factory.mktemp("fuzz") / "builder.onnx"))
    return [(p.read_bytes(), onnx.load(p)) for p in paths]


def test_malformed_models_are_refused_cleanly(
    tmp_path: Path, sources: list[tuple[bytes, onnx.ModelProto]]
) -> None:
    rng = random.Random(SEED)
    runner = CliRunner()
    outcomes: Counter[int] = Counter()
    for case in range(CASES):
        data, model = rng.choice(sources)
        mutated = rng.choice(MUTATIONS)(rng, data, model)
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        source = folder / "model.onnx"
        source.write_bytes(mutated)
        digest = hashlib.sha256(mutated).hexdigest()
        out = folder / "paged.onnx"
        result = runner.invoke(
            main, [str(source), "-o", str(out), "--kv-block-size", "16", "--ctx-len", "128"]
        )
        detail = f"case {case}: exit {result.exit_code}\n{result.output}"
        if result.exc_info and not isinstance(result.exc_info[1], SystemExit):
            detail += "".join(traceback.format_exception(*result.exc_info))
        assert result.exit_code in DOCUMENTED_EXITS, detail
        assert "Traceback" not in result.output, detail
        assert hashlib.sha256(source.read_bytes()).hexdigest() == digest, detail
        left = sorted(p.name for p in folder.iterdir())
        if result.exit_code == 0:
            onnx.checker.check_model(str(out))
            assert left == ["model.onnx", "paged.onnx", "paged.onnx.json", "paged.specializations.json"], (
                detail
            )
        else:
            errors = [line for line in result.output.splitlines() if line.startswith("paged-rewrite:")]
            assert len(errors) == 1, detail
            assert left == ["model.onnx"], detail
        outcomes[result.exit_code] += 1
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    print(f"\nfuzz: {CASES} cases, seed {SEED}, exit codes {dict(sorted(outcomes.items()))}")
    assert outcomes[0] < CASES  # the mutations do produce refusals
