"""Moved to :mod:`mert_core.beats` (a leaf the task contract scores with); this name stays importable."""

import sys

from mert_core import beats as _moved

sys.modules[__name__] = _moved
