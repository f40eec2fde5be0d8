"""Errors of the checkpoint conversion, below every other conversion module so that files,
sources, verify and convert can all raise them."""

from typing import Sequence

__all__ = ["ConversionError", "UnknownKeyError", "listing"]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted, or whose conversion does not fit the model."""


class UnknownKeyError(ConversionError):
    """A key that no renaming rule of the source knows."""


def listing(title: str, items: Sequence[str], limit: int = 40) -> str:
    """``title (n):`` and the first ``limit`` items, one per indented line, for error messages."""
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n  {shown}{more}"
