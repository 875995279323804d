"""Register ``qwen3_attnres`` with ``transformers`` and TransformerLens as soon as they are
imported, without importing either (or torch) when ``attnres_lens`` is imported.

``import attnres_lens`` calls :func:`install`. For each library below, if it is imported already
the registration runs at once; otherwise a finder on ``sys.meta_path`` runs it right after that
library module has finished importing (a post-import hook, the idea of
``wrapt.register_post_import_hook``, whose own import costs more than this whole package's):

- ``transformers``: :mod:`attnres_lens.hf` registers ``Qwen3AttnResConfig`` /
  ``Qwen3AttnResForCausalLM`` with ``AutoConfig`` / ``AutoModelForCausalLM`` (it imports only
  transformers and torch at module level);
- TransformerLens' adapter factory: :func:`register_architecture` makes
  ``Qwen3AttnResForCausalLM`` a supported architecture, which ``boot_transformers`` checks
  before it reads entry points. It imports nothing of this library: TL 3 imports the factory
  while ``transformer_lens`` itself (and possibly our own modules) are still being imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from importlib.metadata import entry_points
from types import ModuleType
from collections.abc import Callable
from typing import Any, Optional

from .names import HF_ARCHITECTURE as ARCHITECTURE

#: The entry point this package declares for TransformerLens (``pyproject.toml``).
ENTRY_POINT_GROUP = "transformer_lens.architectures"
ENTRY_POINT_VALUE = "attnres_lens.tl_bridge:AttnResArchitectureAdapter"
FACTORY = "transformer_lens.factories.architecture_adapter_factory"


def entry_point_installed() -> bool:
    """Whether installed package metadata declares the adapter for TL (a ``pip install``)."""
    return any(
        ep.name == ARCHITECTURE and ep.value == ENTRY_POINT_VALUE
        for ep in entry_points(group=ENTRY_POINT_GROUP)
    )


class DeferredAdapter:
    """Stands for :class:`attnres_lens.tl_bridge.AttnResArchitectureAdapter` until TL builds an
    adapter: calling it imports the bridge (by then every import has finished) and returns one."""

    def __new__(cls, cfg: Any) -> Any:
        from .tl_bridge import AttnResArchitectureAdapter

        return AttnResArchitectureAdapter(cfg)


def register_architecture() -> None:
    """Make ``boot_transformers`` accept ``qwen3_attnres`` checkpoints (idempotent): add the
    name to ``SUPPORTED_ARCHITECTURES``, and register the adapter when no entry point is
    installed (a source checkout; with one, TL loads the adapter from it and would warn that a
    registered one overrides a native adapter)."""
    factory = importlib.import_module(FACTORY)
    factory.SUPPORTED_ARCHITECTURES.setdefault(ARCHITECTURE, DeferredAdapter)
    if not entry_point_installed():
        factory.ArchitectureAdapterFactory.register_adapter(ARCHITECTURE, DeferredAdapter)


def register_with_transformers() -> None:
    importlib.import_module("attnres_lens.hf")


#: library module -> what registers this package with it
REGISTRARS: dict[str, Callable[[], None]] = {
    "transformers": register_with_transformers,
    FACTORY: register_architecture,
}


def register_now(target: str) -> None:
    """Run the registration for ``target``; a failure is warned, never raised, so that it cannot
    break the import of the library itself."""
    try:
        REGISTRARS[target]()
    except Exception as err:  # noqa: BLE001 (reported, and the library stays importable)
        warnings.warn(
            f"attnres_lens could not register qwen3_attnres with {target} ({err!r})",
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
