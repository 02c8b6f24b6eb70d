"""Package attributes imported on first use (PEP 562), so that importing a package does not
import what its modules need (Nipype, torch) before one of its names is used."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str,
                 exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """Module-level ``__getattr__`` and ``__dir__`` for ``package``.

    Parameters
    ----------
    package : the package's ``__name__``
    exports : attribute name → the submodule (relative to ``package``) that defines it

    Returns
    -------
    (``__getattr__``, ``__dir__``) to assign in the package's ``__init__``
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> object:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value  # later look-ups find it without calling __getattr__
        return value

    def __dir__() -> list:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
