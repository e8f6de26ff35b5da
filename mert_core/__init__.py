"""mert: self-supervised pretraining of music audio encoders, MERT-style.

The distribution is ``mert-toolkit`` (``pip install mert-toolkit``); the
command is ``mert`` and the import names are ``mert_core``, ``mert_plugins``
and ``mert_cli``.
"""

__version__ = "0.1.0"
"""The one place the version is written; ``pyproject.toml`` reads it from here."""

DISTRIBUTION = "mert-toolkit"
"""Our distribution's name on PyPI, for metadata lookups and plugin dependencies."""


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of this distribution and of the distributions ``names``.

    Recorded in fitted teachers and label stores, and printed by ``mert --version``.
    A distribution that is not installed maps to ``"not installed"``; ours
    falls back to ``__version__`` when run from a source tree.
    """
    from importlib import metadata

    out = {}
    for name in (DISTRIBUTION, *names):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = __version__ if name == DISTRIBUTION else "not installed"
    return out
