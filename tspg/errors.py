"""The one error type for problems the user caused.

``UserError`` (a ``ValueError``) carries a one-line message that names the file, sample,
gene or option at fault; the command line prints it and exits with 2, the dashboard shows
it on the page. Any other exception is a bug in tspg: it keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(ValueError):
    """Bad input, a bad option or a bad file: a clear one-line message, no traceback."""
