"""`RoutingScheme`: the routing layout, stated once (one class per layout).

A scheme says, for every routed read ``k`` (``attn_0, mlp_0, ..., final``), what happens to the
depth state around the sublayer. Its :attr:`~RoutingScheme.program` is that, one
:class:`StepProgram` per step, and three readers consume it:

- the tensor forward (``AttnResBlock.step`` and ``final_input`` in ``model.py``) runs it on
  tensors: *close block* (move the in-progress source into the completed ones), *route* (the
  router reads completed + current), *accumulate* (current += the sublayer output), *snapshot*
  (append the current source to the completed ones);
- the labels (:meth:`RoutingScheme.layout`, i.e. ``router.source_layout``) run it on names;
- the component sets run it on sets of component ids (``members`` of each
  :class:`~attnres_lens.router.DepthSource`: ``-1`` the embedding, ``k`` sublayer ``k``'s
  output), from which duplicates, the final router's source of each sublayer, cache component
  masses and depth-state patching are derived.

Two sources with the same ``members`` are the same tensor: the program makes a new tensor only
by adding a sublayer output, and a snapshot is the current tensor itself.

Flavour facts are class attributes (``has_final_router``, ``has_residual_stream``,
``default_router_bias``, ``checkpoint_final_keys``), so no other module branches on the
flavour. A new layout is a new subclass registered in :data:`SCHEMES`, plus loader detection.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Optional

from .names import RouterId
from .router import DepthRouter, DepthSource, Family, RouterSpec

#: The component id of the embedding in ``members``; sublayer ``k`` has id ``k``.
EMBEDDING = -1


@dataclass(frozen=True)
class StepProgram:
    """What happens at routed read ``k`` (``k == n_sublayers``: the final router, no sublayer)."""

    k: int
    #: before routing: the in-progress source becomes a completed one (the slot is then empty)
    close_block: bool
    #: after the sublayer: the current source is also appended to the completed ones
    snapshot: bool


@dataclass(frozen=True)
class _Symbol:
    """A source on the symbolic walk: which components it sums, and its label."""

    members: frozenset[int]
    label: str


def sublayer_label(k: int) -> str:
    """``"attn 0"``, ``"mlp 0"``, ``"attn 1"``, ...: how sublayer ``k`` is named in labels."""
    return f"{'attn' if k % 2 == 0 else 'mlp'} {k // 2}"


@dataclass(frozen=True)
class RoutingScheme:
    """One routing layout for a model of ``n_layers`` layers in blocks of ``layers_per_block``."""

    n_layers: int
    layers_per_block: int

    flavour: ClassVar[str]
    routing_mode: ClassVar[str]
    #: a router reads the sources once more before the final norm (kimi)
    has_final_router: ClassVar[bool]
    #: the current source is a true additive residual stream (``hook_resid_*``, TL's
    #: single-stream tools; the readout reads it when there is no final router)
    has_residual_stream: ClassVar[bool]
    #: whether a router has a recency bias unless the config says otherwise
    default_router_bias: ClassVar[bool]
    #: the embedding is also the first completed source before step 0 (a snapshot of it)
    snapshots_embedding: ClassVar[bool]
    #: the label of the current source before step 0 (the embedding)
    initial_current_label: ClassVar[str] = "emb"
    #: the final router's checkpoint keys (``qwen3_attnres`` name -> our parameter name)
    checkpoint_final_keys: ClassVar[dict[str, str]] = {}
    #: the ``attnres_mode`` this layout's checkpoints say (``None``: its ``routing_mode``)
    checkpoint_mode: ClassVar[Optional[str]] = None
    #: the router module every routed read gets
    router_class: ClassVar[type] = DepthRouter

    # ------------------------------------------------------------------ the layout's rules
    def closes_before(self, k: int) -> bool:
        """Whether the in-progress source is closed (stored as completed) before read ``k``."""
        raise NotImplementedError

    def snapshot_after(self, k: int) -> bool:
        """Whether the current source is appended to the completed ones after sublayer ``k``."""
        raise NotImplementedError

    def closed_label(self, label: str, n_closed: int) -> str:
        """The label of the ``n_closed``-th closed source (it was labelled ``label`` while open)."""
        return label

    def fresh_label(self, k: int) -> str:
        """The label of a current source that sublayer ``k`` starts (the slot was empty)."""
        return sublayer_label(k)

    def snapshot_label(self, k: int) -> str:
        return f"after {sublayer_label(k)}"

    # ------------------------------------------------------------------ derived, once
    @property
    def n_sublayers(self) -> int:
        return 2 * self.n_layers

    @cached_property
    def program(self) -> tuple[StepProgram, ...]:
        """One step per routed read, in forward order (the final router's last, if any)."""
        reads = self.n_sublayers + (1 if self.has_final_router else 0)
        return tuple(
            StepProgram(k, self.closes_before(k), k < self.n_sublayers and self.snapshot_after(k))
            for k in range(reads)
        )

    def _walk(self) -> Iterator[tuple[int, tuple[_Symbol, ...], Optional[_Symbol]]]:
        """The program on symbols: ``(k, completed, current)`` as router ``k`` reads them."""
        emb = _Symbol(frozenset({EMBEDDING}), "emb")
        completed: tuple[_Symbol, ...] = (emb,) if self.snapshots_embedding else ()
        current: Optional[_Symbol] = _Symbol(emb.members, self.initial_current_label)
        n_closed = 0
        for step in self.program:
            if step.close_block and current is not None:
                completed += (_Symbol(current.members, self.closed_label(current.label, n_closed)),)
                current, n_closed = None, n_closed + 1
            yield step.k, completed, current
            if step.k == self.n_sublayers:
                return
            if current is None:
                current = _Symbol(frozenset({step.k}), self.fresh_label(step.k))
            else:
                current = _Symbol(current.members | {step.k}, current.label)
            if step.snapshot:
                completed += (_Symbol(current.members, self.snapshot_label(step.k)),)

    def layout(self) -> list[RouterSpec]:
        """Every router with its sources (labels, families, members), in forward order."""
        specs = []
        for k, completed, current in self._walk():
            symbols = completed + ((current,) if current is not None else ())
            sources = tuple(
                DepthSource(i, _family(i, len(symbols), current is not None), s.label, s.members)
                for i, s in enumerate(symbols)
            )
            rid = RouterId(None, "final") if k == self.n_sublayers else RouterId(k // 2, ("attn", "mlp")[k % 2])
            specs.append(RouterSpec(rid.name, rid.layer, rid.sublayer, k, sources))
        return specs


def _family(index: int, n: int, has_current: bool) -> Family:
    if index == 0:
        return "embedding"
    return "current" if has_current and index == n - 1 else "history"


# ============================================================================ the layouts
class _Kimi(RoutingScheme):
    """Kimi (Block AttnRes): block summaries and an intra-block partial sum; a final router."""

    flavour = "kimi"
    has_final_router = True
    has_residual_stream = False
    default_router_bias = False
    snapshots_embedding = False
    checkpoint_final_keys = {
        "model.final_res_proj.weight": "final_router.proj.weight",
        "model.final_res_norm.weight": "final_router.norm.weight",
    }

    def snapshot_after(self, k: int) -> bool:
        return False


class KimiBlock(_Kimi):
    """A block closes before the attention of every ``layers_per_block``-th layer (at layer 0
    this stores the embedding as b_0); inside a block the current source is the partial sum."""

    routing_mode = "block"

    def closes_before(self, k: int) -> bool:
        return k < self.n_sublayers and k % 2 == 0 and (k // 2) % self.layers_per_block == 0

    def closed_label(self, label: str, n_closed: int) -> str:
        return label if n_closed == 0 else f"block {n_closed - 1}"

    def fresh_label(self, k: int) -> str:
        return "partial"


class KimiFull(_Kimi):
    """Every sublayer output is its own source: a block closes before every read."""

    routing_mode = "full"

    def closes_before(self, k: int) -> bool:
        return True


class KimiOpenBlock(_Kimi):
    """open-attention-residuals' block mode (wdlctc/open-attention-residuals@83d2b8d,
    ``Attention-Residuals/modeling_qwen3_attnres.py``): kimi-style blocks, but the embedding is
    both the first completed source and the start of block 0's partial sum (``blocks=[emb]``,
    ``partial=emb``, 881-882), so block 0's summary includes the embedding; a block closes
    before the attention of every ``layers_per_block``-th layer after the first (414-416,
    684-691); every router, the final one too, adds a recency bias to its last source (171,
    816-820). Its checkpoints say ``attnres_mode: "block"``; the ``model.final_res_bias`` key
    tells them apart."""

    routing_mode = "open_block"
    checkpoint_mode = "block"
    default_router_bias = True
    snapshots_embedding = True
    initial_current_label = "partial"
    checkpoint_final_keys = {**_Kimi.checkpoint_final_keys, "model.final_res_bias": "final_router.bias"}

    def closes_before(self, k: int) -> bool:
        return 0 < k < self.n_sublayers and k % 2 == 0 and (k // 2) % self.layers_per_block == 0

    def closed_label(self, label: str, n_closed: int) -> str:
        return f"block {n_closed}"

    def fresh_label(self, k: int) -> str:
        return "partial"


class _Cumulative(RoutingScheme):
    """Cumulative: an additive stream ``x`` read through routers, with stream snapshots."""

    flavour = "cumulative"
    has_final_router = False
    has_residual_stream = True
    default_router_bias = True
    snapshots_embedding = True
    initial_current_label = "stream"

    def closes_before(self, k: int) -> bool:
        return False

    def fresh_label(self, k: int) -> str:  # the stream is never empty
        raise AssertionError("a cumulative stream is never empty")


class CumulativeBlock(_Cumulative):
    """The stream is snapshotted after the MLP that ends each block."""

    routing_mode = "block"

    def snapshot_after(self, k: int) -> bool:
        return k % 2 == 1 and ((k // 2) + 1) % self.layers_per_block == 0

    def snapshot_label(self, k: int) -> str:
        return f"after block {(k // 2) // self.layers_per_block}"


class CumulativeFull(_Cumulative):
    """The stream is snapshotted after every sublayer."""

    routing_mode = "full"

    def snapshot_after(self, k: int) -> bool:
        return True


#: Every layout, by ``(flavour, routing_mode)``.
SCHEMES: dict[tuple[str, str], type[RoutingScheme]] = {
    (cls.flavour, cls.routing_mode): cls for cls in (KimiBlock, KimiFull, KimiOpenBlock, CumulativeBlock, CumulativeFull)
}
FLAVOURS: tuple[str, ...] = tuple(dict.fromkeys(flavour for flavour, _ in SCHEMES))
ROUTING_MODES: tuple[str, ...] = tuple(dict.fromkeys(mode for _, mode in SCHEMES))


def flavour_facts(flavour: str) -> type[RoutingScheme]:
    """The facts every layout of ``flavour`` shares (``has_final_router``, ``has_residual_stream``,
    ...), as its base class; ``ValueError`` naming the flavours."""
    bases = {cls.flavour: cls.__mro__[1] for cls in SCHEMES.values()}
    if flavour not in bases:
        raise ValueError(f"unknown flavour {flavour!r}; flavours: {FLAVOURS}")
    return bases[flavour]


def scheme_class(flavour: str, routing_mode: str) -> type[RoutingScheme]:
    """The layout class of ``(flavour, routing_mode)``; ``ValueError`` naming the valid pairs."""
    if (flavour, routing_mode) not in SCHEMES:
        raise ValueError(
            f"no routing layout for flavour={flavour!r}, routing_mode={routing_mode!r}; layouts: {sorted(SCHEMES)}"
        )
    return SCHEMES[(flavour, routing_mode)]
