"""Which depth-source slices: where-values, their resolution against a model, bands, positions
and the units of a sweep.

Everything that turns a description ("the history sources of the attention routers of the
early band", "positions [-1]") into concrete ``(router, source)`` pairs and position lists lives
here, once; :mod:`attnres_lens.interventions`, :mod:`attnres_lens.patching` and
:mod:`attnres_lens.attribution` all resolve through it.

- where-values: :class:`Slice` (one source of one router), :class:`Family` (every source of one
  family at a router) and :class:`Group` (sources across routers, by criteria or explicitly);
  :func:`resolve_where` gives the routers and source indices they touch, in forward order.
- bands: named sets of layers (``{"early": (0, 1), "late": (2, 3)}``). One rule: a band holds at
  least one layer of the model and no layer is in two bands, because a router's row in every
  table carries *its* band (a layer in two bands would make that ambiguous and count the
  router twice in band aggregates).
- positions: :func:`resolve_positions` (``None``, an int, a sequence, a range, a slice or an
  integer tensor; negative counts from the end).
- sweep units: :func:`sweep_units` turns a grouping scheme (``"slice"``, ``"family"``,
  ``"family_band"`` or a mapping label -> slices) into :class:`SweepUnit` values, which travel
  with the sweep's rows so that nothing downstream parses a label.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor

from .bands import BandsLike, LayerOutOfRangeError, default_bands, layers_text, resolve_bands
from .names import GROUPINGS, SUBLAYERS, RouterId, router_name
from .router import FAMILIES, RouterSpec

if TYPE_CHECKING:  # annotations only: the model's modules import this one (via metrics)
    from .model import HookedAttnResTransformer


#: A positions or batch selector after normalisation: all, a slice, or explicit indices.
IndexSelector = Union[None, slice, tuple[int, ...]]
#: ``(router, source index)``, the address of one depth-source slice.
SlicePair = tuple[str, int]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ============================================================================ where-values
@dataclass(frozen=True)
class Slice:
    """One source of one router: ``Slice("blocks.3.attn_router", 1)``.

    ``router`` is the router's hook prefix as in ``model.source_table()`` (``"final_router"``
    for the kimi final router); ``source`` its index there (negative counts from the end, so
    ``-1`` is the last source, the ``current`` one when present).
    """

    router: str
    source: int

    def __post_init__(self) -> None:
        if not isinstance(self.router, str):
            raise TypeError(f"Slice.router must be a router name (str), got {self.router!r}")
        if isinstance(self.source, bool) or not isinstance(self.source, int):
            raise TypeError(f"Slice.source must be an int source index, got {self.source!r}")

    @classmethod
    def at(cls, layer: Optional[int], sublayer: str, source: int) -> "Slice":
        """``Slice.at(3, "attn", 1)``; the final router is ``Slice.at(None, "final", i)``."""
        return cls(router_name(layer, sublayer), source)


@dataclass(frozen=True)
class Family:
    """Every source of one family (``"embedding"``, ``"current"``, ``"history"``) at a router."""

    router: str
    family: str

    def __post_init__(self) -> None:
        if not isinstance(self.router, str):
            raise TypeError(f"Family.router must be a router name (str), got {self.router!r}")
        if not isinstance(self.family, str):
            raise TypeError(f"Family.family must be a str, got {self.family!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; families are {FAMILIES}")


@dataclass(frozen=True)
class Group:
    """Sources across routers.

    Either by criteria: every source whose family is in ``families``, at every router whose
    sublayer is in ``sublayers`` and whose layer is in ``layers`` (a depth band, e.g.
    ``range(0, 6)``); ``None`` means "any". The final router has no layer: ``layers`` does not
    filter it, select it with ``sublayers="final"``. Or explicitly: ``slices`` is a sequence of
    ``(router, source)`` pairs. ``label`` names the group in tables.
    """

    families: Any = None
    sublayers: Any = None
    layers: Any = None
    slices: Any = None
    label: str = ""

    def __post_init__(self) -> None:
        def strings(name: str, value: Any, valid: tuple[str, ...]) -> Optional[tuple[str, ...]]:
            if value is None:
                return None
            items = (value,) if isinstance(value, str) else tuple(value)
            for item in items:
                if item not in valid:
                    raise ValueError(f"Group.{name}: unknown value {item!r}; valid: {valid}")
            if not items:
                raise ValueError(f"Group.{name} is empty; give None for 'any'")
            return items

        object.__setattr__(self, "families", strings("families", self.families, FAMILIES))
        object.__setattr__(self, "sublayers", strings("sublayers", self.sublayers, SUBLAYERS))
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, int) else tuple(self.layers)
            for layer in layers:
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise TypeError(f"Group.layers must hold ints, got {layer!r}")
            object.__setattr__(self, "layers", layers)
        if self.slices is not None:
            if any(v is not None for v in (self.families, self.sublayers, self.layers)):
                raise ValueError("Group takes either slices or families/sublayers/layers, not both")
            pairs = []
            for item in self.slices:
                item = item if not isinstance(item, Slice) else (item.router, item.source)
                if (
                    not isinstance(item, tuple)
                    or len(item) != 2
                    or not isinstance(item[0], str)
                    or isinstance(item[1], bool)
                    or not isinstance(item[1], int)
                ):
                    raise TypeError(
                        f"Group.slices must hold (router, source) pairs or Slices, got {item!r}"
                    )
                pairs.append((item[0], int(item[1])))
            if not pairs:
                raise ValueError("Group.slices is empty")
            object.__setattr__(self, "slices", tuple(pairs))
        if not isinstance(self.label, str):
            raise TypeError(f"Group.label must be a str, got {self.label!r}")



def as_where(where: Any) -> Union[Slice, Family, Group]:
    if isinstance(where, (Slice, Family, Group)):
        return where
    if isinstance(where, tuple) and len(where) == 2 and isinstance(where[0], str):
        if isinstance(where[1], str):
            return Family(where[0], where[1])
        if isinstance(where[1], int) and not isinstance(where[1], bool):
            return Slice(where[0], where[1])
    raise TypeError(
        "where must be a Slice, a Family, a Group, or a shorthand tuple (router, source_index) / "
        f"(router, family), got {where!r}"
    )


def as_index(name: str, value: Any) -> Union[None, slice, tuple[int, ...]]:
    """Normalise a positions / batch selector (validated against a length at run time)."""
    if value is None or isinstance(value, slice):
        return value
    if isinstance(value, Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be integer indices, got a tensor of dtype {value.dtype}")
        value = value.reshape(-1).tolist()
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, a slice or a sequence of ints, got {value!r}")
    if _is_int(value):
        return (int(value),)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be an int, a slice or a sequence of ints, got {value!r}")
    items = tuple(value)
    for item in items:
        if not _is_int(item):
            raise TypeError(f"{name} must hold ints, got {item!r} in {value!r}")
    items = tuple(int(item) for item in items)
    if not items:
        raise ValueError(f"{name} is empty; pass None to act on all of them")
    return items


def select_indices(name: str, selector: IndexSelector, n: int, origin: str) -> list[int]:
    """The concrete indices (``0..n-1``) a normalised selector picks out of ``n``."""
    if selector is None:
        return list(range(n))
    if isinstance(selector, slice):
        picked = list(range(n))[selector]
        if not picked:
            raise ValueError(f"{name} {selector!r} selects nothing out of {n} ({origin})")
        return picked
    out = []
    for i in selector:
        if not -n <= i < n:
            raise IndexError(
                f"{name} {i} out of range for {n} {name} in this run (valid: 0..{n - 1} or "
                f"-{n}..-1) ({origin})"
            )
        out.append(i % n)
    return out


def resolve_positions(positions: Any, n_pos: int, origin: str = "positions") -> Optional[list[int]]:
    """The positions ``0..n_pos-1`` a positions argument picks, or ``None`` for all of them."""
    if positions is None:
        return None
    return select_indices("positions", as_index("positions", positions), n_pos, origin)


# ============================================================================ resolution
def describe_router(spec: RouterSpec) -> str:
    """``"blocks.2.attn_router (2 sources: 0 'emb' [embedding], 1 'block 0' [history])"``."""
    sources = ", ".join(f"{s.index} {s.label!r} [{s.family}]" for s in spec.sources)
    plural = "source" if spec.n_sources == 1 else "sources"
    return f"{spec.name} ({spec.n_sources} {plural}: {sources})"


def router_spec_named(specs: Mapping[str, RouterSpec], name: str) -> RouterSpec:
    """``specs[name]`` (``name`` in any form :meth:`RouterId.parse` accepts), or an
    :class:`~attnres_lens.names.UnknownRouterError` (a ``KeyError``) listing the routers there are."""
    return specs[RouterId.parse(name, specs).name]


def source_index(spec: RouterSpec, source: int) -> int:
    """``source`` as an index ``0..n-1`` at ``spec`` (negative counts from the end)."""
    n = spec.n_sources
    if not -n <= source < n:
        raise IndexError(
            f"source {source} out of range at {spec.name}, which has {n} source"
            f"{'s' if n != 1 else ''} (valid indices 0..{n - 1}, or -{n}..-1): "
            f"{describe_router(spec)}"
        )
    return source % n


#: What a where-value resolves to: each router it touches, with the source indices there.
Touched = list[tuple[RouterSpec, tuple[int, ...]]]


def resolve_where(model: "HookedAttnResTransformer", where: Any) -> Touched:
    """The routers a where-value touches and the source indices at each, in forward order.

    Raises ``KeyError`` for an unknown router, ``IndexError`` for a source index out of range,
    ``ValueError`` for a family absent at a router or a group that selects nothing; each message
    names what is valid at that router.
    """
    where = as_where(where)
    specs = {spec.name: spec for spec in model.router_specs}
    if isinstance(where, Slice):
        spec = router_spec_named(specs, where.router)
        return [(spec, (source_index(spec, where.source),))]
    if isinstance(where, Family):
        return [_family_sources(router_spec_named(specs, where.router), where.family)]
    if where.slices is not None:
        picked = _explicit_sources(specs, where.slices)
    else:
        picked = _sources_by_criteria(model, where)
    if not picked:
        raise ValueError(
            f"group {where.label or where!r} selects no source of this model (families="
            f"{where.families}, sublayers={where.sublayers}, layers={where.layers})"
        )
    order = {name: i for i, name in enumerate(specs)}
    return [
        (specs[name], tuple(sorted(sources)))
        for name, sources in sorted(picked.items(), key=lambda item: order[item[0]])
    ]


def _family_sources(spec: RouterSpec, family: str) -> tuple[RouterSpec, tuple[int, ...]]:
    sources = tuple(s.index for s in spec.sources if s.family == family)
    if not sources:
        raise ValueError(
            f"family {family!r} is absent at {spec.name}; families there: "
            f"{spec.families()} ({describe_router(spec)})"
        )
    return spec, sources


def _explicit_sources(
    specs: Mapping[str, RouterSpec], pairs: Sequence[SlicePair]
) -> dict[str, list[int]]:
    picked: dict[str, list[int]] = {}
    for router, source in pairs:
        index = source_index(router_spec_named(specs, router), source)
        if index not in picked.setdefault(router, []):
            picked[router].append(index)
    return picked


def _sources_by_criteria(model: "HookedAttnResTransformer", group: "Group") -> dict[str, list[int]]:
    n_layers = model.cfg.n_layers
    for layer in group.layers or ():
        if not 0 <= layer < n_layers:
            raise LayerOutOfRangeError(
                f"Group.layers: layer {layer} out of range; the model has layers 0..{n_layers - 1}"
            )
    picked: dict[str, list[int]] = {}
    for spec in model.router_specs:
        if group.sublayers is not None and spec.sublayer not in group.sublayers:
            continue
        # the final router has no layer: layers never filter it out
        if group.layers is not None and spec.layer is not None and spec.layer not in group.layers:
            continue
        sources = [s.index for s in spec.sources if group.families is None or s.family in group.families]
        if sources:
            picked[spec.name] = sources
    return picked


def slice_pairs(touched: Touched) -> list[SlicePair]:
    """The ``(router, source)`` pairs of a resolved where-value, in forward order."""
    return [(spec.name, source) for spec, sources in touched for source in sources]


# ============================================================================ duplicate sources
def duplicate_of(specs: Sequence[RouterSpec]) -> dict[str, tuple[Optional[int], ...]]:
    """Per router, for each source, the index of the first source holding the *same tensor*
    (``None`` for a source that is the first holder of its tensor), derived from the layout.

    Two sources of a router are one tensor exactly when they sum the same components (their
    ``members``, see :mod:`attnres_lens.scheme`). Only the cumulative flavour has such copies
    (``docs/concepts.md``): a snapshot taken since the previous router is the stream ``x``
    itself (at the first router the embedding is both ``H[0]`` and ``x``; in block mode, with
    one layer per block, every attention router has such a pair; in full mode every router
    does). In the kimi flavour closing a block empties the current slot, so no copies.
    """
    out: dict[str, tuple[Optional[int], ...]] = {}
    for spec in specs:
        first: dict[frozenset[int], int] = {}
        out[spec.name] = tuple(
            None if first.setdefault(s.members, s.index) == s.index else first[s.members] for s in spec.sources
        )
    return out


def copies_of(duplicates: Sequence[Optional[int]], index: int) -> tuple[int, ...]:
    """Every source holding the same tensor as source ``index`` (itself included), in order."""
    first = index if duplicates[index] is None else duplicates[index]
    return tuple(i for i, d in enumerate(duplicates) if i == first or d == first)


def duplicate_pairs(model: "HookedAttnResTransformer") -> list[tuple[RouterSpec, tuple[int, ...]]]:
    """The routers with copies of one tensor, each with the copies' indices (first holder first)."""
    duplicates = duplicate_of(model.router_specs)
    out = []
    for spec in model.router_specs:
        dup = duplicates[spec.name]
        for index in range(spec.n_sources):
            copies = copies_of(dup, index)
            if dup[index] is None and len(copies) > 1:
                out.append((spec, copies))
    return out


def merge_touched(
    touched: Touched, duplicates: Mapping[str, Sequence[Optional[int]]], families: Optional[Sequence[str]]
) -> Touched:
    """``touched`` with copies of one tensor made one slice: every selected source brings its
    copies along. With ``families`` (a family-based selection) a merged slice belongs to the
    family of its first holder, so a copy whose first holder is of another family is left to
    that family's row (families still partition the merged slices)."""
    out = []
    for spec, sources in touched:
        dup = duplicates[spec.name]
        picked: set[int] = set()
        for source in sources:
            first = source if dup[source] is None else dup[source]
            if families is not None and spec.sources[first].family not in families:
                continue
            picked.update(copies_of(dup, first))
        if picked:
            out.append((spec, tuple(sorted(picked))))
    return out


# ============================================================================ bands
def band_of(spec: RouterSpec, bands: Mapping[str, tuple[int, ...]]) -> Optional[str]:
    """The band of a router's layer (``None`` for the final router, which is its own sublayer
    kind ``"final"`` in band groupings, and for layers no band holds)."""
    if spec.layer is None:
        return None
    for name, layers in bands.items():
        if spec.layer in layers:
            return name
    return None


# ============================================================================ group descriptions
#: Keys of a group description (``mass_vs_effect(groups={"name": {...}})``).
DESCRIPTION_KEYS: tuple[str, ...] = ("family", "families", "sublayer", "sublayers", "band", "bands", "layers")


def _names_in(value: Any) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def group_from_description(
    name: str, description: Mapping, bands: Mapping[str, tuple[int, ...]], n_layers: int
) -> "Group":
    """The :class:`Group` a description ``{"family": ..., "sublayer": ..., "band": ...,
    "layers": ...}`` names (each optional, a name or a list; ``None`` = any). Bands and layers
    select attention and MLP routers by layer; the final router only through
    ``sublayer="final"``."""
    unknown = [key for key in description if key not in DESCRIPTION_KEYS]
    if unknown:
        raise ValueError(f"group {name!r} has unknown keys {unknown}; a group description takes {DESCRIPTION_KEYS}")
    families = _names_in(description.get("family", description.get("families")))
    _check_names(name, "family", families, FAMILIES)
    sublayers = _names_in(description.get("sublayer", description.get("sublayers")))
    _check_names(name, "sublayer", sublayers, SUBLAYERS)
    layers = _description_layers(name, description, bands, n_layers)
    if layers is not None and not sublayers:
        sublayers = ["attn", "mlp"]  # a depth restriction leaves the final router out
    return Group(
        families=families or None,
        sublayers=sublayers or None,
        layers=None if layers is None else tuple(sorted(layers)),
        label=name,
    )


def _check_names(group: str, what: str, given: list, valid: tuple[str, ...]) -> None:
    plural = "families" if what == "family" else f"{what}s"
    for item in given:
        if item not in valid:
            raise ValueError(f"group {group!r} names unknown {what} {item!r}; {plural} are {valid}")


def _description_layers(
    name: str, description: Mapping, bands: Mapping[str, tuple[int, ...]], n_layers: int
) -> Optional[set[int]]:
    """The layers a description restricts to: the union of its bands, intersected with its
    explicit ``layers``; ``None`` when it names neither."""
    layers: Optional[set[int]] = None
    for band in _names_in(description.get("band", description.get("bands"))):
        if band not in bands:
            raise ValueError(f"group {name!r} names unknown band {band!r}; bands are {list(bands)}")
        layers = (layers or set()) | set(bands[band])
    if description.get("layers") is not None:
        explicit = list(description["layers"])
        for layer in explicit:
            if not _is_int(layer) or not 0 <= layer < n_layers:
                raise ValueError(f"group {name!r} names layer {layer!r}; the model's layers are 0..{n_layers - 1}")
        explicit_set = {int(layer) for layer in explicit}
        layers = explicit_set if layers is None else layers & explicit_set
    return layers


# ============================================================================ sweep units
@dataclass
class SweepUnit:
    """One row of a sweep: what it intervenes on and the keys it is reported under.

    ``router``/``layer``/``source``/``family`` are ``None`` where they do not apply (a family
    row has no source, a band row no router); ``band`` is the depth band of a ``family_band``
    row. ``touched`` is the resolved where-value and ``start`` the first sublayer step it
    touches (the batched engine reruns from there).
    """

    where: Any
    label: str
    router: Optional[str] = None
    layer: Optional[int] = None
    sublayer: Optional[str] = None
    source: Optional[int] = None
    family: Optional[str] = None
    band: Optional[str] = None
    touched: Touched = None  # type: ignore[assignment]
    start: int = 0
    #: a slice row: how many sources hold its tensor (2 when a duplicate pair was merged into
    #: it); ``None`` for family and group rows
    n_copies: Optional[int] = None

    @property
    def slices(self) -> list[SlicePair]:
        """The ``(router, source)`` pairs this row intervenes on."""
        return slice_pairs(self.touched)

    def keys(self) -> dict[str, Any]:
        """The row's identifying columns, as in ``sweep_sources``."""
        return dict(router=self.router, layer=self.layer, sublayer=self.sublayer,
                    source=self.source, family=self.family, label=self.label, n_copies=self.n_copies)


def sweep_units(
    model: "HookedAttnResTransformer",
    groups: Any,
    bands: BandsLike = None,
    routers: Optional[Sequence[str]] = None,
    merge_duplicates: bool = True,
) -> list[SweepUnit]:
    """The rows of a sweep grouped by ``groups`` (see ``sweep_sources``), resolved.

    With ``merge_duplicates`` (the default) copies of one tensor at a router
    (:func:`duplicate_of`) are one slice: a ``"slice"`` row holds every copy (keyed by the
    first holder, labelled ``"after block 0 = stream"``), family rows follow the first holder's
    family, and named groups bring the copies of their slices along (:func:`merge_touched`)."""
    if not isinstance(merge_duplicates, bool):
        raise TypeError(f"merge_duplicates must be a bool, got {merge_duplicates!r}")
    specs = _routers_to_sweep(model, groups, routers)
    if bands is not None and not (isinstance(groups, str) and groups == "family_band"):
        raise ValueError("bands= only applies to groups='family_band'")
    if isinstance(groups, str):
        if groups not in GROUPINGS:
            raise ValueError(f"unknown groups {groups!r}; valid: {GROUPINGS} or a mapping label -> slices")
        if groups == "slice":
            units = _slice_units(specs)
        elif groups == "family":
            units = _family_units(specs)
        else:
            units = _family_band_units(specs, resolve_bands(bands, model.cfg.n_layers))
    elif isinstance(groups, Mapping):
        units = _named_units(groups)
    else:
        raise TypeError(f"groups must be one of {GROUPINGS} or a mapping label -> [(router, source)], got {groups!r}")
    step_of = {s.name: s.step for s in model.router_specs}
    duplicates = duplicate_of(model.router_specs)
    kept = []
    for unit in units:
        unit.touched = resolve_where(model, unit.where)
        if merge_duplicates and not _merge_unit(unit, duplicates):
            continue  # a copy, reported with its first holder's row
        if isinstance(unit.where, Slice) or (merge_duplicates and unit.source is not None):
            spec, (index, *_) = unit.touched[0]
            unit.n_copies = len(copies_of(duplicates[spec.name], index))
        unit.start = min(step_of[spec.name] for spec, _ in unit.touched)
        if isinstance(groups, Mapping):
            _fill_common_keys(unit)
        kept.append(unit)
    return kept


def _merge_unit(unit: SweepUnit, duplicates: Mapping[str, Sequence[Optional[int]]]) -> bool:
    """Make ``unit`` act on every copy of the tensors it selects; ``False`` when nothing is left
    to it (a slice row of a later copy, or a family row all of whose sources are copies)."""
    where = unit.where
    if isinstance(where, Slice):
        spec, (index,) = unit.touched[0]
        if duplicates[spec.name][index] is not None:
            return False
        families = None
    elif isinstance(where, Family):
        families = (where.family,)
    else:
        families = where.families if where.slices is None else None
    merged = merge_touched(unit.touched, duplicates, families)
    if not merged:
        return False
    if merged != unit.touched:
        labels = [_copies_label(spec, sources, duplicates[spec.name]) for spec, sources in merged]
        if isinstance(where, Slice):
            unit.label = labels[0]
        elif isinstance(where, Family):
            unit.label = f"{where.family}: {labels[0]}"
        elif families is not None:  # a family x band row that took in copies of another family's source
            unit.label = _with_copies_label(unit.label, families, merged)
        unit.where = Group(slices=tuple(slice_pairs(merged)), label=unit.label)
        unit.touched = merged
    return True


def _with_copies_label(label: str, families: Sequence[str], merged: Touched) -> str:
    """``"history (+ current copies), attn, early (layers 0-1)"``: the row also holds sources of
    other families that are copies of its own (the current stream where it is the newest
    snapshot, ``"after block 0 = stream"``)."""
    extra = sorted({spec.sources[i].family for spec, sources in merged for i in sources} - set(families))
    if not extra:
        return label
    head, sep, rest = label.partition(", ")
    return f"{head} (+ {' and '.join(extra)} copies){sep}{rest}"


def _copies_label(spec: RouterSpec, sources: Sequence[int], duplicates: Sequence[Optional[int]]) -> str:
    """``"emb, after block 0 = stream"``: the sources' labels, copies of one tensor joined by ``=``."""
    parts = []
    for index in sources:
        if duplicates[index] is None:
            parts.append(" = ".join(spec.sources[i].label for i in copies_of(duplicates, index) if i in sources))
    return ", ".join(parts)


def _routers_to_sweep(
    model: "HookedAttnResTransformer", groups: Any, routers: Optional[Sequence[str]]
) -> list[RouterSpec]:
    specs = model.router_specs
    if routers is None:
        return list(specs)
    names = {s.name for s in specs}
    routers = list(routers)
    bad = [r for r in routers if r not in names]
    if bad:
        raise KeyError(f"unknown routers {bad}; routers are {[s.name for s in specs]}")
    if not (isinstance(groups, str) and groups in ("slice", "family")):
        raise ValueError("routers= only applies to groups='slice' or groups='family'")
    return [s for s in specs if s.name in set(routers)]


def _slice_units(specs: list[RouterSpec]) -> list[SweepUnit]:
    return [
        SweepUnit(Slice(spec.name, src.index), src.label, router=spec.name, layer=spec.layer,
                  sublayer=spec.sublayer, source=src.index, family=src.family)
        for spec in specs
        for src in spec.sources
    ]


def _family_units(specs: list[RouterSpec]) -> list[SweepUnit]:
    units = []
    for spec in specs:
        for family in spec.families():
            labels = [s.label for s in spec.sources if s.family == family]
            units.append(SweepUnit(Family(spec.name, family), f"{family}: {', '.join(labels)}",
                                   router=spec.name, layer=spec.layer, sublayer=spec.sublayer, family=family))
    return units


def _family_band_units(specs: list[RouterSpec], bands: Mapping[str, tuple[int, ...]]) -> list[SweepUnit]:
    units = []
    for family in FAMILIES:
        for sublayer in ("attn", "mlp"):
            for band, layers in bands.items():
                if not any(s.sublayer == sublayer and s.layer in layers and family in s.families() for s in specs):
                    continue
                label = f"{family}, {sublayer}, {band} (layers {layers_text(list(layers))})"
                where = Group(families=family, sublayers=sublayer, layers=tuple(layers), label=label)
                units.append(SweepUnit(where, label, sublayer=sublayer, family=family, band=band))
        if any(s.sublayer == "final" and family in s.families() for s in specs):
            label = f"{family}, final"
            where = Group(families=family, sublayers="final", label=label)
            units.append(SweepUnit(where, label, sublayer="final", family=family))
    return units


def _named_units(groups: Mapping) -> list[SweepUnit]:
    if not groups:
        raise ValueError("groups mapping is empty")
    units = []
    for label, members in groups.items():
        if not isinstance(label, str):
            raise TypeError(f"group labels must be str, got {label!r}")
        units.append(SweepUnit(Group(slices=tuple(members), label=label), label))
    return units


def _fill_common_keys(unit: SweepUnit) -> None:
    """A named group's keys: each one its slices share, else ``None``."""

    def common(values: list) -> Any:
        return values[0] if len(set(values)) == 1 else None

    specs = [spec for spec, _ in unit.touched]
    pairs = [(spec, i) for spec, sources in unit.touched for i in sources]
    unit.router = common([s.name for s in specs])
    unit.layer = common([s.layer for s in specs])
    unit.sublayer = common([s.sublayer for s in specs])
    unit.source = pairs[0][1] if len(pairs) == 1 else None
    unit.family = common([spec.sources[i].family for spec, i in pairs])


__all__ = [
    "BandsLike",
    "Family",
    "Group",
    "IndexSelector",
    "LayerOutOfRangeError",
    "Slice",
    "SweepUnit",
    "as_index",
    "as_where",
    "band_of",
    "default_bands",
    "copies_of",
    "describe_router",
    "duplicate_of",
    "duplicate_pairs",
    "group_from_description",
    "layers_text",
    "merge_touched",
    "resolve_bands",
    "resolve_positions",
    "resolve_where",
    "router_name",
    "select_indices",
    "slice_pairs",
    "source_index",
    "sweep_units",
]
