"""Show that a paged model is static under each specialization it is compiled with.

The QAIC compiler specializes a model per entry of ``specializations.json`` (the ``symbols``
binding every symbolic input dim) and needs every value to get a fully static shape then. For
each entry this module binds the symbols, walks the model with its local functions expanded
(``shape_propagation``) and lists every value, in the main graph or inside a function body,
whose shape is not fully static.

A value the original export already leaves non-static under the same binding (an exporter
quirk, or an op ONNX inference rejects, e.g. QEfficient's ``CtxScatter3DInt`` scattering with
int32 indices) is reported apart, and so is everything computed from such a value: the rewrite
is blamed only for what it made non-static. The original is walked only when the paged model
has something to explain.

Symbols an entry leaves open (a command line without ``--specializations`` cannot know
``batch_size``) are checked at placeholder values, listed in the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import onnx

from paged_rewrite.graph import dims_of
from paged_rewrite.shape_propagation import ValueShape, propagate

if TYPE_CHECKING:
    from paged_rewrite.report import RewriteReport

PLACEHOLDER = 1  # the value of a symbol an entry leaves open


@dataclass(frozen=True)
class NonStaticValue:
    """A value whose shape a specialization does not fix."""

    name: str  # ``<calling node>[<function>]/<name>`` inside a function body
    op: str
    shape: list[int | str | None] | None  # None: not even the rank is known
    problem: str | None = None  # why ONNX shape inference gave up on it, if it did

    @classmethod
    def of(cls, value: ValueShape) -> NonStaticValue:
        return cls(value.name, value.op, list(value.dims) if value.dims is not None else None, value.problem)

    def describe(self) -> str:
        shape = (
            "?"
            if self.shape is None
            else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        )
        return f"{self.name!r} ({self.op}, shape {shape})" + (f": {self.problem}" if self.problem else "")


@dataclass
class StaticShapeReport:
    """One specialization entry checked: what was bound and which values stay non-static."""

    specialization: str
    symbols: dict[str, int]  # the paged model's symbols as bound
    placeholders: dict[str, int] = field(default_factory=dict)  # symbols the entry left open
    values: int = 0  # values checked (every node output, function bodies expanded per call)
    made_non_static: list[NonStaticValue] = field(default_factory=list)  # by the rewrite
    already_non_static: list[NonStaticValue] = field(default_factory=list)  # as in the original

    @property
    def ok(self) -> bool:
        return not self.made_non_static


def check_static(
    paged: onnx.ModelProto,
    symbols: Mapping[str, int],
    original: Callable[[], onnx.ModelProto] | None = None,
    original_symbols: Mapping[str, int] | None = None,
    name: str = "",
) -> StaticShapeReport:
    """Check ``paged`` with its input symbols bound to ``symbols``. ``original`` loads the export
    it was rewritten from, checked (only if needed) with ``original_symbols``; symbols of the
    original missing there take the paged binding's value of the same name, else a placeholder."""
    result = StaticShapeReport(name, dict(sorted(symbols.items())))
    values = propagate(paged, symbols)
    result.values = len(values)
    non_static = [v for v in values.values() if not v.static]
    if not non_static:
        return result
    explained: set[str] = set()
    if original is not None:
        source = original()
        binding = {**symbols, **(original_symbols or {})}
        for symbol in sorted(_symbols(source) - set(binding)):
            binding[symbol] = result.placeholders[f"original:{symbol}"] = PLACEHOLDER
        explained = {v.name for v in propagate(source, binding).values() if not v.static}
    for value in non_static:  # in walk order: a value's producers come first
        if value.name in explained or any(name in explained for name in value.inputs):
            explained.add(value.name)
            result.already_non_static.append(NonStaticValue.of(value))
        else:
            result.made_non_static.append(NonStaticValue.of(value))
    return result


def check_specializations(
    paged: onnx.ModelProto,
    report: RewriteReport,
    written: Mapping[str, Any],
    origins: list[dict[str, Any]],
    original: Callable[[], onnx.ModelProto],
) -> list[StaticShapeReport]:
    """Check every entry of the paged ``specializations.json`` the rewrite ``written``, each
    against the entry it came from (``origins``, one per written entry: see
    ``handoff.entry_origins``), with open symbols completed as the rewrite completes them."""
    results = []
    loaded: list[onnx.ModelProto] = []

    def load_once() -> onnx.ModelProto:
        if not loaded:
            loaded.append(original())
        return loaded[0]

    for index, entry in enumerate(written["specializations"]):
        source = {**report.bound_dims, **origins[index]["symbols"]}
        symbols, placeholders = _complete(report, {k: int(v) for k, v in entry["symbols"].items()}, source)
        context = report.context_dim or "ctx_len"
        if context not in source and "num_kv_blocks" in symbols:  # the original's context is the table's
            source[context] = symbols["num_kv_blocks"] * report.kv_block_size
        result = check_static(paged, symbols, load_once, source, str(entry.get("name", index)))
        result.placeholders = {**placeholders, **result.placeholders}
        results.append(result)
    return results


def _complete(
    report: RewriteReport, symbols: dict[str, int], source: Mapping[str, int]
) -> tuple[dict[str, int], dict[str, int]]:
    """Values for the paged symbols an entry leaves open: ``num_kv_blocks`` from the original's
    context where known, ``total_num_kv_blocks`` as the rewrite sizes a pool by default (rows at
    full context + the null block), any other at ``PLACEHOLDER``."""
    needed = {d for spec in report.inputs for d in spec.shape if isinstance(d, str)}
    placeholders: dict[str, int] = {}
    context = source.get(report.context_dim or "ctx_len")
    if "num_kv_blocks" in needed and "num_kv_blocks" not in symbols:
        blocks = math.ceil(context / report.kv_block_size) if context else PLACEHOLDER
        symbols["num_kv_blocks"] = placeholders["num_kv_blocks"] = blocks
    for symbol in sorted(needed - set(symbols) - {"total_num_kv_blocks"}):
        symbols[symbol] = placeholders[symbol] = PLACEHOLDER
    if "total_num_kv_blocks" in needed and "total_num_kv_blocks" not in symbols:
        rows = symbols.get("full_batch_size", symbols.get("batch_size", PLACEHOLDER))
        per_row = symbols.get("num_kv_blocks", report.num_kv_blocks)
        total = rows * per_row + 1 if isinstance(per_row, int) else PLACEHOLDER
        symbols["total_num_kv_blocks"] = placeholders["total_num_kv_blocks"] = total
    return symbols, placeholders


def _symbols(model: onnx.ModelProto) -> set[str]:
    return {d for value in model.graph.input for d in dims_of(value) if isinstance(d, str)}
