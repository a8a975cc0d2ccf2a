"""The ``paged-rewrite`` command line.

    paged-rewrite model.onnx -o paged.onnx --kv-block-size 128     (rewrite is the default command)
    paged-rewrite verify model.onnx paged.onnx
    paged-rewrite demo

Errors print one line, ``paged-rewrite: <kind>: <message>``, and exit with the code of their
class (see ``paged_rewrite.errors`` and the README).
"""

from __future__ import annotations

import signal
import sys

INTERRUPTED_EXIT = 130  # as cli_errors.INTERRUPTED_EXIT, here before any import can be interrupted
try:  # the rest of start-up (onnx) is imported inside the commands, under main()'s handler
    import json
    import tempfile
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any, TypeVar

    import click

    from paged_rewrite.cli_errors import INTERNAL_ERROR_EXIT, DefaultToRewrite, fail
    from paged_rewrite.cli_options import plan_options
    from paged_rewrite.errors import NotAModelError, PagedRewriteError, UsageError, VerificationError
except KeyboardInterrupt:
    sys.stderr.write("paged-rewrite: interrupted: nothing was written\n")
    raise SystemExit(INTERRUPTED_EXIT) from None

F = TypeVar("F", bound=Callable[..., Any])


def _require_model_file(path: Path) -> None:
    if path.is_dir():
        raise NotAModelError(f"{path}: is a directory, not a model file")
    if not path.is_file():
        raise NotAModelError(f"{path}: no such file")


def _progress(message: str) -> None:
    """Progress for people watching a terminal; nothing in pipelines (stderr not a TTY)."""
    if sys.stderr.isatty():
        click.echo(f"paged-rewrite: {message} ...", err=True)


# Set by the console script (_entry.py): this process is the command, and owns SIGINT.
OWNS_SIGINT = False


def _output_landed() -> None:
    """The output is in place: a Ctrl-C from now on would report "nothing was written", which
    is false, and could interrupt the report. The command's own process ignores it from here."""
    if OWNS_SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _with_error(payload: dict[str, Any], error: PagedRewriteError | None) -> dict[str, Any]:
    """A report that also failed carries its error, so ``--json`` prints one document: a pipeline
    parsing stdout gets the report and the verdict together."""
    if error is None:
        return payload
    error.in_report = True  # type: ignore[attr-defined]
    return {**payload, "error": {"kind": error.kind, "message": str(error), "exit_code": error.exit_code}}


def _emit(as_json: bool, payload: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True) if as_json else text)


def _take_interrupts() -> None:
    """From here a Ctrl-C is a KeyboardInterrupt again, and the command cleans up (model_io). Each
    command calls this after its imports: until then the start-up handler (``_entry.py``) exits at
    once, because an exception raised inside a C extension's module init (onnx, onnxruntime: both
    pybind11) aborts the process instead of unwinding. An in-process caller keeps its own handler."""
    if OWNS_SIGINT:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _guarded(fn: F) -> F:
    """Turn our errors into one line + exit code; never show a traceback. With ``--json`` the
    error goes to stdout as JSON too, so a pipeline reading stdout sees it."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            result = fn(*args, **kwargs)
            _output_landed()  # done: a late Ctrl-C changes nothing (click would say "Aborted!")
            return result
        except PagedRewriteError as exc:  # already on stdout as JSON when the report carried it
            fail(exc.kind, str(exc), exc.exit_code, as_json and not getattr(exc, "in_report", False))
        except KeyboardInterrupt:  # temporary files are already gone (see model_io)
            fail("interrupted", "nothing was written", INTERRUPTED_EXIT, as_json)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:  # a bug of ours: still one line, distinct exit code
            fail("internal error", f"{type(exc).__name__}: {exc}", INTERNAL_ERROR_EXIT, as_json)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


@click.group(cls=DefaultToRewrite, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="paged-rewrite")
def main() -> None:
    """Rewrite QEfficient contiguous-KV ONNX exports into paged-KV models.

    \b
    Example:
      paged-rewrite demo
      paged-rewrite model.onnx -o paged.onnx --kv-block-size 128 --ctx-len 4096
      paged-rewrite verify model.onnx paged.onnx
    """


@main.command("rewrite")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the paged model.",
)
@click.option(
    "--kv-block-size", type=click.IntRange(min=2), required=True, help="Tokens per KV block (static, >= 2)."
)
@plan_options
@click.option(
    "--custom-io",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="QEfficient custom_io.yaml to carry over to the paged model.",
)
@click.option(
    "--copy-weights",
    is_flag=True,
    help="Copy external weights into <output>.data instead of referencing the input's data files.",
)
@click.option(
    "--full-check",
    is_flag=True,
    help="Also run the ONNX checker's strict shape inference, and show every value static under "
    "every specialization written.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_guarded
def rewrite_command(
    model: Path,
    output: Path,
    kv_block_size: int,
    custom_io: Path | None,
    copy_weights: bool,
    full_check: bool,
    as_json: bool,
    **plan: Any,  # the flags of plan_options, named as rewrite() names them
) -> None:
    """Rewrite MODEL into a paged-KV model, with its manifest and specializations beside it.

    \b
    Example:
      paged-rewrite model.onnx -o paged.onnx --kv-block-size 128 --ctx-len 4096
      paged-rewrite model.onnx -o paged.onnx --kv-block-size 128 --ctx-buckets 512,1024,2048,4096
      paged-rewrite swa.onnx -o paged.onnx --kv-block-size 32 --ctx-len 128 --dim sliding_window=32
    """
    from paged_rewrite.api import rewrite

    _take_interrupts()
    _progress(f"rewriting {model}")
    report = rewrite(
        model,
        output,
        kv_block_size,
        custom_io=custom_io,
        copy_weights=copy_weights,
        full_check=full_check,
        **plan,
    )
    _output_landed()
    _emit(as_json, report.to_dict(), report.summary())


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--kv-block-size",
    type=click.IntRange(min=2),
    default=128,
    show_default=True,
    help="Block size for the rewrite plan.",
)
@plan_options
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@_guarded
def inspect_command(
    model: Path,
    kv_block_size: int,
    as_json: bool,
    **plan: Any,  # the flags of plan_options, named as rewrite() names them
) -> None:
    """List the cache sites of MODEL and what a rewrite with the same flags would do (and exit as
    it would); writes nothing. The flags mean what they mean for a rewrite.

    \b
    Example:
      paged-rewrite inspect model.onnx --kv-block-size 128 --json
    """
    from paged_rewrite.inspect import inspect_model

    _take_interrupts()

    found = inspect_model(model, kv_block_size, **plan)
    _emit(as_json, found.to_dict(), found.summary())
    if found.plan_error is not None:  # the code a rewrite with these flags would exit with
        click.echo(f"paged-rewrite: {found.plan_error_kind}: {found.plan_error}", err=True)
        sys.exit(found.plan_exit_code)


@main.command("verify")
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("paged", type=click.Path(path_type=Path))
@click.option(
    "--block-order",
    type=click.Choice(["identity", "shuffled"]),
    default="shuffled",
    show_default=True,
    help="Physical order in which pool blocks are handed out.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for prompts and block order.")
@click.option(
    "--ctx-len",
    type=click.IntRange(min=1),
    default=None,
    help="Context of the original (default: num_kv_blocks*kv_block_size of the paged model).",
)
@click.option("--decode-steps", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--full-width",
    is_flag=True,
    help="Pass the full block_table every step (default: the smallest context bucket covering the batch).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the per-step report as JSON.")
@_guarded
def verify_command(
    original: Path,
    paged: Path,
    block_order: str,
    seed: int,
    ctx_len: int | None,
    decode_steps: int,
    full_width: bool,
    as_json: bool,
) -> None:
    """Drive ORIGINAL and PAGED through the same scenario and compare logits and isolation.

    \b
    Example:
      paged-rewrite verify model.onnx paged.onnx --block-order shuffled --seed 3
    """
    from paged_rewrite.runtime.verify import verify

    _take_interrupts()
    for path in (original, paged):
        _require_model_file(path)
    report = verify(
        original,
        paged,
        block_order=block_order,
        seed=seed,
        ctx_len=ctx_len,
        num_decode=decode_steps,
        full_width=full_width,
    )
    mismatch = None
    if not report.ok:
        breaches = sum(bool(step.foreign_blocks_changed) for step in report.steps)
        cut = sum(bool(step.rows_cut) for step in report.steps)
        mismatch = VerificationError(
            f"{paged} does not match {original} (max abs logit diff {report.max_abs_diff:.3g}, "
            f"final KV {report.kv_max_abs_diff:.3g}, isolation breaches {breaches}, steps with a row "
            f"cut by a narrow table {cut})"
        )
    _emit(as_json, _with_error(report.to_dict(), mismatch), report.summary())
    if mismatch is not None:
        raise mismatch


@main.command("demo")
@click.option("--kv-block-size", type=click.IntRange(min=2), default=16, show_default=True)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the built and rewritten models here (default: a temporary folder).",
)
@click.option("--json", "as_json", is_flag=True)
@_guarded
def demo_command(kv_block_size: int, workdir: Path | None, as_json: bool) -> None:
    """Build a small QEfficient-style export, rewrite it, verify it, print the reports.

    \b
    Example:
      paged-rewrite demo --kv-block-size 16
    """
    from paged_rewrite.api import rewrite
    from paged_rewrite.builder import ExportSpec, write_qeff_export
    from paged_rewrite.runtime.verify import verify

    _take_interrupts()
    if workdir is not None:
        _refuse_foreign_demo_files(workdir)
    with tempfile.TemporaryDirectory() as tmp:
        folder = workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        original = write_qeff_export(folder / "model.onnx", ExportSpec())
        report = rewrite(original, folder / "paged.onnx", kv_block_size, ctx_len=128)
        checked = verify(original, folder / "paged.onnx")
        if workdir is None:  # the folder is deleted on return: name the files, not where they were
            report.input_path, report.output_path = original.name, None
            report.files = {kind: Path(path).name for kind, path in report.files.items()}
        mismatch = (
            None if checked.ok else VerificationError("the demo's paged model does not match its original")
        )
        _emit(
            as_json,
            _with_error({"rewrite": report.to_dict(), "verify": checked.to_dict()}, mismatch),
            f"{report.summary()}\n\nverify:\n{checked.summary()}",
        )
    if mismatch is not None:
        raise mismatch


def _refuse_foreign_demo_files(workdir: Path) -> None:
    """The demo writes ``model.onnx`` and ``paged.onnx`` (with its sidecars) into ``--workdir``;
    it replaces them only when an earlier demo wrote them (its manifest says so), never a file of
    the user's."""
    from paged_rewrite import handoff

    ours = handoff.previous_files(workdir / "paged.onnx.json").kinds
    for name in ("model.onnx", "paged.onnx"):
        if (workdir / name).exists() and not ours:
            raise UsageError(
                f"--workdir {workdir} already holds {name}, which the demo did not write; "
                "give an empty or new folder"
            )


if __name__ == "__main__":
    main()
