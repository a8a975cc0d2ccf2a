"""The Python entry point: ``rewrite(input, output, kv_block_size=...)``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from paged_rewrite import handoff
from paged_rewrite.errors import InternalError, NotAModelError, OutputError, PagedRewriteError, UsageError
from paged_rewrite.model_io import data_files, load_model, save_model
from paged_rewrite.pipeline import RewriteOptions, rewrite_model
from paged_rewrite.report import RewriteReport

if TYPE_CHECKING:
    from typing_extensions import TypedDict

    class PlanFlags(TypedDict, total=False):
        """The keyword flags of ``rewrite`` that shape the plan: what ``inspect_model`` and the
        ``rewrite``/``inspect`` commands pass on unchanged (``cli_options.plan_options``)."""

        ctx_len: int | None
        ctx_buckets: Sequence[int] | None
        prefill_lengths: Sequence[int] | None
        num_blocks: int | None
        dims: Mapping[str, int] | None
        specializations: str | os.PathLike[str] | None
        shared_window_table: bool


VERSION = "0.1.0"
# The longest context (and so block, bucket) in tokens: QEfficient exports mark padding with the
# position INT32_MAX, so no valid position reaches it.
MAX_CONTEXT = 2**31 - 1
MAX_DIM = 2**63 - 1  # ONNX dims are int64


def rewrite(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None,
    kv_block_size: int,
    ctx_len: int | None = None,
    num_blocks: int | None = None,
    dims: Mapping[str, int] | None = None,
    copy_weights: bool = False,
    specializations: str | os.PathLike[str] | None = None,
    custom_io: str | os.PathLike[str] | None = None,
    full_check: bool = False,
    ctx_buckets: Sequence[int] | None = None,
    shared_window_table: bool = False,
    prefill_lengths: Sequence[int] | None = None,
) -> RewriteReport:
    """Rewrite the QEfficient export at ``input_path`` into a paged-KV model at ``output_path``.

    ``dims`` binds symbolic dims of the input (``{"sliding_window": 32}``); ``ctx_len`` is
    shorthand for ``dims={"ctx_len": ...}``; the values a ``specializations`` file gives every
    entry bind dims too. ``ctx_buckets`` (tokens) are the table widths a runtime may pass, one
    specialization per bucket and phase; by default powers of two from one block up to the
    context when it is known (``buckets.py``). With more than one bucket the table width stays
    symbolic; ``ctx_len`` bounds the largest bucket and is always one. Beside the output go its
    manifest (``<output>.json``), the paged
    ``<stem>.specializations.json`` and, with ``custom_io``, ``<stem>.custom_io.yaml``: all land
    together with the model or not at all, and none replaces a file an earlier run of this tool
    did not record as its own (``model_io.save_model``). Missing output folders are created.
    The output is checked by path with the ONNX checker. ``full_check`` adds strict shape
    inference, and shows that every value gets a static shape under every entry of the paged
    specializations (``report.static_shapes``); a value the rewrite made non-static fails the
    rewrite, naming it. The input is only read. With ``output_path=None`` nothing is written (a
    dry run). Ring-buffer (sliding-window) caches get a block table and pool dim per window
    length (``block_table_w<W>``, ``total_num_kv_blocks_w<W>``) unless ``shared_window_table``,
    which keeps them in the first columns of the one ``block_table``. ``prefill_lengths`` (tokens)
    writes one prefill specialization per length (``seq_len``) and context bucket instead of one
    with ``seq_len`` unbound, so a runtime can pad each prefill call to the shortest that holds it.
    Raises a ``PagedRewriteError`` subclass (with its exit code) on bad input.
    """
    _check_ranges(kv_block_size, ctx_len, num_blocks, dims or {}, ctx_buckets, prefill_lengths)
    if prefill_lengths and specializations:
        raise UsageError(
            "--prefill-lengths writes the default specializations; with --specializations, give one "
            "prefill entry per seq_len in the file instead"
        )
    if output_path is not None and (not os.fspath(output_path) or not Path(output_path).name):
        raise UsageError(f"the output path {os.fspath(output_path)!r} names no file (-o paged.onnx, say)")
    entries = handoff.read_specializations(specializations) if specializations else None
    precisions = handoff.read_custom_io(custom_io) if custom_io else None
    bound = _bind(dims or {}, handoff.shared_dims(entries) if entries else {})
    model = load_model(input_path, check_data_paths=False)
    weights = data_files(model, input_path)  # refuses unsafe locations; protected from overwriting below
    _refuse_unknown_dims(dims or {}, model, input_path)
    buckets = tuple(ctx_buckets) if ctx_buckets is not None else None
    options = RewriteOptions(
        kv_block_size, ctx_len, num_blocks, bound, buckets, shared_window_table, tuple(prefill_lengths or ())
    )
    try:
        report = rewrite_model(model, options)
    except InternalError as error:  # a step broke: an invalid input explains it; else it is our bug
        _blame_the_input(input_path)
        raise InternalError(f"{input_path}: {error}") from error.__cause__
    except PagedRewriteError as error:  # name the model in every refusal
        raise type(error)(f"{input_path}: {error}") from None
    except Exception:
        _blame_the_input(input_path)  # an invalid input explains the failure; else it is our bug
        raise
    report.input_path = str(input_path)
    bound = report.bound_dims  # with --ctx-len bound onto the context dim, as the rewrite saw them
    specialized = handoff.paged_specializations(report, entries, bound, num_blocks)
    sidecars = {"specializations": handoff.to_json(specialized)}
    if full_check:
        origins = handoff.entry_origins(report, entries, bound)
        _check_static_shapes(model, report, specialized, origins, input_path)
    if precisions is not None and custom_io is not None:
        sidecars["custom_io"] = handoff.paged_custom_io(precisions, report, custom_io).to_yaml()
    if output_path is None:
        return report
    target, source = Path(output_path), Path(input_path)
    paths = handoff.sidecar_paths(target)
    written_by_us = list({target, *paths.values()})
    _refuse_overwriting_inputs(written_by_us, [input_path, *weights, specializations, custom_io])
    previous = handoff.previous_files(paths["manifest"])  # what an earlier run into this name wrote
    flags = {
        "kv_block_size": kv_block_size,
        "ctx_len": ctx_len,
        "ctx_buckets": list(ctx_buckets) if ctx_buckets is not None else None,
        "prefill_lengths": list(prefill_lengths) if prefill_lengths else None,
        "num_blocks": num_blocks,
        "dims": dict(sorted((dims or {}).items())),
        "specializations": Path(specializations).name if specializations else None,
        "custom_io": Path(custom_io).name if custom_io else None,
        "copy_weights": copy_weights,
        "shared_window_table": shared_window_table,
    }
    document = handoff.manifest(report, source, VERSION, flags)
    kinds = [*sidecars, "manifest", *(["data"] if copy_weights and weights else [])]
    document["sidecars"] = sorted(kinds)  # kinds, so names follow the output
    sidecars["manifest"] = handoff.to_json(document, indent=None)
    replaceable = [paths[kind] for kind in previous.kinds]
    try:
        save_model(
            model,
            target,
            source,
            copy_weights,
            full_check,
            sidecars={paths[kind]: text for kind, text in sidecars.items()},
            replaceable=replaceable,
            obsolete=[paths[kind] for kind in set(previous.kinds) - set(kinds)],  # e.g. a custom_io.yaml
        )
    except OutputError as error:
        if "fails the ONNX checker" in str(error):
            _blame_the_input(input_path, full_check)
        raise
    report.output_path = str(target)
    report.files = {kind: str(paths[kind]) for kind in sorted(sidecars)}
    return report


def _check_static_shapes(
    model: onnx.ModelProto,
    report: RewriteReport,
    specialized: dict[str, Any],
    origins: list[handoff.Entry],
    input_path: str | os.PathLike[str],
) -> None:
    """Every value static under every specialization written, or a one-line error naming the
    first value the rewrite made non-static (values already non-static in the input are reported)."""
    from paged_rewrite.static_shapes import check_specializations  # --full-check only: not at start-up

    report.static_shapes = check_specializations(
        model, report, specialized, origins, lambda: load_model(input_path, check_data_paths=False)
    )
    for result in report.static_shapes:
        if not result.ok:
            raise OutputError(
                f"{input_path}: under specialization {result.specialization!r} the rewrite leaves "
                f"{result.made_non_static[0].describe()} without a static shape"
            )


def _check_ranges(
    kv_block_size: int,
    ctx_len: int | None,
    num_blocks: int | None,
    dims: Mapping[str, int],
    ctx_buckets: Sequence[int] | None,
    prefill_lengths: Sequence[int] | None = None,
) -> None:
    """Values past any context a model can have, or past an ONNX dim, are usage errors here rather
    than overflows deep in the rewrite."""
    limits = [("--kv-block-size", kv_block_size, MAX_CONTEXT), ("--ctx-len", ctx_len, MAX_CONTEXT)]
    limits += [("--ctx-buckets", bucket, MAX_CONTEXT) for bucket in ctx_buckets or ()]
    limits += [("--prefill-lengths", length, MAX_CONTEXT) for length in prefill_lengths or ()]
    limits += [("--num-blocks", num_blocks, MAX_DIM)]
    limits += [(f"--dim {name}", value, MAX_DIM) for name, value in dims.items()]
    for flag, value, limit in limits:
        if value is not None and value > limit:
            what = "tokens: no context is longer" if limit == MAX_CONTEXT else "the largest ONNX dim"
            raise UsageError(f"{flag} {value} is out of range: at most {limit} ({what})")


def _refuse_unknown_dims(
    dims: Mapping[str, int], model: onnx.ModelProto, path: str | os.PathLike[str]
) -> None:
    """``--dim NAME=V`` must name a symbolic dim of the model: a typo would otherwise bind nothing."""
    known = symbolic_dims(model)
    unknown = sorted(set(dims) - known)
    if unknown:
        raise UsageError(
            f"{path}: --dim {unknown[0]}={dims[unknown[0]]}: the model has no dim {unknown[0]!r}; "
            f"its symbolic dims are {', '.join(sorted(known)) or 'none'}"
        )


def symbolic_dims(model: onnx.ModelProto) -> set[str]:
    """The names of the symbolic dims of ``model``'s graph inputs: what a user binds. Outputs and
    recorded intermediate shapes carry names the exporter's shape inference made up
    (``Castlogits_dim_0``, ``CustomRMSNorm..._dim_0``); binding those would mean nothing."""
    values = list(model.graph.input)
    return {
        dim.dim_param
        for value in values
        for dim in value.type.tensor_type.shape.dim
        if dim.HasField("dim_param") and dim.dim_param
    }


def _refuse_overwriting_inputs(outputs: list[Path], inputs: list[str | os.PathLike[str] | None]) -> None:
    """No file the rewrite writes may be one it reads (the model, its weights, the hand-off inputs)."""
    protected = {Path(p).resolve(): Path(p) for p in inputs if p is not None}
    for output in outputs:
        if output.resolve() in protected:
            raise UsageError(f"{output}: the output would overwrite the input {protected[output.resolve()]}")


def _blame_the_input(path: str | os.PathLike[str], full_check: bool = False) -> None:
    """Raise ``NotAModelError`` if the input itself fails the ONNX checker (by path; with the
    strict shape inference too when the output was held to it: some real exports fail it, e.g.
    QEfficient's ``CtxScatter3DInt`` scatters with int32 indices).

    Run only after something went wrong, so valid inputs pay nothing for it."""
    try:
        onnx.checker.check_model(os.fspath(path), full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, UnicodeDecodeError) as exc:
        text = str(exc).strip().splitlines()
        raise NotAModelError(
            f"{path}: not a valid ONNX model: {text[0] if text else type(exc).__name__}"
        ) from None


def _bind(flags: Mapping[str, int], from_file: Mapping[str, int]) -> dict[str, int]:
    for name, value in from_file.items():
        if name in flags and flags[name] != value:
            raise UsageError(
                f"--dim {name}={flags[name]} contradicts the specializations file ({name}={value})"
            )
    return {**from_file, **flags}
