"""attnres_lens: TransformerLens-style interpretability for Block Attention Residuals models."""

from .config import AttnResConfig
from .model import DepthState, HookedAttnResTransformer
from .router import DepthRouter, DepthSource, RouterSpec, source_layout
from .schedule import RoutingSchedule, expected_weights_table, verify_schedule
from .tokenizer import ByteTokenizer
from .interventions import (
    Family,
    Group,
    Intervention,
    Slice,
    apply_interventions,
    model_with_interventions,
    run_with_interventions,
)
from .patching import get_act_patch_routing, sweep_sources
from .attribution import (
    MassEffectReport,
    RoutingStatistics,
    gradient_attribution,
    mass_vs_effect,
    plot_token_routing,
    routing_statistics,
)
from . import bundled
from .protocol import Subject, run_protocol
from .training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "AttnResConfig",
    "ByteTokenizer",
    "DepthRouter",
    "DepthSource",
    "DepthState",
    "HookedAttnResTransformer",
    "RouterSpec",
    "RoutingSchedule",
    "expected_weights_table",
    "verify_schedule",
    "source_layout",
    # interventions and sweeps
    "Family",
    "Group",
    "Intervention",
    "Slice",
    "apply_interventions",
    "get_act_patch_routing",
    "model_with_interventions",
    "run_with_interventions",
    "sweep_sources",
    # attribution
    "MassEffectReport",
    "RoutingStatistics",
    "gradient_attribution",
    "mass_vs_effect",
    "plot_token_routing",
    "routing_statistics",
    # training, bundled models, the protocol (demo / probe)
    "TrainConfig",
    "train",
    "bundled",
    "Subject",
    "run_protocol",
]
