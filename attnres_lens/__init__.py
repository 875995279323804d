"""attnres_lens: TransformerLens-style interpretability for Block Attention Residuals models."""

from .config import AttnResConfig
from .model import DepthState, HookedAttnResTransformer
from .router import DepthRouter, DepthSource, RouterSpec, source_layout
from .schedule import RoutingSchedule, expected_weights_table, verify_schedule
from .tokenizer import ByteTokenizer

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
]
