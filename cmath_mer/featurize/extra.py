"""The optional `features` extra: featurize imports its packages only when it runs, and says what to
install when one is missing (the core package needs none of them)."""
from __future__ import annotations

import importlib

INSTALL = "pip install -e '.[features]'"


class MissingExtraError(RuntimeError):
    """An optional dependency of featurize is not installed."""


def require(module: str, purpose: str):
    """import `module`, or stop with the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{purpose} needs the Python package {module!r}, which is not installed "
                                f"({err}); install the features extra: {INSTALL}") from None
