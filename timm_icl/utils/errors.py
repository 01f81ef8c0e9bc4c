"""One line for users out of any exception: the first line of its message (tracebacks, HTTP bodies and hints that
libraries append on further lines are dropped).

Example:
    >>> first_line(ValueError("bad value\\n  details ..."))
    'bad value'
    >>> first_line(KeyError(), with_type=True)
    'KeyError'
"""

from __future__ import annotations

__all__ = ["first_line"]


def first_line(error: BaseException, *, with_type: bool = False) -> str:
    """The first line of ``str(error)`` (stripped), or the exception's type name when the message is empty.

    Args:
        error: any exception.
        with_type: prefix the type name (``"OSError: disk full"``), for errors whose type says what went wrong.
    """
    lines = str(error).strip().splitlines()
    name = type(error).__name__
    if not lines:
        return name
    return f"{name}: {lines[0]}" if with_type else lines[0]
