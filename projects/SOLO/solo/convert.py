"""Deprecated import path, kept for one release: use :mod:`solo.checkpoint.convert`."""

from .checkpoint.convert import *  # noqa: F401,F403  (every public name)
