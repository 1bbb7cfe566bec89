"""What `tav ui` refuses before it serves anything: another machine let in without a password, a public share
link, a file outside the app's folders. Torch- and Gradio-free, so it answers at once."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

from tavcli.settings.option import OptionError

__all__ = ["credentials", "is_loopback", "served"]

SHARE_REFUSED = (
    "--share is refused: a public link needs the internet and exposes this machine to anyone who has it",
    "serve on your network with --host 0.0.0.0 --auth USER:PASSWORD instead",
)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (127.0.0.0/8, ::1 or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to, it may be reached from outside


def credentials(host: str, auth: str | None) -> tuple[str, str] | None:
    """The user name and password `--auth USER:PASSWORD` gives; any host but this machine's needs them."""
    if auth is None:
        if not is_loopback(host):
            raise OptionError(
                f"--host {host} lets other machines in: give --auth USER:PASSWORD too", "or keep --host 127.0.0.1"
            )
        return None
    user, colon, password = auth.partition(":")
    if not colon or not user or not password:
        raise OptionError("--auth takes USER:PASSWORD, both non-empty", "e.g. --auth ana:correct-horse")
    return user, password


def served(path: Path, roots: Iterable[Path]) -> bool:
    """Whether `path`, links resolved, lies inside one of `roots` (the app's projects and upload folder)."""
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)
