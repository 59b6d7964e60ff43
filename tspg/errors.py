"""The one error type for problems the user caused.

``UserError`` (a ``ValueError``) carries a one-line message that names the file, sample,
gene or option at fault; the command line prints it and exits with 2, the dashboard shows
it on the page. Any other exception is a bug in tspg: it keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from os import PathLike

__all__ = ["UserError", "user_file"]


class UserError(ValueError):
    """Bad input, a bad option or a bad file: a clear one-line message, no traceback."""


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
