"""Thresholds and flags of the mass-vs-effect comparison, spelled once."""

#: A slice (or group) with at least this mean routing weight carries "appreciable" mass.
DEFAULT_MASS_THRESHOLD = 0.2
#: A slice (or group) below this mean routing weight carries "little" mass.
DEFAULT_LOW_MASS_THRESHOLD = 0.05
#: Effects smaller than this (in metric units; for the default loss metric, nats per token,
#: i.e. about a 1% change in perplexity) are practically negligible.
DEFAULT_EFFECT_THRESHOLD = 0.01

FLAG_MASS_WITHOUT_CAUSAL_ROLE = "mass without causal role"
FLAG_CAUSAL_WITHOUT_MASS = "causal without mass"
#: Per-copy reports (``merge_duplicates=False``): a copy whose ablation is undone by the other
#: copy of the same tensor (the merged slice matters; this copy alone does not).
FLAG_COMPENSATED_BY_DUPLICATE = "compensated by a duplicate"

__all__ = [
    "DEFAULT_EFFECT_THRESHOLD",
    "DEFAULT_LOW_MASS_THRESHOLD",
    "DEFAULT_MASS_THRESHOLD",
    "FLAG_CAUSAL_WITHOUT_MASS",
    "FLAG_COMPENSATED_BY_DUPLICATE",
    "FLAG_MASS_WITHOUT_CAUSAL_ROLE",
]
