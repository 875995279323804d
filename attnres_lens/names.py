"""Names spelled once: sublayer kinds, routing-hook parts, grouping schemes, router prefixes."""

from __future__ import annotations

from typing import Optional

#: The routed reads, in forward order within a layer; ``final`` is the kimi final router.
SUBLAYERS: tuple[str, ...] = ("attn", "mlp", "final")
#: The hook points of every router, in the order they fire.
ROUTER_HOOKS: tuple[str, ...] = ("sources", "logits", "weights", "out")
#: How sweep rows are grouped: one row per slice, per (router, family), or per (sublayer, family, band).
GROUPINGS: tuple[str, ...] = ("slice", "family", "family_band")
#: What an intervention acts on (see ``interventions``).
TARGETS: tuple[str, ...] = ("weight", "source", "contribution")
#: The architecture name both public AttnRes codebases write into ``config.json``.
HF_ARCHITECTURE = "Qwen3AttnResForCausalLM"
#: The ``config.json`` key under which a checkpoint saved by this library keeps its metadata.
LIBRARY_KEY = "attnres_lens"


def router_name(layer: Optional[int], sublayer: str) -> str:
    """The hook prefix of a router: ``router_name(3, "attn") == "blocks.3.attn_router"``."""
    if sublayer == "final":
        return "final_router"
    if sublayer not in ("attn", "mlp"):
        raise ValueError(f"unknown sublayer {sublayer!r}; valid: {SUBLAYERS}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int for sublayer {sublayer!r}, got {layer!r}")
    return f"blocks.{layer}.{sublayer}_router"


def router_alias(layer: int, sublayer: str, part: str) -> str:
    """The block-level alias of a router hook: ``blocks.{l}.hook_{sublayer}_router_{part}``."""
    return f"blocks.{layer}.hook_{sublayer}_router_{part}"
