"""Moved to :mod:`mert_core.metrics` (a leaf the task contract scores with); this name stays importable."""

import sys

from mert_core import metrics as _moved

sys.modules[__name__] = _moved
