"""The one error type for problems the user caused.

``UserError`` (a ``ValueError``) carries a one-line message that names the file, sample,
gene or option at fault; the command line prints it and exits with 2, the dashboard shows
it on the page. Any other exception is a bug in tspg: it keeps its traceback.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike
from pathlib import Path

__all__ = ["UserError", "check_writable", "one_line", "user_file"]


class UserError(ValueError):
    """Bad input, a bad option or a bad file: a clear one-line message, no traceback."""


def one_line(text: object) -> str:
    """``text`` for one line of a message or a listing: control characters (line breaks,
    tabs, escapes) written as Python writes them in a string (``\\n``, ``\\t``, ``\\x1b``).

    >>> one_line("bad\\nname")
    'bad\\\\nname'
    """
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(text))


@contextmanager
def user_file(path: str | PathLike, action: str = "write") -> Iterator[None]:
    """Turn an OSError on a file the user named into a UserError naming the file.

    >>> with user_file("out/table.csv"):  # doctest: +SKIP
    ...     frame.to_csv("out/table.csv")
    UserError: out/table.csv: cannot write (No such file or directory)
    """
    try:
        yield
    except OSError as err:
        raise UserError(f"{path}: cannot {action} ({err.strerror or err})") from err


def check_writable(path: str | PathLike, *, folder: bool = False) -> Path:
    """Refuse now, naming ``path``, an output that could not be written later: before the
    work whose result it is to hold, not after. Writes nothing that stays (a probe file is
    made where the output goes and removed at once).

    A file's folder must exist, and the file must not be a folder; with ``folder``,
    ``path`` is a folder to write into, made if needed (with its parents).
    """
    path = Path(path)
    if folder:
        if os.path.lexists(path) and not path.is_dir():
            raise UserError(f"{one_line(path)}: cannot write into it, it is not a folder")
        here = Path(os.path.abspath(path))
        base = next(p for p in (here, *here.parents) if os.path.lexists(p))
        if not base.is_dir():
            raise UserError(
                f"{one_line(path)}: cannot create the folder, {one_line(base)} is a file"
            )
    else:
        if path.is_dir():
            raise UserError(f"{one_line(path)}: cannot write, it is a folder")
        base = path.parent
        if not base.is_dir():
            raise UserError(f"{one_line(path)}: cannot write, {one_line(base)} is not a folder")
    with user_file(one_line(path), "write into its folder" if not folder else "write there"):
        fd, probe = tempfile.mkstemp(prefix=".tspg-write-check-", dir=base)
        os.close(fd)
        os.unlink(probe)
    return path
