"""`AttnResActivationCache`: TransformerLens' ``ActivationCache``, routing-aware.

TL's residual methods (``decompose_resid``, ``accumulated_resid``,
``get_full_resid_decomposition``, ``logit_lens``) assume one additive residual stream that
every sublayer and the unembedding read. That holds in the **cumulative** flavour (the stream
``x``: ``hook_resid_pre``/``hook_resid_post``), where they run unchanged.

In the **kimi** flavour no such stream exists: each sublayer (and ``ln_final``) reads its own
router's output ``out = sum_i mass_i * v_i``, and every source ``v_i`` is a sum of components
(the embedding and sublayer outputs). So a component ``c`` enters that read with weight
``sum of mass_i over the sources containing c``. The methods below weight each component that
way, so their stacks sum exactly to the reading router's ``hook_out``:

- ``decompose_resid(layer, mlp_input)``: the components of the input of
  ``blocks.{layer}.attn_router`` (``mlp_router`` with ``mlp_input``; ``final_router`` at
  ``layer = n_layers``), each weighted by that router's mass;
- ``get_full_resid_decomposition``: the same per head and per neuron (bias rows are zero);
- ``accumulated_resid``: each router's ``hook_out`` (what each sublayer actually reads);
- ``logit_lens`` (TL 4): refused with a message naming ``accumulated_resid``.

``decompose_router(router_name)`` (both flavours) splits any router's ``hook_out`` into the
per-source contributions ``mass_i * v_i``, labelled from ``model.source_table()``.
``logit_attrs`` applies the ``ln_final`` gain to the stack, so it is exact direct logit
attribution whether or not the model was loaded with ``fold_ln``.
"""

from __future__ import annotations

import difflib

from typing import Any, Optional, Union

import torch
from torch import Tensor

from .compat import ActivationCache, Slice, get_act_name
from .config import AttnResConfig
from .refusals import flavour_refusal, missing_hook_error
from .router import closes_block_before, snapshot_after

EMBEDDING = -1  # the component id of the embedding; sublayer k has id k


def source_members(cfg: AttnResConfig) -> dict[str, list[frozenset[int]]]:
    """For every router (by hook prefix), the components each of its sources sums: the
    embedding (``-1``) and sublayer outputs ``k`` (``attn_l = 2l``, ``mlp_l = 2l + 1``).

    This replays the spec's state machine on sets of component ids (the model's forward does
    the same steps on tensors, with the same predicates)."""
    names = [f"blocks.{k // 2}.{'attn' if k % 2 == 0 else 'mlp'}_router" for k in range(cfg.n_sublayers)]
    members: dict[str, list[frozenset[int]]] = {}
    if cfg.flavour == "kimi":
        completed: list[frozenset[int]] = []
        current: Optional[frozenset[int]] = frozenset({EMBEDDING})
        for k in range(cfg.n_sublayers + 1):
            if closes_block_before(cfg, k) and current is not None:
                completed, current = completed + [current], None
            name = names[k] if k < cfg.n_sublayers else "final_router"
            members[name] = completed + ([current] if current is not None else [])
            current = (current or frozenset()) | {k}
        return members
    completed = [frozenset({EMBEDDING})]
    stream = frozenset({EMBEDDING})
    for k in range(cfg.n_sublayers):
        members[names[k]] = completed + [stream]
        stream = stream | {k}
        if snapshot_after(cfg, k):
            completed = completed + [stream]
    return members


class AttnResActivationCache(ActivationCache):
    """The cache :meth:`~attnres_lens.HookedAttnResTransformer.run_with_cache` returns (see the
    module docstring for which methods are routing-aware)."""

    def __getitem__(self, key: Any) -> Tensor:
        try:
            return super().__getitem__(key)
        except KeyError:
            name = _hook_name(key) or repr(key)
            cfg = self.model.cfg
            if name not in self.model.mod_dict and flavour_refusal(name, cfg.flavour, cfg.n_layers):
                raise missing_hook_error(name, cfg.flavour, cfg.n_layers) from None
            close = difflib.get_close_matches(name, [k for k in self.cache_dict if isinstance(k, str)], n=3)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else (
                "; its keys are listed by cache.keys()"
            )
            raise KeyError(f"{name} is not in the cache{hint}") from None

    #: Set by ``run_with_cache`` when backward hooks were attached during the run (TL's
    #: attribution-patching recipe records the gradients that way).
    recorded_with_backward_hooks: bool = False

    # ------------------------------------------------------------------ routing-aware pieces
    def _is_routed(self) -> bool:
        return self.model.cfg.flavour == "kimi"

    def _routed_stack_for(self, method: str) -> None:
        """Refuse a kimi stack on a cache recorded for attribution patching: its rows are
        weighted by routing mass, so (stack of the gradients) x (difference of stacks) is not
        the attribution TL's recipe computes (``docs/hooks.md``)."""
        if self.recorded_with_backward_hooks:
            raise ValueError(
                f"cache.{method} on a kimi (Block AttnRes) model gives routing-weighted stacks (each "
                "component times the reading router's mass), and this cache was recorded with "
                "backward hooks, i.e. for attribution patching: a gradient times a difference of "
                "weighted stacks is not the attribution. Use the hooks' activations and gradients "
                "directly (e.g. (grad[f'blocks.{l}.attn.hook_result'] * (clean - corrupted)) per "
                "head after set_use_attn_result(True), or blocks.{l}.hook_attn_out / hook_mlp_out / "
                "'{router}.hook_out' per sublayer)."
            )

    def _reading_router(self, layer: Optional[int], mlp_input: bool) -> tuple[int, str, int]:
        """``(layer, router name, step)`` of the router whose output the residual at
        ``(layer, mlp_input)`` stands for."""
        n = self.model.cfg.n_layers
        layer = n if layer is None or layer == -1 else layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            raise ValueError(f"layer must be an int in [0, {n}] (or None/-1), got {layer!r}")
        if layer == n:
            if mlp_input:
                raise ValueError("mlp_input=True needs layer < n_layers (layer n_layers is the unembedding)")
            return layer, "final_router", 2 * n
        return layer, f"blocks.{layer}.{'mlp' if mlp_input else 'attn'}_router", 2 * layer + int(mlp_input)

    def _cached(self, key: str, why: str) -> Tensor:
        if key not in self.cache_dict:
            raise KeyError(f"{why} needs {key!r} in the cache; run run_with_cache without a names_filter that drops it")
        return self.cache_dict[key]

    def component_masses(self, router_name: str) -> dict[int, Tensor]:
        """For each component (``-1`` = embedding, ``k`` = sublayer ``k``) that ``router_name``
        reads, the total mass ``[batch, pos]`` the router puts on the sources containing it."""
        members = source_members(self.model.cfg)
        if router_name not in members:
            raise KeyError(f"no router named {router_name!r}; routers are {list(members)}")
        weights = self._cached(f"{router_name}.hook_weights", "a routing-aware decomposition")
        masses: dict[int, Tensor] = {}
        for index, components in enumerate(members[router_name]):
            for component in components:
                mass = weights[..., index]
                masses[component] = masses[component] + mass if component in masses else mass
        return masses

    def _component(self, component: int) -> Tensor:
        if component == EMBEDDING:
            return self["hook_embed"]
        layer, is_mlp = divmod(component, 2)
        return self[f"blocks.{layer}.hook_{'mlp' if is_mlp else 'attn'}_out"]

    def decompose_router(
        self, router_name: str, pos_slice: Any = None, return_labels: bool = False
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """``[source, *batch_and_pos, d_model]``: each source's contribution ``mass_i * v_i`` to
        ``router_name``'s ``hook_out`` (they sum to it exactly), labelled as in
        ``model.source_table()``. The routing analogue of ``decompose_resid``."""
        table = self.model.source_table()
        rows = table[table["router"] == router_name]
        if rows.empty:
            raise KeyError(f"no router named {router_name!r}; routers are {list(dict.fromkeys(table['router']))}")
        sources = self._cached(f"{router_name}.hook_sources", "decompose_router")
        weights = self._cached(f"{router_name}.hook_weights", "decompose_router")
        parts = (weights.unsqueeze(-1) * sources).movedim(-2, 0)
        parts = _slice(pos_slice).apply(parts, dim=-2)
        labels = list(rows["label"])
        return (parts, labels) if return_labels else parts

    # ------------------------------------------------------------------ TL methods
    def decompose_resid(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: Any = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """TL's ``decompose_resid``. Kimi: routing-aware (each component weighted by the reading
        router's mass on the sources containing it; the stack sums to that router's
        ``hook_out``). Cumulative: TL's, over the stream ``x``."""
        if not self._is_routed():
            return super().decompose_resid(layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels)
        self._routed_stack_for("decompose_resid")
        if mode not in ("all", "mlp", "attn"):
            raise ValueError(f"mode must be 'all', 'mlp' or 'attn', got {mode!r}")
        layer, router, step = self._reading_router(layer, mlp_input)
        masses = self.component_masses(router)
        pos_slice = _slice(pos_slice)
        labels, parts = [], []
        if incl_embeds:
            labels.append("embed")
            parts.append(self._weighted(EMBEDDING, masses, pos_slice))
        for k in range(step):
            kind = "mlp" if k % 2 else "attn"
            if mode in ("all", kind):
                labels.append(f"{k // 2}_{kind}_out")
                parts.append(self._weighted(k, masses, pos_slice))
        stack = torch.stack(parts, dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def accumulated_resid(
        self,
        layer: Optional[int] = None,
        incl_mid: bool = False,
        apply_ln: bool = False,
        pos_slice: Any = None,
        mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """TL's ``accumulated_resid``. Kimi: the input each sublayer actually reads, i.e. each
        router's ``hook_out`` (``{l}_pre`` = attention router of layer ``l``, ``{l}_mid`` = its
        MLP router, ``final_post`` = the final router). Cumulative: TL's, over the stream."""
        if not self._is_routed():
            return super().accumulated_resid(layer, incl_mid, apply_ln, pos_slice, mlp_input, return_labels)
        self._routed_stack_for("accumulated_resid")
        n = self.model.cfg.n_layers
        layer, _, _ = self._reading_router(layer, mlp_input)
        labels, parts = [], []
        for l in range(layer + 1):
            if l == n:
                labels.append("final_post")
                parts.append(self["final_router.hook_out"])
                continue
            labels.append(f"{l}_pre")
            parts.append(self[f"blocks.{l}.attn_router.hook_out"])
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                labels.append(f"{l}_mid")
                parts.append(self[f"blocks.{l}.mlp_router.hook_out"])
        pos_slice = _slice(pos_slice)
        stack = torch.stack([pos_slice.apply(p, dim=-2) for p in parts], dim=0)
        if apply_ln:
            # Frozen scales: every entry divided by the cached scale of the norm reading at
            # ``layer`` (TL 3's behaviour; TL 4 recomputes the final norm per entry instead).
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: Any = None,
        return_labels: bool = False,
        project_output_onto: Optional[Tensor] = None,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """TL's ``get_full_resid_decomposition`` (heads, neurons or MLP outputs, embed, bias).
        Kimi: routing-aware, every row weighted by the reading router's mass on the source
        containing it, summing to that router's ``hook_out``. Cumulative: TL's."""
        if not self._is_routed():
            kwargs = {"project_output_onto": project_output_onto} if project_output_onto is not None else {}
            return super().get_full_resid_decomposition(
                layer, mlp_input, expand_neurons, apply_ln, pos_slice, return_labels, **kwargs
            )
        self._routed_stack_for("get_full_resid_decomposition")
        layer, router, step = self._reading_router(layer, mlp_input)
        masses = self.component_masses(router)
        pos_slice = _slice(pos_slice)
        labels: list[str] = []
        parts: list[Tensor] = []
        for k in range(step):
            l = k // 2
            if k % 2 == 0:
                parts.append(self._weighted(k, masses, pos_slice, per="head").movedim(-2, 0))
                labels.extend(f"L{l}H{h}" for h in range(self.model.cfg.n_heads))
            elif expand_neurons:
                parts.append(self._weighted(k, masses, pos_slice, per="neuron").movedim(-2, 0))
                labels.extend(f"L{l}N{i}" for i in range(self.model.cfg.d_mlp))
            else:
                parts.append(self._weighted(k, masses, pos_slice)[None])
                labels.append(f"{l}_mlp_out")
        embed = self._weighted(EMBEDDING, masses, pos_slice)
        parts.append(embed[None])
        labels.append("embed")
        parts.append(torch.zeros_like(embed)[None])
        labels.append("bias")
        stack = torch.cat(parts, dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        if project_output_onto is not None:
            stack = stack @ project_output_onto
        return (stack, labels) if return_labels else stack

    def stack_head_results(
        self,
        layer: int = -1,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Any = None,
        apply_ln: bool = False,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """TL's ``stack_head_results``: ``[layer * head, *batch_and_pos, d_model]``, the heads of
        the layers before ``layer``. Kimi: routing-aware, each head weighted by the reading
        router's mass on the sources containing it (as :meth:`decompose_resid`), so the heads of
        a layer sum to that layer's ``attn_out`` row there and ``remainder`` is what the reading
        router outputs minus the heads. Cumulative: TL's, over the stream."""
        if not self._is_routed():
            return super().stack_head_results(layer, return_labels, incl_remainder, pos_slice, apply_ln)
        self._routed_stack_for("stack_head_results")
        layer, router, step = self._reading_router(layer, False)
        return self._routed_stack(
            layer, False, router, [k for k in range(0, step, 2)], "head", pos_slice, incl_remainder,
            apply_ln, return_labels,
            lambda k: [f"L{k // 2}H{h}" for h in range(self.model.cfg.n_heads)],
        )

    def stack_neuron_results(
        self,
        layer: int,
        pos_slice: Any = None,
        neuron_slice: Any = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        apply_ln: bool = False,
        project_output_onto: Optional[Tensor] = None,
        mlp_input: bool = False,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """TL's ``stack_neuron_results`` (the neurons of the layers before ``layer``). Kimi:
        routing-aware, each neuron weighted by the reading router's mass on the sources
        containing its MLP (as :meth:`decompose_resid`). Cumulative: TL's."""
        if not self._is_routed():
            kwargs = {} if project_output_onto is None and not mlp_input else {
                "project_output_onto": project_output_onto, "mlp_input": mlp_input}
            return super().stack_neuron_results(
                layer, pos_slice, neuron_slice, return_labels, incl_remainder, apply_ln, **kwargs
            )
        self._routed_stack_for("stack_neuron_results")
        layer, router, step = self._reading_router(layer, mlp_input)
        neurons = [int(n) for n in _slice(neuron_slice).indices(self.model.cfg.d_mlp)]
        stack = self._routed_stack(
            layer, mlp_input, router, [k for k in range(1, step, 2)], "neuron", pos_slice,
            incl_remainder, apply_ln, return_labels,
            lambda k: [f"L{k // 2}N{n}" for n in neurons], neuron_slice=neuron_slice,
        )
        if project_output_onto is None:
            return stack
        if return_labels:
            return stack[0] @ project_output_onto, stack[1]
        return stack @ project_output_onto

    def _routed_stack(
        self, layer: int, mlp_input: bool, router: str, components: list[int], per: str,
        pos_slice: Any, incl_remainder: bool, apply_ln: bool, return_labels: bool, label: Any,
        neuron_slice: Any = None,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """The kimi stacks of heads or neurons: every row weighted once, by :meth:`_weighted`."""
        masses = self.component_masses(router)
        pos_slice = _slice(pos_slice)
        labels: list[str] = []
        parts: list[Tensor] = []
        for k in components:
            parts.append(self._weighted(k, masses, pos_slice, per=per, neuron_slice=neuron_slice).movedim(-2, 0))
            labels.extend(label(k))
        empty = pos_slice.apply(self["hook_embed"], dim=-2)
        stack = torch.cat(parts, dim=0) if parts else empty.new_zeros((0, *empty.shape))
        if incl_remainder:
            read = pos_slice.apply(self._cached(f"{router}.hook_out", "incl_remainder"), dim=-2)
            stack = torch.cat([stack, (read - stack.sum(0))[None]], dim=0)
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def _weighted(
        self, component: int, masses: dict[int, Tensor], pos_slice: Slice, per: Optional[str] = None,
        neuron_slice: Any = None,
    ) -> Tensor:
        """Component ``component``'s term in a routed read: its output (per head
        ``[..., pos, head, d_model]``, per neuron ``[..., pos, neuron, d_model]``, or whole
        ``[..., pos, d_model]``) times the reading router's mass on the sources containing it.
        Every routing-aware stack of this cache weighs its rows here, and only here."""
        mass = pos_slice.apply(masses[component], dim=-1)
        if per == "head":
            part = pos_slice.apply(self._head_results(component // 2), dim=-3)
        elif per == "neuron":
            part = self.get_neuron_results(component // 2, neuron_slice=neuron_slice, pos_slice=pos_slice)
        else:
            part = pos_slice.apply(self._component(component), dim=-2)
        inner = part.ndim - mass.ndim
        return part * mass.reshape(*mass.shape, *([1] * inner)).to(part.dtype)

    def _head_results(self, layer: int) -> Tensor:
        """``[..., pos, head, d_model]``: each head's write, ``z @ W_O`` (``hook_result``)."""
        key = f"blocks.{layer}.attn.hook_result"
        if key in self.cache_dict:
            return self.cache_dict[key]
        z = self[f"blocks.{layer}.attn.hook_z"]
        return torch.einsum("...hd,hdm->...hm", z, self.model.blocks[layer].attn.W_O.to(z.dtype))

    def logit_attrs(self, residual_stack: Tensor, tokens: Any, *args: Any, **kwargs: Any) -> Tensor:
        """TL's ``logit_attrs`` with the ``ln_final`` gain applied to the stack first (a no-op
        after ``fold_ln``), so the attributions are exact in TL's frozen-scale sense whether or
        not the gain was folded. Kimi: pass a routing-aware stack (``decompose_resid()`` or
        ``get_full_resid_decomposition()``), which sums to what ``ln_final`` reads."""
        gain = self.model.ln_final.weight
        return super().logit_attrs(residual_stack * gain.to(residual_stack.dtype), tokens, *args, **kwargs)

    def logit_lens(self, **kwargs: Any) -> Any:
        """TL 4's one-call logit lens (cumulative). Kimi: refused; the routing-aware lens is
        ``cache.accumulated_resid(apply_ln=True) @ model.W_U`` (what each sublayer reads)."""
        if self._is_routed():
            raise ValueError(
                "logit_lens reads one additive residual stream, which a kimi (Block AttnRes) model "
                "does not have. Use the routing-aware cache.accumulated_resid(apply_ln=True) @ "
                "model.W_U (each router's output through ln_final), or "
                "cache.decompose_resid(apply_ln=True) for per-component terms."
            )
        return super().logit_lens(**kwargs)


def _hook_name(key: Any) -> Optional[str]:
    """The hook name a cache key stands for (TL's ``("resid_pre", 3)`` shorthand included)."""
    if isinstance(key, str):
        return key
    if isinstance(key, tuple) and key and isinstance(key[0], str):
        try:
            return get_act_name(*key)
        except Exception:  # noqa: BLE001 - not a TL shorthand: leave TL's KeyError as it is
            return None
    return None


def _slice(pos_slice: Any) -> Slice:
    return pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
