"""The `tav` command line: this module registers the commands and turns failures into one line.

The commands live one group per module: `tuning` (tune, import, demo), `editing` (invert, edit,
eval), `batch`, `store` (ls, rm, gc, verify, config) and `ui`; their shared options are declared once
in `options`, what goes to stdout and stderr is decided in `output`, and `setup` turns options into
settings, a session and a project. Heavy libraries are imported inside the commands, after their
inputs are checked, so `tav --help` and every mistake answer at once.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from tavcli import __version__
from tavcli.cli import batch, editing, store, tuning, ui
from tavcli.cores import choose_wait_policy
from tavcli.errors import Interrupted, TavError, interruption

__all__ = ["app", "main"]

app = typer.Typer(
    name="tav",
    help=(
        "Tune-A-Video from the command line: tune Stable Diffusion on one clip and its description, "
        "then edit the clip with new prompts.\n\n"
        "Typical use:\n\n"
        '  tav tune skiing.mp4 "a man is skiing"        (creates skiing.tav/ beside the clip)\n\n'
        '  tav edit -p skiing.tav "a panda is skiing" "a man is skiing at sunset"\n\n'
        "Offline, try it with the built-in tiny model: tav demo\n\n"
        "Results go to stdout as JSON Lines; progress, tables and errors to stderr (-q for errors only)."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each command with the one-line summary `tav --help` shows (a docstring's first sentence would be cut).
COMMANDS: list[tuple[str, Callable[..., Any], str]] = [
    ("tune", tuning.tune, "Tune the model on a clip and its description."),
    ("invert", editing.invert, "DDIM-invert the tuned clip (edits start there)."),
    ("edit", editing.edit, "Render the tuned clip with new prompts."),
    ("demo", tuning.demo, "Run the pipeline offline on the built-in tiny model."),
    ("batch", batch.batch, "Run many jobs from a TOML or JSON Lines file."),
    ("import", tuning.import_reference, "Import a reference Tune-A-Video output folder."),
    ("eval", editing.evaluate_outputs, "Score outputs with CLIP (the paper's metrics)."),
    ("ls", store.list_store, "List the project's entries."),
    ("rm", store.remove, "Remove entries and what was computed from them."),
    ("gc", store.collect_garbage, "Remove what nothing uses or can use."),
    ("verify", store.verify, "Check every entry's bytes and values."),
    ("config", store.show_config, "Show the settings and where each came from."),
    ("ui", ui.serve_app, "Open projects in a web app on this machine."),
]
for name, command, summary in COMMANDS:
    app.command(name, short_help=summary)(command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tav {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Set TAV_DEBUG=1 to see tracebacks."""


def _argument_metavar_only() -> None:
    """Show an argument that has a metavar (`PROMPT...`) without typer's Python type after it (`<list[str]>`)."""
    argument = getattr(getattr(typer, "core", None), "TyperArgument", None)
    shown = getattr(argument, "display_type_rich", None)
    if argument is None or shown is None:
        return  # another typer: nothing to adjust

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.metavar else shown(self, ctx)

    argument.display_type_rich = display_type_rich


_argument_metavar_only()


def main() -> None:
    """Entry point: every mistake is one red line; command-line usage errors exit 2, other failures 1.

    File-system failures (permissions, a full disk) are the environment's, not bugs: one line too.
    Ctrl-C and SIGTERM stop with status 130 and a note that finished work is kept.
    """
    choose_wait_policy()  # before torch loads: OpenMP reads it once
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = typer.main.get_command(app).main(prog_name="tav", standalone_mode=False)
    except typer.Abort:
        code = _fail(TavError("aborted"), 1)
    except Exception as raised:
        error = interruption(raised) or raised
        if _parsing_error(error):  # an unknown option, a missing argument, a bad choice: click's, one line too
            return _usage(error)
        if _out_of_memory(error):
            error = _memory_error(_command(sys.argv[1:]))
        if os.environ.get("TAV_DEBUG") or not isinstance(error, (TavError, OSError)):
            raise
        code = _fail(error, getattr(error, "exit_code", 1))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if isinstance(code, int) and code:
        sys.exit(code)


def _parsing_error(error: Exception) -> bool:
    """Whether `error` is the command-line parser's (click's, or the copy of it newer typer ships)."""
    return type(error).__module__.split(".")[0] in ("click", "typer") and hasattr(error, "format_message")


def _usage(error: Any) -> None:
    """Report a parsing error as one line (help itself when no command was given) and exit with its status."""
    if type(error).__name__ == "NoArgsIsHelpError":
        error.show()
    else:
        hint = f"see `{error.ctx.command_path} --help`" if getattr(error, "ctx", None) else None
        _fail(TavError(error.format_message(), hint), error.exit_code)
    sys.exit(error.exit_code)


def _fail(error: TavError | OSError, code: int) -> int:
    """Print `error` as the one line a user sees (even with --quiet) and return the exit status."""
    from rich.console import Console
    from rich.markup import escape

    message, hint = (error.message, error.hint) if isinstance(error, TavError) else (str(error), None)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    shown_hint = f" [dim]({escape(hint)})[/dim]" if hint else ""
    console.print(f"[bold red]error:[/bold red] {escape(message)}{shown_hint}")
    return code


def _out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(error, torch.OutOfMemoryError)


# What lowers each command's peak memory, in that command's own options; {half} is the half precision the GPU
# computes natively. Commands not listed have no such option.
_MEMORY_REMEDIES = {
    "tune": "try --gradient-checkpointing, --rank 8, --precision {half}, fewer --frames or a smaller "
    "--width/--height; `tav tune --dry-run` estimates the peak",
    "invert": "try --window 8 (frames per UNet call), --precision {half} or fewer --frames",
    "edit": "try --window 8 (frames per UNet call), a smaller --batch-size, --precision {half} or fewer --frames",
    "batch": "try --precision {half}, or in the jobs gradient_checkpointing = true, fewer frames, a smaller "
    "width and height, or an edit's window",
    "import": "try fewer --frames, a smaller --width/--height, or --device cpu",
    "eval": "try --device cpu",
}
_ELSEWHERE = "other programs may hold the device's memory"


def _memory_error(command: str | None) -> TavError:
    """Running out of device memory, as one line naming what lowers the peak in `command`'s own options."""
    from tavcli.runtime import bf16_is_native  # torch is loaded: it raised the error

    half = "bf16" if bf16_is_native() else "fp16"  # bf16 without bf16 cores is emulated: slow
    return TavError("the device ran out of memory", _MEMORY_REMEDIES.get(command or "", _ELSEWHERE).format(half=half))


def _command(args: list[str]) -> str | None:
    """The command `tav ARGS` runs: the first word that is not an option (the root's options take no value)."""
    return next((arg for arg in args if not arg.startswith("-")), None)


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted()
