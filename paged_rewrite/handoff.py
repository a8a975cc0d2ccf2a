"""The files that travel with a paged model to ``qaic-compile`` and to runtimes.

- ``<output>.json``: the manifest — what a runtime needs to allocate the pool and build tables.
- ``<stem>.specializations.json``: QEfficient's ``specializations.json`` for the paged model: every
  symbolic dim of its inputs gets a value in every entry.
- ``<stem>.custom_io.yaml``: QEfficient's per-tensor precision file, carried over.

All are deterministic (sorted keys, no timestamps, no absolute paths).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from paged_rewrite.errors import UsageError
from paged_rewrite.report import RewriteReport

Entry = dict[str, Any]


TOOL_NAME = "paged-rewrite"  # the marker by which a manifest is known to be ours
CustomIOLayout = Literal["io_list", "mapping", "pairs"]
FLAT = "_flat"  # an entry read from the flat layout, written back in it
PREFILL_LENGTH = "_prefill_length"  # a default entry made for one of --prefill-lengths


def read_specializations(path: str | os.PathLike[str]) -> list[Entry]:
    """``{"specializations": [{"name": ..., "symbols": {dim: "value"}}, ...]}``, or the flat layout
    QEfficient's ``compile`` writes for ``qaic-exec``: ``[{"batch_size": "1", "seq_len": "32",
    "ctx_len": "128"}, ...]`` (each entry is its dims); the paged file keeps the layout it was given."""
    try:
        document = json.loads(Path(path).read_text())
        entries = document["specializations"]
        for index, entry in enumerate(entries):
            if "symbols" not in entry:
                entries[index] = entry = {"symbols": dict(entry), FLAT: True}
            entry["symbols"] = {str(k): int(v) for k, v in entry["symbols"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"{path}: not a specializations file ({type(exc).__name__}: {exc})") from None
    if not entries:
        raise UsageError(f"{path}: no specializations")
    return list(entries)


def shared_dims(entries: Sequence[Entry]) -> dict[str, int]:
    """Dims with one value in every entry: these can be bound for the rewrite."""
    common = dict(entries[0]["symbols"])
    for entry in entries[1:]:
        common = {k: v for k, v in common.items() if entry["symbols"].get(k) == v}
    return common


def paged_specializations(
    report: RewriteReport, entries: Sequence[Entry] | None, bound: Mapping[str, int], num_blocks: int | None
) -> dict[str, Any]:
    """One entry per input entry and context bucket, with a value for every symbolic dim of the
    paged model's inputs and nothing else.

    ``ctx_len`` disappears from the paged graph: the context is ``num_kv_blocks *
    kv_block_size``. With context buckets (``report.ctx_buckets``), each input entry is repeated
    per bucket up to the entry's own context, with ``num_kv_blocks = ceil(bucket /
    kv_block_size)``; without an input file, the entries are one per bucket and phase (prefill,
    and decode with ``seq_len = 1`` where the graph has both; with ``report.prefill_lengths``, one
    prefill entry per length, at the buckets at least that long). Without buckets, an entry's
    ``ctx_len`` becomes its ``num_kv_blocks`` (a file whose entries disagree on the context lists
    its own buckets). ``total_num_kv_blocks`` is the same in every entry — QAIC's retained-state
    buffers cannot change shape between specializations: ``--num-blocks``, or enough for every
    row at the full context plus the null block, ``rows * num_kv_blocks + 1`` with the most rows
    and the widest table of any entry (rows = ``full_batch_size`` for continuous batching, else
    ``batch_size``). Each window group's pool (``total_num_kv_blocks_w<W>``) is likewise the same
    in every entry: ``rows * ceil(W / kv_block_size) + 1``, a ring of blocks per row; for a window
    over logical positions (``[p0 - W, p0 + S)`` of a full-length cache, whose blocks behind the
    window a runtime frees) ``rows * min(ceil((W + S - 1) / kv_block_size) + 1, num_kv_blocks) +
    1``, with ``S`` the longest ``seq_len`` of any entry, and ``rows * num_kv_blocks + 1`` (the
    widest table) where an entry leaves ``seq_len`` unbound: its chunk may span the context.
    """
    symbols = sorted({d for spec in report.inputs for d in spec.shape if isinstance(d, str)})
    context = report.context_dim or "ctx_len"
    source = entries or _default_entries(report, symbols, bound)
    expanded: list[tuple[Entry, dict[str, int]]] = []
    for entry in source:
        for name, value in entry["symbols"].items():
            if name in bound and bound[name] != value:
                raise UsageError(
                    f"specialization {entry.get('name', '?')!r} has {name}={value}, "
                    f"but the rewrite was bound to {name}={bound[name]}"
                )
        known = {**bound, **entry["symbols"]}
        for bucket in _entry_buckets(report, known.get(context), entry):
            values = dict(known)
            named = dict(entry)
            if isinstance(report.num_kv_blocks, int):
                values["num_kv_blocks"] = report.num_kv_blocks
            elif bucket is not None:
                values["num_kv_blocks"] = math.ceil(bucket / report.kv_block_size)
            if report.ctx_buckets and bucket is not None and not entry.get(FLAT):
                named["name"] = f"{entry.get('name', 'Default')}_ctx{bucket}"
            expanded.append((named, values))
    total = num_blocks if num_blocks is not None else _default_pool(values for _, values in expanded)
    window_pools = _window_pools(report, [values for _, values in expanded])
    out = []
    for entry, values in expanded:
        values.update(window_pools)
        if total is not None:
            values["total_num_kv_blocks"] = total
        missing = [s for s in symbols if s not in values]
        if missing and entries:
            raise UsageError(
                f"specialization {entry.get('name', '?')!r} gives no value for {', '.join(missing)}"
            )
        written = {s: str(values[s]) for s in symbols if s in values}
        public = {key: value for key, value in entry.items() if key != PREFILL_LENGTH}
        out.append(written if entry.get(FLAT) else {**public, "symbols": written})
    return {"specializations": out}


def entry_origins(
    report: RewriteReport, entries: Sequence[Entry] | None, bound: Mapping[str, int]
) -> list[Entry]:
    """For each entry ``paged_specializations`` writes, in order, the entry it came from (an input
    entry, repeated once per context bucket, or a default entry): what its symbols were before the
    rewrite, for checking the paged entry against the original."""
    symbols = sorted({d for spec in report.inputs for d in spec.shape if isinstance(d, str)})
    context = report.context_dim or "ctx_len"
    origins = []
    for entry in entries or _default_entries(report, symbols, bound):
        known = {**bound, **entry["symbols"]}
        origins += [entry for _ in _entry_buckets(report, known.get(context), entry)]
    return origins


def _default_entries(report: RewriteReport, symbols: Sequence[str], bound: Mapping[str, int]) -> list[Entry]:
    """Without an input file: one ``Default`` entry with what the command line determines; with
    context buckets, one per phase as QEfficient writes them — prefill (its ``seq_len`` is left
    out unless bound) and decode with ``seq_len = 1``. A graph that never reads its cache
    (disaggregated prefill) has no decode phase; a TLM's decode ``seq_len`` (the speculative
    tokens + 1) is not known here and is left out."""
    if not (report.ctx_buckets or report.prefill_lengths) or "seq_len" not in symbols or "seq_len" in bound:
        return [{"name": "Default", "symbols": dict(bound)}]
    phases = [
        {"name": f"prefill{n}", "symbols": {**bound, "seq_len": n}, PREFILL_LENGTH: n}
        for n in report.prefill_lengths
    ]
    phases = phases or [{"name": "prefill", "symbols": dict(bound)}]
    if any("PagedCtxGather" in rewrite for rewrite in report.rewritten):
        tlm = any(spec.name == "num_logits_to_keep" for spec in report.inputs)
        phases.append({"name": "decode", "symbols": {**bound, **({} if tlm else {"seq_len": 1})}})
    return phases


def _entry_buckets(report: RewriteReport, context_len: int | None, entry: Entry) -> list[int | None]:
    """The buckets of one entry: the rewrite's ladder up to the entry's context (the context
    itself last), else the entry's context alone, else nothing known (``[None]``). A prefill
    entry of ``--prefill-lengths`` skips the buckets shorter than its chunk: no call can use them."""
    if report.ctx_buckets:
        ladder: list[int | None] = [b for b in report.ctx_buckets if context_len is None or b < context_len]
        buckets = ladder if context_len is None else [*ladder, context_len]
    else:
        buckets = [context_len] if context_len is not None else [None]
    chunk = entry.get(PREFILL_LENGTH)
    return [b for b in buckets if chunk is None or b is None or b >= chunk]


def _rows(entries: Iterable[Mapping[str, int]]) -> int:
    """The most token rows of any entry (``full_batch_size`` for CB, else ``batch_size``), 0 if unknown."""
    return max((v.get("full_batch_size", v.get("batch_size", 0)) for v in entries), default=0)


def _window_pools(report: RewriteReport, entries: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """``total_num_kv_blocks_w<W>`` of each window group with a symbolic pool, for each of the
    most rows of any entry plus the null block: a ring of ``ceil(W / kv_block_size)`` blocks, or
    the blocks a read ``[p0 - W, p0 + S)`` touches at the worst alignment, ``ceil((W + S - 1) /
    kv_block_size) + 1``, at most the widest table's; nothing when no entry knows its rows (or, for
    a logical window, neither ``S`` nor the widest table is known)."""
    rows = _rows(entries)
    chunk = _longest_chunk(report, entries)
    width = max((v.get("num_kv_blocks", 0) for v in entries), default=0)
    pools = {}
    for group in report.kv_groups:
        if group["window"] is None or not isinstance(group["pool_dim"], str) or not rows:
            continue
        if group["window_addressing"] == "ring":
            per_row = int(group["num_kv_blocks"])
        elif chunk is not None:
            per_row = math.ceil((group["window"] + chunk - 1) / report.kv_block_size) + 1
            per_row = min(per_row, width) if width else per_row
        elif width:
            per_row = width  # a chunk of unknown length: a row may hold its whole context
        else:
            continue
        pools[group["pool_dim"]] = rows * per_row + 1
    return pools


def _longest_chunk(report: RewriteReport, entries: Sequence[Mapping[str, int]]) -> int | None:
    """The most positions any entry's call writes (``position_ids``' second dim: static, or its
    symbol's value in every entry); None if some entry leaves it unbound (a prefill entry without
    ``seq_len``: its chunk may be as long as the context)."""
    spec = next((s for s in report.inputs if s.name == "position_ids" and len(s.shape) == 2), None)
    if spec is None:
        return None
    dim = spec.shape[1]
    if isinstance(dim, int):
        return dim
    if dim is None or not entries or any(dim not in v for v in entries):
        return None
    return max(v[dim] for v in entries)


def _default_pool(entries: Iterable[Mapping[str, int]]) -> int | None:
    """The most rows of any entry at the widest table, plus the null block; None if no entry
    knows its rows or its width."""
    entries = list(entries)
    rows = _rows(entries)
    width = max((v.get("num_kv_blocks", 0) for v in entries), default=0)
    return rows * width + 1 if rows and width else None


@dataclass(frozen=True)
class CustomIO:
    """QEfficient's per-tensor precisions (``custom_io.yaml``, read by ``qaic-exec
    -custom-IO-list-file``) and the YAML layout they came in, so the paged file is written alike.

    Layouts: ``io_list``, what QEfficient writes (``- IOName: past_key.0`` / ``Precision: float16``
    per tensor); ``mapping`` (``past_key.0: float16``); ``pairs`` (``- past_key.0: float16``).
    """

    precisions: dict[str, str]  # tensor name -> precision, in file order
    layout: CustomIOLayout

    def to_yaml(self) -> str:
        document: object
        if self.layout == "io_list":
            document = [{"IOName": name, "Precision": p} for name, p in self.precisions.items()]
        elif self.layout == "pairs":
            document = [{name: p} for name, p in self.precisions.items()]
        else:
            document = self.precisions
        import yaml  # only with --custom-io: the command line's start-up does not pay for it

        text: str = yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
        return text


def read_custom_io(path: str | os.PathLike[str]) -> CustomIO:
    """Read ``custom_io.yaml`` with a YAML parser; any of the layouts of ``CustomIO``."""
    import yaml  # only with --custom-io (see CustomIO.to_yaml)

    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read ({exc})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UsageError(f"{path}{line}: not valid YAML ({problem})") from None
    layout: CustomIOLayout
    if isinstance(document, dict):
        entries, layout = list(document.items()), "mapping"
    elif (
        isinstance(document, list)
        and document
        and all(isinstance(item, dict) and set(item) == {"IOName", "Precision"} for item in document)
    ):
        entries, layout = [(item["IOName"], item["Precision"]) for item in document], "io_list"
    elif isinstance(document, list) and all(isinstance(item, dict) and len(item) == 1 for item in document):
        entries, layout = [next(iter(item.items())) for item in document], "pairs"
    else:
        raise UsageError(
            f"{path}: expected QEfficient's custom IO list ('- IOName: <tensor>' / 'Precision: <type>' "
            "per tensor) or 'tensor_name: precision' entries"
        )
    precisions: dict[str, str] = {}
    for name, precision in entries:
        if not isinstance(name, str) or not isinstance(precision, str):
            raise UsageError(f"{path}: entry {name!r}: {precision!r}: expected a tensor name and a precision")
        if name in precisions:
            raise UsageError(f"{path}: tensor {name!r} is listed twice")
        precisions[name] = precision
    if not precisions:
        raise UsageError(f"{path}: no tensors listed")
    return CustomIO(precisions, layout)


def paged_custom_io(custom: CustomIO, report: RewriteReport, path: str | os.PathLike[str]) -> CustomIO:
    """The same entries for the paged model (names are unchanged). Entries for inputs the rewrite
    removed (``batch_index`` of a continuous-batching export) are dropped and recorded in
    ``report.custom_io_dropped``; any other name the paged model lacks is refused."""
    names = {spec.name for spec in [*report.inputs, *report.outputs]}
    removed = set(report.removed_inputs)
    report.custom_io_dropped = [name for name in custom.precisions if name in removed]
    missing = sorted(set(custom.precisions) - names - removed)
    if missing:
        raise UsageError(f"{path}: names tensors the paged model does not have: {', '.join(missing)}")
    kept = {name: p for name, p in custom.precisions.items() if name in names}
    return CustomIO(kept, custom.layout)


# 2: num_kv_blocks / total_num_kv_blocks are int or null; flags recorded. 3: "groups", a block
# table and pool dim per window length. 4: each group's pool as "pool_dim" (a name or null) and
# "total_num_kv_blocks" (an int or null), one type per field. 5: "wrapping_caches", the caches of
# block_table written at p % C.
MANIFEST_FORMAT = 5


def manifest(report: RewriteReport, source: Path, version: str, flags: Mapping[str, Any]) -> dict[str, Any]:
    """What a runtime needs to allocate the pool and build block tables, and the flags that shaped
    the output. Every field has one type: ``num_kv_blocks`` and ``total_num_kv_blocks`` are the
    static table width and pool size, or null where the dim stays symbolic (its name is in the
    ``block_table`` / cache input shapes). ``groups`` lists every block table with its caches,
    width, pool dim and window (null: full context), the full-context ``block_table`` first;
    ``wrapping_caches`` the caches of ``block_table`` written at ``p % C`` (``{"modulus": C,
    "ring": bool}``, ``ring`` when exactly), whose first columns a runtime treats as a ring."""
    return {
        "tool": {"name": TOOL_NAME, "version": version},
        "format": MANIFEST_FORMAT,
        "flags": dict(flags),
        "bound_dims": dict(sorted(report.bound_dims.items())),
        "source": {"file": source.name, "sha256": hashlib.sha256(source.read_bytes()).hexdigest()},
        "kv_block_size": report.kv_block_size,
        "num_kv_blocks": report.num_kv_blocks if isinstance(report.num_kv_blocks, int) else None,
        "total_num_kv_blocks": (
            report.total_num_kv_blocks if isinstance(report.total_num_kv_blocks, int) else None
        ),
        "ctx_buckets": [
            {"tokens": bucket, "num_kv_blocks": math.ceil(bucket / report.kv_block_size)}
            for bucket in report.ctx_buckets
        ],
        "prefill_lengths": report.prefill_lengths,
        "null_block": report.null_block,
        "windows": report.windows,
        "groups": report.kv_groups,
        "wrapping_caches": report.wrapping_caches,
        "inputs": [vars(spec) for spec in report.inputs],
        "outputs": [vars(spec) for spec in report.outputs],
        "removed_inputs": report.removed_inputs,
        "kept_inputs": report.kept_inputs,
        "other_retained_states": report.other_retained_states,
        "left_alone": [vars(op) for op in report.left_alone],
        "caches": [
            {
                "layer": c.layer,
                "kind": c.kind,
                "input": c.input,
                "output": c.output,
                "kv_heads": c.kv_heads,
                "head_dim": c.head_dim,
                "original_shape": c.original_shape,
            }
            for c in report.caches
        ],
    }


@dataclass(frozen=True)
class PreviousFiles:
    """What an earlier run recorded in its manifest as written by it: the files it may replace."""

    kinds: tuple[str, ...] = ()  # of SIDECAR_KINDS, the manifest itself included


def previous_files(manifest_path: Path) -> PreviousFiles:
    """The files the manifest at ``manifest_path`` says its run wrote — if it is ours (it carries
    the tool marker); a file of the same name that is not is nobody's to overwrite."""
    try:
        document = json.loads(manifest_path.read_text())
        if document["tool"]["name"] != TOOL_NAME:
            return PreviousFiles()
        kinds = {k for k in document.get("sidecars", []) if k in SIDECAR_KINDS} | {"manifest"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return PreviousFiles()
    return PreviousFiles(tuple(sorted(kinds)))


SIDECAR_KINDS = ("manifest", "specializations", "custom_io", "data")


def sidecar_paths(output: Path) -> dict[str, Path]:
    """Where each file beside ``output`` goes, by kind: ``<output>.json``, ``<stem>.specializations.json``,
    ``<stem>.custom_io.yaml`` (``<stem>`` is the output's name without its suffix) and
    ``<output>.data``."""
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return {
        "manifest": output.with_name(output.name + ".json"),
        "specializations": output.with_name(f"{stem}.specializations.json"),
        "custom_io": output.with_name(f"{stem}.custom_io.yaml"),
        "data": output.with_name(output.name + ".data"),  # --copy-weights
    }


def to_json(document: Mapping[str, Any], indent: int | None = 2) -> str:
    """Sorted keys, so the same content is the same bytes; ``indent=None`` is one line, written
    by the C encoder (the manifest of an 80-layer model is ~10x faster to write that way)."""
    return json.dumps(document, indent=indent, sort_keys=True) + "\n"
