"""The console script's entry: a Ctrl-C from the first moment the command's own code runs is one
line and exit 130, not a traceback.

Python raises ``KeyboardInterrupt`` wherever it happens to be; while the command line and its
imports load (a second or more on a cold start), no handler of ours is active yet. So the very
first thing done here is a signal handler that writes the line and exits (nothing has been
written by then). Each command hands SIGINT back to Python's own handler once its imports are
done (``cli._take_interrupts``): from there it cleans up its temporary files and prints the same
line. Until then the handler exits without unwinding, since an exception raised inside a C
extension's module init (onnx and onnxruntime are pybind11 modules) aborts the process.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    if "--json" in sys.argv[1:]:  # as cli_errors.fail reports it, for a pipeline reading stdout
        os.write(
            1, b'{"error": {"kind": "interrupted", "message": "nothing was written", "exit_code": 130}}\n'
        )
    os.write(2, b"paged-rewrite: interrupted: nothing was written\n")
    # Exit at once, unwinding nothing: the interrupt may land inside a C extension's module init
    # (onnx, onnxruntime: pybind11), where a Python exception aborts the process (SIGABRT).
    os._exit(130)


def main() -> None:
    """The ``paged-rewrite`` console script."""
    catch_interrupts_while_starting()
    run()


def catch_interrupts_while_starting() -> None:
    signal.signal(signal.SIGINT, _interrupted_while_starting)


def run() -> None:
    from paged_rewrite import cli

    cli.OWNS_SIGINT = True  # this process is the command (in-process callers keep their handler)
    sys.exit(cli.main())
