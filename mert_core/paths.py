"""Where mert keeps things and what it runs on: the cache root and "auto" device
resolution, one home each (a leaf module: standard library and torch only)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$MERT_CACHE``, else ``~/.cache/mert``.

    Under it: ``scans/`` (audio scans), ``demo-v1/`` (the demo data),
    ``features/`` (extracted features).
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("MERT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mert"


def resolve_device(device: str, local_rank: int | None = None) -> str:
    """``"auto"`` -> ``"cuda"`` (``"cuda:<local_rank>"`` when given) if CUDA is
    available, else ``"cpu"``; any other name is returned as it is."""
    if str(device) != "auto":
        return str(device)
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if local_rank is None else f"cuda:{local_rank}"
