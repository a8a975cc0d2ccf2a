"""How the command line reports what goes wrong: one line, ``paged-rewrite: <kind>: <message>``,
and the exit code of its class (README), for our errors and click's own alike; and the group that
takes a first argument that is no command as the model of a ``rewrite``."""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

INTERRUPTED_EXIT = 130  # the shell's convention for SIGINT
INTERNAL_ERROR_EXIT = 1


def fail(kind: str, message: str, exit_code: int, as_json: bool) -> NoReturn:
    """The one line every error prints (and, for ``--json``, the same as JSON on stdout)."""
    line = " ".join(message.split())  # one line, whatever the message held
    if as_json:
        click.echo(json.dumps({"error": {"kind": kind, "message": line, "exit_code": exit_code}}))
    click.echo(f"paged-rewrite: {kind}: {line}", err=True)
    sys.exit(exit_code)


class DefaultToRewrite(click.Group):
    """A group whose first argument, when not a subcommand, is the model of a ``rewrite``; every
    error, click's own included, is one line with its exit code (README)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:
            raise click.UsageError(f"no command or model given; {self._commands_hint()}")
        first = args[0]
        if first not in self.commands and first not in ("--help", "-h", "--version"):
            if _looks_like_a_command(first):
                close = difflib.get_close_matches(first, list(self.commands), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise click.UsageError(f"no such command '{first}'{hint}; {self._commands_hint()}")
            args = ["rewrite", *args]
        return super().parse_args(ctx, args)

    def _commands_hint(self) -> str:
        return (
            f"the commands are {', '.join(sorted(self.commands))}, or give a model to rewrite: "
            "paged-rewrite MODEL -o OUTPUT --kv-block-size N (see paged-rewrite --help)"
        )

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> Any:
        arguments = list(sys.argv[1:] if args is None else args)
        standalone = extra.pop("standalone_mode", True)
        as_json = "--json" in arguments
        try:
            result = super().main(arguments, prog_name or "paged-rewrite", standalone_mode=False, **extra)
        except click.ClickException as error:  # bad or missing flags, unknown options and commands
            where = error.ctx.command_path if isinstance(error, click.UsageError) and error.ctx else ""
            command = where.removeprefix("paged-rewrite").strip()
            message = error.format_message().rstrip(".")
            hint = f" (see paged-rewrite {command + ' ' if command else ''}--help)" if command else ""
            fail("usage", f"{command + ': ' if command else ''}{message}{hint}", 2, as_json)
        except (click.Abort, KeyboardInterrupt):
            fail("interrupted", "nothing was written", INTERRUPTED_EXIT, as_json)
        if not standalone:
            return result
        sys.exit(result if isinstance(result, int) else 0)


def _looks_like_a_command(word: str) -> bool:
    """A first word that is no file and has neither a suffix nor a folder in it is a mistyped
    command (``verfiy``), not a model path."""
    return not word.startswith("-") and not Path(word).exists() and "." not in word and "/" not in word
