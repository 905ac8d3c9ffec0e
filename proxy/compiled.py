"""The optional compiled build (issue 16): which modules run compiled.

``AUTHPROXY_COMPILE=1 pip install --no-build-isolation .`` (setup.py) compiles
the hot path's modules (setup.py lists them) with mypyc; the pure Python package is
the same source and the fallback. A class that subclasses a Python class
(aiohttp's protocols, ``logging.Handler``) stays a Python class in the
compiled build: :func:`mypyc_attr` marks it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib.machinery import EXTENSION_SUFFIXES
from typing import Any, TypeVar

_Class = TypeVar("_Class", bound=type)

try:
    from mypy_extensions import mypyc_attr as mypyc_attr
except ImportError:  # pure Python without mypy_extensions: the mark does nothing

    def mypyc_attr(*_args: Any, **_kwargs: Any) -> Callable[[_Class], _Class]:  # type: ignore[misc]
        return lambda cls: cls


def compiled_modules() -> list[str]:
    """The proxy's modules loaded from compiled extensions, sorted."""
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.startswith("proxy.")
        and not name.endswith("__mypyc")  # the build's shared runtime, no module of ours
        and str(getattr(module, "__file__", "") or "").endswith(tuple(EXTENSION_SUFFIXES))
    )
