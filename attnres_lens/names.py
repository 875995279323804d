"""Names spelled once: sublayer kinds, routing-hook parts, grouping schemes, and :class:`RouterId`
(every router name and router hook name)."""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

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


class UnknownRouterError(KeyError, ValueError):
    """A router designation this model has no router for (a lookup miss and a bad value)."""

    def __str__(self) -> str:  # the message as written, not KeyError's repr of it
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class RouterId:
    """One router: ``RouterId(3, "attn")`` is ``blocks.3.attn_router``; the kimi final router
    is ``RouterId(None, "final")``. Every router name and hook name is spelled here.

    :meth:`parse` accepts every public way of naming a router (see there); hook callbacks
    capture the id they were made for, so nothing parses a hook name back.
    """

    layer: Optional[int]
    sublayer: str

    def __post_init__(self) -> None:
        if self.sublayer not in SUBLAYERS:
            raise ValueError(f"unknown sublayer {self.sublayer!r}; valid: {SUBLAYERS}")
        if self.sublayer == "final":
            if self.layer is not None:
                raise ValueError(f"the final router has no layer, got layer={self.layer!r}")
        elif isinstance(self.layer, bool) or not isinstance(self.layer, numbers.Integral):
            raise TypeError(f"layer must be an int for sublayer {self.sublayer!r}, got {self.layer!r}")
        elif self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        else:
            object.__setattr__(self, "layer", int(self.layer))

    @property
    def name(self) -> str:
        """The hook prefix: ``"blocks.3.attn_router"`` or ``"final_router"``."""
        return "final_router" if self.sublayer == "final" else f"blocks.{self.layer}.{self.sublayer}_router"

    def hook(self, part: str) -> str:
        """The hook point ``part`` (one of :data:`ROUTER_HOOKS`): ``"blocks.3.attn_router.hook_weights"``."""
        if part not in ROUTER_HOOKS:
            raise ValueError(f"unknown router hook part {part!r}; valid: {ROUTER_HOOKS}")
        return f"{self.name}.hook_{part}"

    def alias(self, part: str) -> str:
        """The block-level alias ``blocks.{l}.hook_{sublayer}_router_{part}`` (no alias for the
        final router, nor for ``hook_out``)."""
        if part not in ALIASED_HOOKS:
            raise ValueError(f"router hook part {part!r} has no block-level alias; aliased: {ALIASED_HOOKS}")
        if self.sublayer == "final":
            raise ValueError("the final router has no block-level alias; use RouterId.hook(part)")
        return f"blocks.{self.layer}.hook_{self.sublayer}_router_{part}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, value: Any, routers: Optional[Iterable[Any]] = None) -> "RouterId":
        """A :class:`RouterId` from any public form:

        - a ``RouterId``, or anything with a ``.name`` that is a router name (a ``RouterSpec``);
        - a router name ``"blocks.3.attn_router"`` / ``"final_router"``, or ``"final"``;
        - a router hook name ``"blocks.3.attn_router.hook_weights"`` or its block-level alias
          ``"blocks.3.hook_attn_router_weights"``;
        - a pair ``(3, "attn")`` / ``(None, "final")``.

        With ``routers`` (the model's router names or ids) the router must be one of them;
        an unknown router raises :class:`UnknownRouterError` (a ``KeyError`` and a
        ``ValueError``) listing the valid ones. A malformed value raises ``ValueError``
        (``TypeError`` for a value of the wrong type).
        """
        parsed = cls._parse(value)
        if routers is not None:
            valid = [r if isinstance(r, RouterId) else cls._parse(r) for r in routers]
            if parsed not in valid:
                raise UnknownRouterError(
                    f"unknown router {parsed.name!r}: no router named {parsed.name!r} in this model; "
                    f"routers are {[r.name for r in valid]} "
                    "(a router name, a router hook name, or (layer, 'attn'|'mlp'), 'final')"
                )
        return parsed

    @classmethod
    def _parse(cls, value: Any) -> "RouterId":
        if isinstance(value, RouterId):
            return value
        if isinstance(value, tuple) and len(value) == 2:
            return cls(value[0], value[1])
        name = getattr(value, "name", value)
        if not isinstance(name, str):
            raise TypeError(
                f"a router is a name (str), a (layer, sublayer) pair or a RouterId, got {type(value).__name__}: {value!r}"
            )
        match = _ROUTER_PATTERN.fullmatch(name)
        if match is None:
            raise UnknownRouterError(
                f"unknown router {name!r}: no router named {name!r}; a router is 'blocks.{{l}}.attn_router', 'blocks.{{l}}.mlp_router', "
                "'final_router' (or 'final'), one of their hook names, or (layer, sublayer)"
            )
        if match["final"]:
            return cls(None, "final")
        return cls(int(match["layer"]), match["sublayer"] or match["alias_sublayer"])


#: The router hook parts that also have a block-level alias (``hook_out`` has none).
ALIASED_HOOKS: tuple[str, ...] = ("sources", "logits", "weights")
_PARTS = "|".join(ROUTER_HOOKS)
_ROUTER_PATTERN = re.compile(
    rf"(?P<final>final(?:_router(?:\.hook_(?:{_PARTS}))?)?)"
    rf"|blocks\.(?P<layer>\d+)\.(?:(?P<sublayer>attn|mlp)_router(?:\.hook_(?:{_PARTS}))?"
    rf"|hook_(?P<alias_sublayer>attn|mlp)_router_(?:{'|'.join(ALIASED_HOOKS)}))"
)


def router_name(layer: Optional[int], sublayer: str) -> str:
    """The hook prefix of a router: ``router_name(3, "attn") == "blocks.3.attn_router"``."""
    return RouterId(layer, sublayer).name


def router_alias(layer: int, sublayer: str, part: str) -> str:
    """The block-level alias of a router hook: ``blocks.{l}.hook_{sublayer}_router_{part}``."""
    return RouterId(layer, sublayer).alias(part)
