"""Depth bands: named sets of a model's layers (``{"early": (0, 1), "late": (2, 3)}``).

One rule: a band holds at least one layer of the model and no layer is in two bands, because a
router's row in every table carries *its* band (a layer in two bands would make that ambiguous
and count the router twice in band aggregates). This module imports no torch, so that the
command line checks ``--bands`` before the seconds-long import.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Optional


class LayerOutOfRangeError(IndexError, ValueError):
    """A layer index outside the model (both an index error and a bad value)."""


#: Bands as users give them: ``None`` (the default early/late halves) or ``{name: layers}``.
BandsLike = Optional[Mapping[str, Any]]


def default_bands(n_layers: int) -> dict[str, tuple[int, ...]]:
    """Early/late halves of the layers: ``early = [0, ceil(L/2))``, ``late`` = the rest (a
    one-layer model has only ``early``)."""
    half = math.ceil(n_layers / 2)
    bands = {"early": tuple(range(half)), "late": tuple(range(half, n_layers))}
    return {name: layers for name, layers in bands.items() if layers}


def resolve_bands(bands: BandsLike, n_layers: int) -> dict[str, tuple[int, ...]]:
    """Validate ``bands`` against a model of ``n_layers`` layers (the one rule: every band holds
    layers of the model, and no layer is in two bands); ``None`` gives :func:`default_bands`."""
    if bands is None:
        return default_bands(n_layers)
    if not isinstance(bands, Mapping):
        raise TypeError(f"bands must be a mapping name -> layers, e.g. {default_bands(n_layers)}; got {bands!r}")
    if not bands:
        raise ValueError(f"bands is empty; give a mapping name -> layers, e.g. {default_bands(n_layers)}")
    resolved: dict[str, tuple[int, ...]] = {}
    owner: dict[int, str] = {}  # layer -> the band holding it
    for name, layers in bands.items():
        resolved[name] = _band_layers(name, layers, n_layers)
        for layer in resolved[name]:
            if layer in owner:
                raise ValueError(f"layer {layer} is in two bands: {owner[layer]!r} and {name!r}; bands may not overlap")
            owner[layer] = name
    return resolved


def _band_layers(name: Any, layers: Any, n_layers: int) -> tuple[int, ...]:
    if not isinstance(name, str):
        raise TypeError(f"band names must be str, got {name!r}")
    if not name:
        raise ValueError("band names must be non-empty strings")
    layers = tuple(layers)
    if not layers:
        raise ValueError(f"band {name!r} has no layers")
    for layer in layers:
        if not isinstance(layer, numbers.Integral) or isinstance(layer, bool):
            raise TypeError(f"band {name!r} must hold int layers, got {layer!r}")
        if not 0 <= layer < n_layers:
            raise LayerOutOfRangeError(
                f"band {name!r}: layer {layer} out of range; the model's layers are 0..{n_layers - 1}"
            )
    return tuple(int(layer) for layer in layers)


def layers_text(layers: Sequence[int]) -> str:
    """``"0-3"`` for a run of layers, else ``"0,2,5"``."""
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else f"{layers[0]}"
    return ",".join(map(str, layers))


__all__ = ["BandsLike", "LayerOutOfRangeError", "default_bands", "layers_text", "resolve_bands"]
