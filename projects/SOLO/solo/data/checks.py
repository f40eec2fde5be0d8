"""Deprecated import path, kept for one release: use :mod:`solo.data.build`,
:mod:`solo.data.validation` and :mod:`solo.data.masks`."""

from .build import *  # noqa: F401,F403
from .masks import *  # noqa: F401,F403
from .validation import *  # noqa: F401,F403
