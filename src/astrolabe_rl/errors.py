"""User-facing errors: which exceptions are the user's to fix, and how each becomes one line.

Every command runs under `cli.main`, which prints an exception that `user_message` recognises as ``error: <one
line>`` (exit status 2) and lets anything else, a bug, raise with its traceback. What counts as the user's to fix:

* ``ValueError`` (configuration, arguments, files with the wrong content; the project's own errors derive from it:
  `train.checkpoint.RunDirError`, `models.loading.CheckpointError`, `rewards.base.RewardFailureError`, ...);
* ``OSError`` (a missing or unreadable file, a full disk, a port in use), said as ``what: path``;
* ``ImportError`` (an optional dependency that is not installed; the message says what to install);
* safetensors' ``SafetensorError`` (a file that is not safetensors, or its I/O failed: a full disk);
* `UserError` for anything else a message should carry (e.g. a reward server that cannot be reached).

``ASTROLABE_TRACEBACK=1`` shows the traceback of every error, for a bug report.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

MAX_MESSAGE = 2000  # characters of one error line; longer messages are cut in the middle
_LONG_QUOTED = re.compile(r"'[^'\n]{160,}'|\"[^\"\n]{160,}\"|\[[^\[\]\n]{160,}\]")


class UserError(Exception):
    """A problem the user fixes (the message says how) that is neither a ValueError nor an OSError."""


def user_message(error: BaseException) -> str | None:
    """The one line `cli.main` prints for ``error``, or None when it is a bug (shown with its traceback)."""
    if isinstance(error, OSError) and not isinstance(error, UserError):
        return shorten(os_error_message(error))
    if isinstance(error, (ValueError, ImportError, UserError)) or type(error).__name__ == "SafetensorError":
        return shorten(str(error) or type(error).__name__)
    return None


def os_error_message(error: OSError) -> str:
    """``strerror: path`` (``[Errno 28] No space left on device: 'x'`` -> ``no space left on device: x``); an
    OSError raised with a sentence of its own keeps it."""
    if error.strerror is None:  # raised with a plain message (OSError("...")), or by a library with its own text
        return str(error) or type(error).__name__
    what = error.strerror[:1].lower() + error.strerror[1:]
    paths = [p for p in (error.filename, error.filename2) if p is not None]
    return f"{what}: {' -> '.join(os.fsdecode(p) for p in paths)}" if paths else what


def shorten(message: str, limit: int = MAX_MESSAGE) -> str:
    """Cut what a message quotes at length (a 100 KB prompt, a list of every unknown word) to its two ends, then
    the whole message to ``limit`` characters."""
    def cut(match: re.Match) -> str:
        text = match.group(0)
        return f"{text[:60]}…[{len(text) - 90:,} characters]…{text[-30:]}"

    message = _LONG_QUOTED.sub(cut, message)
    if len(message) > limit:
        half = limit // 2
        message = f"{message[:half]}…[{len(message) - 2 * half:,} characters]…{message[-half:]}"
    return message


def path_problem(path: str | os.PathLike, what: str, want: str = "file") -> str | None:
    """Why ``path`` cannot be read as a ``want`` ("file" or "folder"), said with ``what`` it is for; None when it
    can. A folder where a file is wanted (or a file where a folder is) is said as such, not as "does not exist"."""
    p = Path(path)
    if want == "file" and p.is_file() or want == "folder" and p.is_dir():
        return None
    if not p.exists():
        return f"{what} {p} does not exist"
    if want == "file" and p.is_dir():
        return f"{what} {p} is a folder; give a file"
    if want == "folder":
        return f"{what} {p} is a file; give a folder"
    return f"{what} {p} is not a regular file"


def no_space(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a full disk or quota."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):  # a library's own error (safetensors: "... (os error 28)")
            return True
        error = error.__cause__ or error.__context__
    return False
