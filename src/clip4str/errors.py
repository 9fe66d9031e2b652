"""Exceptions from other libraries told in one line."""

from __future__ import annotations


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name if it has none), cut at `limit` characters."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]
