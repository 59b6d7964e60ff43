"""The one error type for problems the user caused.

``UserError`` (a ``ValueError``) carries a one-line message that names the file, sample,
gene or option at fault; the command line prints it and exits with 2, the dashboard shows
it on the page. Any other exception is a bug in tspg: it keeps its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike

__all__ = ["UserError", "one_line", "user_file"]


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
