"""Pipeline fit: multi-GB external-data models rewritten without reading a weight byte, the QAIC
hand-off files (specializations, custom_io, manifest), determinism, inspect and JSON output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from conftest import fixture_model
from models import qeff_export

from paged_rewrite import UsageError, rewrite
from paged_rewrite.builder import ExportSpec, write_qeff_export
from paged_rewrite.model_io import data_file, external_tensors

BIG = ExportSpec(num_layers=8, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=32000, max_position=4096)  # fmt: skip

MEASURE = """
import json, sys, paged_rewrite
def rchar():
    return int(next(l for l in open('/proc/self/io') if l.startswith('rchar')).split()[1])
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == 'open' else None)
before = rchar()
paged_rewrite.rewrite(sys.argv[1], sys.argv[2], 128, ctx_len=4096)
print(json.dumps({"rchar": rchar() - before, "opened": opened}))
"""


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qeff_export(tmp_path_factory.mktemp("big") / "model.onnx", BIG, sparse_weights=True)


def test_multi_gb_model_is_rewritten_without_reading_weights(big_model: Path) -> None:
    data = big_model.with_suffix(".data")
    assert data.stat().st_size > 2 * 2**30  # a multi-GB model (sparse on disk)
    out = big_model.with_name("paged.onnx")
    done = subprocess.run([sys.executable, "-c", MEASURE, str(big_model), str(out)],
                          capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert not [path for path in measured["opened"] if path.endswith(".data")]
    # Everything the process read: the .onnx (loaded, then checked) and little else; not weights.
    assert measured["rchar"] < 4 * big_model.stat().st_size + 20 * 2**20
    onnx.checker.check_model(str(out), full_check=True)
    paged = onnx.load(out, load_external_data=False)
    tensors = list(external_tensors(paged))
    assert tensors and {data_file(out, t) for t in tensors} == {data.resolve()}


def test_copy_weights_streams_the_data_beside_the_output(tmp_path: Path) -> None:
    source = write_qeff_export(tmp_path / "src" / "model.onnx", ExportSpec(), sparse_weights=True)
    (tmp_path / "out").mkdir()
    rewrite(source, tmp_path / "out" / "paged.onnx", 16, copy_weights=True)
    copied = tmp_path / "out" / "paged.onnx.data"
    paged = onnx.load(tmp_path / "out" / "paged.onnx", load_external_data=False)
    assert {data_file(tmp_path / "out" / "paged.onnx", t) for t in external_tensors(paged)} == {
        copied.resolve()
    }
    onnx.checker.check_model(str(tmp_path / "out" / "paged.onnx"), full_check=True)


def test_unsafe_external_location_is_refused(tmp_path: Path) -> None:
    source = write_qeff_export(tmp_path / "model.onnx", ExportSpec(), sparse_weights=True)
    model = onnx.load(source, load_external_data=False)
    next(iter(external_tensors(model))).external_data[0].value = "../outside.data"
    onnx.save(model, tmp_path / "evil.onnx")
    done = subprocess.run([sys.executable, "-m", "paged_rewrite.cli", str(tmp_path / "evil.onnx"), "-o",
                           str(tmp_path / "p.onnx"), "--kv-block-size", "16"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 3 and "unsafe external data location '../outside.data'" in done.stderr
    assert not (tmp_path / "p.onnx").exists()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_specializations_and_custom_io_round_trip(tmp_path: Path) -> None:
    specs = _write(tmp_path / "specializations.json", json.dumps({"specializations": [
        {"name": "Prefill", "symbols": {"batch_size": "1", "ctx_len": "128", "seq_len": "32"}},
        {"name": "Decode", "symbols": {"batch_size": "4", "ctx_len": "128", "seq_len": "1"}},
    ]}))  # fmt: skip
    custom = _write(tmp_path / "custom_io.yaml", "".join(
        f"past_{k}.{i}{s}: float16\n" for i in range(2) for k in ("key", "value") for s in ("", "_RetainedState")
    ))  # fmt: skip
    source = qeff_export(tmp_path / "model.onnx")
    report = rewrite(source, tmp_path / "paged.onnx", 32, specializations=specs, custom_io=custom)
    # ctx_len is the same in every entry: bound, so the default ladder up to it applies
    assert report.num_kv_blocks == "num_kv_blocks" and report.ctx_buckets == [32, 64, 128]
    written = json.loads((tmp_path / "paged.specializations.json").read_text())["specializations"]
    graph_symbols = {d for spec in report.inputs for d in spec.shape if isinstance(d, str)}
    assert [e["name"] for e in written] == [
        f"{p}_ctx{b}" for p in ("Prefill", "Decode") for b in (32, 64, 128)
    ]
    for entry, batch, blocks in zip(written, "111444", (1, 2, 4) * 2, strict=True):
        assert set(entry["symbols"]) == graph_symbols  # every symbol, nothing else (no ctx_len)
        assert entry["symbols"]["batch_size"] == batch
        assert entry["symbols"]["num_kv_blocks"] == str(blocks)
        # the pool is one shape in every entry: the most rows at the widest table, + the null block
        assert entry["symbols"]["total_num_kv_blocks"] == str(4 * 4 + 1)
    assert (tmp_path / "paged.custom_io.yaml").read_text() == custom.read_text()

    with pytest.raises(UsageError, match=r"past_key\.9"):
        rewrite(
            source, tmp_path / "p2.onnx", 32, custom_io=_write(tmp_path / "bad.yaml", "past_key.9: float16\n")
        )
    assert not (tmp_path / "p2.onnx").exists()


def test_specializations_per_entry_context_and_rings(tmp_path: Path) -> None:
    specs = _write(tmp_path / "s.json", json.dumps({"specializations": [
        {"name": "Short", "symbols": {"batch_size": "1", "ctx_len": "64", "seq_len": "32", "sliding_window": "32"}},
        {"name": "Long", "symbols": {"batch_size": "1", "ctx_len": "128", "seq_len": "1", "sliding_window": "32"}},
    ]}))  # fmt: skip
    model = tmp_path / "gpt_oss.onnx"
    model.write_bytes(fixture_model("gpt_oss_swa_moe").read_bytes())
    report = rewrite(model, tmp_path / "paged.onnx", 16, specializations=specs)
    assert report.num_kv_blocks == "num_kv_blocks" and report.windows == {"sliding_window": 32}
    written = json.loads((tmp_path / "paged.specializations.json").read_text())["specializations"]
    assert [e["symbols"]["num_kv_blocks"] for e in written] == ["4", "8"]
    assert all("ctx_len" not in e["symbols"] and "sliding_window" not in e["symbols"] for e in written)


def test_manifest_and_determinism(tmp_path: Path) -> None:
    source = qeff_export(tmp_path / "model.onnx", num_layers=3)
    for name in ("a", "b"):
        rewrite(source, tmp_path / f"{name}.onnx", 16, ctx_len=128, num_blocks=33)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    manifest_a = (tmp_path / "a.onnx.json").read_text()
    assert manifest_a == (tmp_path / "b.onnx.json").read_text()
    manifest = json.loads(manifest_a)
    assert manifest["kv_block_size"] == 16 and manifest["null_block"] == 0
    assert manifest["num_kv_blocks"] is None  # several buckets: the width is symbolic
    assert manifest["ctx_buckets"] == [{"tokens": 16 * 2**k, "num_kv_blocks": 2**k} for k in range(4)]
    assert manifest["total_num_kv_blocks"] == 33
    assert [c["input"] for c in manifest["caches"]] == [
        f"past_{k}.{i}" for i in range(3) for k in ("key", "value")
    ]
    assert {c["kv_heads"] for c in manifest["caches"]} == {2}
    assert manifest["source"]["file"] == "model.onnx" and len(manifest["source"]["sha256"]) == 64
    inputs = {i["name"]: i for i in manifest["inputs"]}
    assert inputs["block_table"] == {
        "name": "block_table",
        "dtype": "int64",
        "shape": ["batch_size", "num_kv_blocks"],
    }


def test_inspect_lists_sites_and_writes_nothing(tmp_path: Path) -> None:
    model = tmp_path / "sub.onnx"
    model.write_bytes(fixture_model("llama_subfunctions").read_bytes())
    done = subprocess.run([sys.executable, "-m", "paged_rewrite.cli", "inspect", str(model), "--kv-block-size", "32",
                           "--json"], capture_output=True, text=True, check=True)  # fmt: skip
    found = json.loads(done.stdout)
    assert [(s["layer"], s["kind"], s["function"]) for s in found["sites"]] == [
        (0, "key", "QEffLlamaDecoderLayer"), (0, "value", "QEffLlamaDecoderLayer"),
        (1, "key", "QEffLlamaDecoderLayer"), (1, "value", "QEffLlamaDecoderLayer"),
    ]  # fmt: skip
    assert found["sites"][0]["read_ops"] == ["CtxGather"]
    assert found["plan"]["rewritten"]["CtxScatter -> PagedCtxScatter"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.onnx"]


@pytest.mark.parametrize("command", ["rewrite", "verify", "inspect", "demo"])
def test_help_shows_an_example(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "paged_rewrite.cli", command, "--help"], capture_output=True, text=True
    )
    assert (
        done.returncode == 0
        and "Example:" in done.stdout
        and f"paged-rewrite {command}"
        in done.stdout.replace("paged-rewrite model.onnx", "paged-rewrite rewrite")
    )


def test_a_rerun_removes_the_sidecars_it_no_longer_writes(tmp_path: Path) -> None:
    source = qeff_export(tmp_path / "model.onnx")
    custom = _write(tmp_path / "custom_io.yaml", "past_key.0: float16\n")
    rewrite(source, tmp_path / "paged.onnx", 16, custom_io=custom)
    assert (tmp_path / "paged.custom_io.yaml").exists()
    unrelated = _write(tmp_path / "notes.yaml", "mine\n")
    rewrite(source, tmp_path / "paged.onnx", 16)  # no --custom-io this time
    assert not (tmp_path / "paged.custom_io.yaml").exists()
    assert unrelated.exists()
    manifest = json.loads((tmp_path / "paged.onnx.json").read_text())
    assert manifest["sidecars"] == ["manifest", "specializations"]
