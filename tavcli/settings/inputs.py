"""Checks on what users hand in: input files, prompts and output folders, each refused with one line.

They run before anything heavy is imported, so a mistake is reported at once. This module imports
neither torch nor PyAV.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from tavcli.errors import TavError
from tavcli.settings.option import OptionError

__all__ = ["require_folder", "require_prompt", "require_regular_file"]

NOT_REGULAR = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def require_regular_file(path: Path, what: str = "file", hint: str | None = None) -> Path:
    """`path` if it is a regular file (or a link to one); refused before it is opened otherwise.

    Opening a FIFO blocks until something writes to it, and a device can be endless: neither is a
    file tav can hash and read twice. `what` names the input in messages ("video file", "batch file").
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise TavError(f"{path} is a symbolic link loop, not a {what}", "point the link at a real file") from None
        if error.errno == errno.ENOENT:
            broken = " (a broken symbolic link)" if os.path.islink(path) else ""
            raise TavError(f"no such file: {path}{broken}") from None
        if error.errno in (errno.EACCES, errno.EPERM):
            raise TavError(f"cannot read {path}: permission denied") from None
        raise TavError(f"cannot read {path}: {error.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = NOT_REGULAR.get(stat.S_IFMT(mode), "not a regular file")
        raise TavError(f"{path} is {kind}, not a {what}", hint or f"give the path of a {what}")
    return path


def require_prompt(prompt: str) -> str:
    """A prompt with some text in it, encodable as UTF-8 (undecodable argv bytes are not); a usage error
    otherwise (status 2), like any other value the command line refuses."""
    if not prompt.strip():
        raise OptionError("the prompt is empty", 'describe the clip, e.g. "a man is skiing"')
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise OptionError("the prompt is not valid UTF-8 text", "check the shell's or the file's encoding") from None
    return prompt


def require_folder(path: Path, option: str) -> Path:
    """`path` unless it exists as something other than a folder (it is created when missing)."""
    if path.exists() and not path.is_dir():
        raise TavError(f"{option} {path} is a file, not a folder")
    return path
