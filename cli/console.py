"""The one console every command writes through, at the verbosity `llmctl --quiet / --verbose` chose.

Three kinds of output: results (what the command was run for: generated text, the line that names what
was written) always print; information (progress, spinners, tables, notes) is left out by --quiet;
debug detail and the traceback behind an error only show with --verbose. Errors end in one line on
stderr and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from rich.console import Console as RichConsole

QUIET, NORMAL, VERBOSE = -1, 0, 1


class Console(RichConsole):
    verbosity = NORMAL
    json = False  # --output json: the command emits its result as one JSON document instead of text

    def info(self, *objects, **kwargs) -> None:
        """Progress notes, tables, headers: everything but the result, left out by --quiet."""
        if self.verbosity >= NORMAL:
            self.print(*objects, **kwargs)

    def debug(self, *objects, **kwargs) -> None:
        if self.verbosity >= VERBOSE:
            self.print(*objects, style="dim", **kwargs)

    def status(self, *args, **kwargs):
        """A spinner while something runs; nothing with --quiet (the context still has `update`)."""
        if self.verbosity < NORMAL:
            return _Silent()
        return super().status(*args, **kwargs)

    @property
    def quiet_progress(self) -> bool:
        """For rich Progress bars: pass as `disable=`."""
        return self.verbosity < NORMAL


OUTPUTS = ("text", "json")


def start_output(output: str) -> None:
    """A command's --output: json leaves out everything but one JSON document on stdout (`emit`), errors
    still one line on stderr with a non-zero exit."""
    if output not in OUTPUTS:
        fail(f"--output must be one of {', '.join(OUTPUTS)}, got {output!r}", 2)
    console.json = output == "json"
    if console.json:
        set_verbosity(QUIET)


def emit(result: dict) -> None:
    """The result as JSON on stdout (--output json), plain: no markup, colour or wrapping."""
    import json

    sys.stdout.write(json.dumps(result, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


class _Silent(contextlib.nullcontext):
    def __enter__(self):
        return self  # `with console.status(...) as status: status.update(...)` works under --quiet too

    def update(self, *args, **kwargs) -> None:
        pass


console = Console(highlight=False, soft_wrap=True)  # a path or a long line stays whole, never wrapped
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def set_verbosity(level: int) -> None:
    """The level for the console and for llmctl's loggers (the server's, the engine's)."""
    console.verbosity = err_console.verbosity = level
    logging.getLogger("llmctl").setLevel({QUIET: logging.WARNING, NORMAL: logging.INFO}.get(level, logging.DEBUG))
    logging.getLogger("llmctl.access").setLevel(logging.INFO)  # a server's access log is its record, never cut
    logging.getLogger("uvicorn").setLevel(logging.WARNING if level == QUIET else logging.NOTSET)


def fail(message: str, code: int = 1):
    import typer

    if console.verbosity >= VERBOSE and sys.exc_info()[0] is not None:
        err_console.print_exception()
    from rich.text import Text

    # The message as plain text: rich markup would eat a bracketed part such as `llmctl[serve]`.
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)
    raise typer.Exit(code)
