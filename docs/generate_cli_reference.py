"""Write the option tables of docs/cli.md from the `tav` command tree, or check that they are current.

Each command's table sits between `<!-- generated: tav NAME options (python docs/generate_cli_reference.py) -->`
and `<!-- end generated -->`; everything outside those markers is written by hand and left as it is. A table
has one row per option of `tav NAME` (its arguments and --help left out): every flag of the option, its
default as `--help` shows it (`off` for a flag that is off by default; a `[default: ...]` written in the help
text moves to this column) and its help text. In the manner of huggingface_hub's
utils/generate_cli_reference.py.

    python docs/generate_cli_reference.py          # rewrite the tables in docs/cli.md
    python docs/generate_cli_reference.py --check  # exit 1, naming the stale commands, if a table is not current
"""

from __future__ import annotations

import argparse
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer

import tavcli.cli

REFERENCE = Path(__file__).resolve().parent / "cli.md"
COMMAND = "python docs/generate_cli_reference.py"
END = "<!-- end generated -->"
DEFAULT_IN_HELP = re.compile(r"\s*\[default: ([^\]]*)\]")


def start(name: str) -> str:
    """The line that opens the generated table of `tav NAME`."""
    return f"<!-- generated: tav {name} options ({COMMAND}) -->"


# A generated table: its opening line (group 1, the command's name in group 2), the table (3), the closing line (4).
BLOCK = re.compile("(" + re.escape(start("@")).replace("@", r"(\S+)") + "\n)(.*?)(" + re.escape(END) + ")", re.S)


def shown_default(param: Any) -> str:
    """The default as `tav NAME --help` shows it: `off` for a flag that is off unless given, '' when none is shown."""
    if getattr(param, "is_bool_flag", False) and not param.default:
        return "off"
    if isinstance(param.show_default, str):
        return param.show_default
    value = param.default.value if isinstance(param.default, Enum) else param.default
    return f"`{value}`" if param.show_default and value not in (None, "") else ""


def cell(text: str) -> str:
    return text.replace("|", r"\|")


def row(param: Any) -> str:
    """One table row: the option's flags, its default and its help (with a `[default: ...]` moved out of it)."""
    flags = ", ".join(f"`{flag}`" for flag in [*param.opts, *param.secondary_opts])
    help_text = param.help or ""
    written = DEFAULT_IN_HELP.search(help_text)
    default = written.group(1) if written else shown_default(param)
    meaning = DEFAULT_IN_HELP.sub("", help_text, count=1).strip() if written else help_text
    return f"| {cell(flags)} | {cell(default)} | {cell(meaning)} |"


def table(command: Any) -> str:
    """The Markdown table of a command's options, with blank lines around it inside the markers."""
    options = [p for p in command.params if p.param_type_name == "option" and "--help" not in p.opts]
    rows = "\n".join(row(param) for param in options)
    return f"\n| option | default | meaning |\n|---|---|---|\n{rows}\n\n"


def tables() -> dict[str, str]:
    """Every command's table, by command name, from the click command that typer builds."""
    group: Any = typer.main.get_command(tavcli.cli.app)
    return {name: table(command) for name, command in group.commands.items()}


def render(text: str) -> tuple[str, list[str]]:
    """`text` with every generated table written again, and the commands whose table was missing or differed."""
    wanted = tables()
    stale = [f"tav {name} (no markers)" for name in wanted if start(name) not in text]

    def replace(block: re.Match[str]) -> str:
        name = block.group(2)
        if name not in wanted:
            stale.append(f"tav {name} (no such command)")
            return block.group(0)
        if block.group(3) != wanted[name]:
            stale.append(f"tav {name}")
        return block.group(1) + wanted[name] + block.group(4)

    return BLOCK.sub(replace, text), stale


def stale_commands(path: Path = REFERENCE) -> list[str]:
    """The commands whose table in `path` is not what this script would write (empty when it is current)."""
    return render(path.read_text(encoding="utf-8"))[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md is stale; change nothing")
    args = parser.parse_args(argv)
    text = REFERENCE.read_text(encoding="utf-8")
    written, stale = render(text)
    if args.check:
        if stale:
            print(f"docs/cli.md is stale for {', '.join(stale)}: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    unplaced = [name for name in stale if name.endswith(")")]
    if written != text:
        REFERENCE.write_text(written, encoding="utf-8")
    if unplaced:
        print(f"docs/cli.md: fix the markers of {', '.join(unplaced)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
