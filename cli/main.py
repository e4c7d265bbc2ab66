"""The `llmctl` command. Each command lives in its own module and imports torch & co. only when it runs."""

from __future__ import annotations

import typer

from llmctl import __version__
from llmctl.cli import bench, build_image, generate, quantize, serve
from llmctl.cli.console import NORMAL, QUIET, VERBOSE, console, fail, set_verbosity

app = typer.Typer(
    name="llmctl",
    help="From an LLM checkpoint to a measured production service: quantize, build-image, serve, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("generate")(generate.generate)
app.command("serve")(serve.serve)
app.command("quantize")(quantize.quantize)
app.command("build-image")(build_image.build_image)
app.add_typer(bench.app, name="bench")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    quiet: bool = typer.Option(False, "--quiet", "-q", envvar="LLMCTL_QUIET",
                               help="Results and errors only: no progress, tables or notes."),
    verbose: bool = typer.Option(False, "--verbose", "-v", envvar="LLMCTL_VERBOSE",
                                 help="Debug logs, and the traceback behind an error."),
) -> None:
    """llmctl: quantize, serve and measure LLMs. Give --quiet / --verbose before the command."""
    if quiet and verbose:
        fail("--quiet and --verbose exclude each other")
    set_verbosity(QUIET if quiet else VERBOSE if verbose else NORMAL)
    console.json = False  # until a command's --output json says otherwise


BOOLEAN_WORDS = {"true", "false", "yes", "no", "on", "off"}


def check_flag_values(argv: list[str]) -> None:
    """`--chat true` parses as the flag and then `true` as the next positional argument (a model directory,
    say), which fails far from its cause: name it instead."""
    command = typer.main.get_command(app)  # (typer vendors click: duck-typed, not isinstance)
    for i, arg in enumerate(argv):
        if arg in getattr(command, "commands", {}):
            command = command.commands[arg]
        elif i + 1 < len(argv) and argv[i + 1].lower() in BOOLEAN_WORDS:
            flag = next((p for p in command.params if getattr(p, "is_flag", False)
                         and arg in (*p.opts, *p.secondary_opts)), None)
            if flag is not None:
                spellings = " or ".join(f"`{o}`" for o in (flag.opts[0], *flag.secondary_opts[:1]))
                fail(f"{arg} is a flag and takes no value: write {spellings}, not `{arg} {argv[i + 1]}`", 2)


def main() -> None:
    import sys

    try:
        check_flag_values(sys.argv[1:])
    except typer.Exit as exc:  # raised outside the app, which would otherwise turn it into the exit code
        sys.exit(exc.exit_code)
    app()
