"""attnres_lens: TransformerLens-style interpretability for Block Attention Residuals models.

Every public name is imported on first use (PEP 562), so ``import attnres_lens`` and
``attnres-lens --help`` do not pay for torch, scipy, matplotlib or pandas until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import autoregister

__version__ = "0.1.0"

# public name -> the submodule that defines it ("bundled" is the submodule itself)
_WHERE = {
    "AttnResConfig": "config",
    "ByteTokenizer": "tokenizer",
    "DepthRouter": "router",
    "DepthSource": "router",
    "DepthState": "model",
    "HookedAttnResTransformer": "model",
    "AttnResActivationCache": "cache",
    "RouterSpec": "router",
    "RoutingSchedule": "config",
    "expected_weights_table": "schedule",
    "verify_schedule": "schedule",
    "source_layout": "router",
    # interventions and sweeps
    "Family": "interventions",
    "Group": "interventions",
    "Intervention": "interventions",
    "Slice": "interventions",
    "apply_interventions": "interventions",
    "get_act_patch_depth_state": "patching",
    "get_act_patch_routing": "patching",
    "model_with_interventions": "interventions",
    "run_with_interventions": "interventions",
    "sweep_sources": "patching",
    # attribution
    "MassEffectReport": "attribution",
    "RoutingStatistics": "attribution",
    "gradient_attribution": "attribution",
    "mass_vs_effect": "attribution",
    "plot_token_routing": "attribution",
    "routing_statistics": "attribution",
    # training, bundled models, the protocol (demo / probe)
    "TrainConfig": "training",
    "train": "training",
    "bundled": "bundled",
    "Subject": "protocol",
    "run_protocol": "protocol",
    # interactive views (plotly, ipywidgets: imported on first use)
    "viz": "viz",
    # Hugging Face-native classes (registered with the Auto classes, see below)
    "Qwen3AttnResConfig": "hf",
    "Qwen3AttnResForCausalLM": "hf",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'attnres_lens' has no attribute {name!r}")
    module = importlib.import_module(f".{_WHERE[name]}", __name__)
    value = module if name == _WHERE[name] else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


# qwen3_attnres is registered with transformers' AutoConfig/AutoModelForCausalLM (see
# attnres_lens.hf) now if transformers is imported already, else right after it is, so
# AutoModelForCausalLM.from_pretrained and TransformerLens 4's boot_transformers load such
# checkpoints without remote code, and ``import attnres_lens`` stays light.
autoregister.install()


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import bundled, viz
    from .cache import AttnResActivationCache
    from .attribution import (
        MassEffectReport,
        RoutingStatistics,
        gradient_attribution,
        mass_vs_effect,
        plot_token_routing,
        routing_statistics,
    )
    from .config import AttnResConfig, RoutingSchedule
    from .hf import Qwen3AttnResConfig, Qwen3AttnResForCausalLM
    from .interventions import (
        Family,
        Group,
        Intervention,
        Slice,
        apply_interventions,
        model_with_interventions,
        run_with_interventions,
    )
    from .model import DepthState, HookedAttnResTransformer
    from .patching import get_act_patch_depth_state, get_act_patch_routing, sweep_sources
    from .protocol import Subject, run_protocol
    from .router import DepthRouter, DepthSource, RouterSpec, source_layout
    from .schedule import expected_weights_table, verify_schedule
    from .tokenizer import ByteTokenizer
    from .training import TrainConfig, train
