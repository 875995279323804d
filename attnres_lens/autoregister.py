"""Register ``qwen3_attnres`` with ``transformers``' Auto classes as soon as ``transformers`` is
imported, without importing it (or torch) when ``attnres_lens`` is imported.

``import attnres_lens`` calls :func:`install`: if ``transformers`` is imported already the classes
of :mod:`attnres_lens.hf` are registered at once, otherwise a finder on ``sys.meta_path`` runs the
registration right after ``transformers`` has finished importing (a post-import hook, the same
idea as ``wrapt.register_post_import_hook``, whose import alone costs more than this package's).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Optional

TARGET = "transformers"


def register_now(_module: Optional[ModuleType] = None) -> None:
    """Import :mod:`attnres_lens.hf`, which registers its classes; a failure is warned, never
    raised, so that it cannot break the import of ``transformers`` itself."""
    try:
        importlib.import_module("attnres_lens.hf")
    except Exception as err:  # noqa: BLE001 (reported, and transformers stays importable)
        warnings.warn(
            f"attnres_lens could not register qwen3_attnres with transformers' Auto classes ({err!r}); "
            "import attnres_lens.hf to see the error",
            RuntimeWarning,
            stacklevel=2,
        )


class _LoaderThenRegister(importlib.abc.Loader):
    """Loads ``transformers`` with its own loader, then registers."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec: Any) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        register_now(module)


class AfterTransformersImport(importlib.abc.MetaPathFinder):
    """The finder :func:`install` puts on ``sys.meta_path``; it removes itself once used."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # before find_spec below, which would otherwise come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _LoaderThenRegister(spec.loader)
        return spec


def install() -> None:
    """Register now, or once ``transformers`` is imported (idempotent)."""
    if TARGET in sys.modules:
        register_now()
    elif not any(isinstance(finder, AfterTransformersImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, AfterTransformersImport())
