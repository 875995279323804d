"""Register ``qwen3_attnres`` with ``transformers`` and TransformerLens as soon as they are
imported, without importing either (or torch) when ``attnres_lens`` is imported.

``import attnres_lens`` calls :func:`install`. For each library below, if it is imported already
our registering module is imported at once; otherwise a finder on ``sys.meta_path`` imports it
right after that library has finished importing (a post-import hook, the idea of
``wrapt.register_post_import_hook``, whose own import costs more than this whole package's):

- ``transformers`` -> :mod:`attnres_lens.hf` registers ``Qwen3AttnResConfig`` /
  ``Qwen3AttnResForCausalLM`` with ``AutoConfig`` / ``AutoModelForCausalLM``;
- TransformerLens' adapter factory (imported by ``TransformerBridge``) ->
  :mod:`attnres_lens.tl_bridge` makes ``Qwen3AttnResForCausalLM`` a supported architecture,
  which ``boot_transformers`` checks before it reads entry points.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any, Optional

#: library module -> our module that registers with it on import
REGISTRARS = {
    "transformers": "attnres_lens.hf",
    "transformer_lens.factories.architecture_adapter_factory": "attnres_lens.tl_bridge",
}


def register_now(target: str) -> None:
    """Import the registrar of ``target``; a failure is warned, never raised, so that it cannot
    break the import of the library itself."""
    try:
        importlib.import_module(REGISTRARS[target])
    except Exception as err:  # noqa: BLE001 (reported, and the library stays importable)
        warnings.warn(
            f"attnres_lens could not register qwen3_attnres with {target} ({err!r}); import "
            f"{REGISTRARS[target]} to see the error",
            RuntimeWarning,
            stacklevel=2,
        )


class _LoaderThenRegister(importlib.abc.Loader):
    """Loads a library module with its own loader, then registers with it."""

    def __init__(self, loader: importlib.abc.Loader, target: str):
        self.loader = loader
        self.target = target

    def create_module(self, spec: Any) -> Optional[ModuleType]:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        register_now(self.target)


class AfterImport(importlib.abc.MetaPathFinder):
    """The finder :func:`install` puts on ``sys.meta_path`` for one library module; it removes
    itself once that module is found."""

    def __init__(self, target: str):
        self.target = target

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.target:
            return None
        sys.meta_path.remove(self)  # before find_spec below, which would otherwise come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _LoaderThenRegister(spec.loader, self.target)
        return spec


def install() -> None:
    """Register now with what is imported, and on import with the rest (idempotent)."""
    waiting = {finder.target for finder in sys.meta_path if isinstance(finder, AfterImport)}
    for target in REGISTRARS:
        if target in sys.modules:
            register_now(target)
        elif target not in waiting:
            sys.meta_path.insert(0, AfterImport(target))
