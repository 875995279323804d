"""The one place where TransformerLens 3.x and 4.x differ for us.

The core only imports what both major versions keep: ``HookedRootModule``, ``HookPoint``,
``ActivationCache``, ``transformer_lens.patching`` and the config base
``transformer_lens.config.TransformerLensConfig``. The differences that remain are the
``utils`` -> ``utilities`` move (4.x deleted ``transformer_lens.utils``) and the keyword-only
``reduce=``/``baseline=`` arguments that 4.x patching functions accept.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version as _dist_version

from transformer_lens import ActivationCache, FactoredMatrix, patching
from transformer_lens.config import TransformerLensConfig
from transformer_lens.HookedRootModule import HookedRootModule
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice, get_act_name

TL_VERSION: str = _dist_version("transformer_lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])

#: Whether ``transformer_lens.patching.generic_activation_patch`` takes ``reduce=`` and
#: ``baseline=`` (TL 4.x). Detected from the signature rather than the version string so a
#: backport is picked up too.
PATCHING_HAS_REDUCE: bool = (
    "reduce" in inspect.signature(patching.generic_activation_patch).parameters
)

__all__ = [
    "ActivationCache",
    "FactoredMatrix",
    "HookPoint",
    "HookedRootModule",
    "PATCHING_HAS_REDUCE",
    "Slice",
    "TL_MAJOR",
    "TL_VERSION",
    "TransformerLensConfig",
    "get_act_name",
    "patching",
]
