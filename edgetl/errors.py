"""The one base class for errors a user can fix, so the CLI shows them as one line and real bugs keep their traceback."""
from __future__ import annotations


class EdgetlError(Exception):
    """An expected user error: the message names the file or field at fault and how to fix it.

    Subclasses may also derive from a builtin (ValueError, RuntimeError) so existing `except` clauses keep working.
    """
