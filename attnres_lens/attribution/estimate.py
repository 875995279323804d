"""Fast estimates of slice effects that stay faithful where the gradient fails.

Setting. Sublayer ``k`` reads ``h_k = sum_i alpha_i v_i`` (its router's output) through its
input RMSNorm and writes ``o_k = f_k(h_k)``. An intervention at router ``k`` changes ``h_k``
only, hence ``o_k`` only; everything after sublayer ``k`` then reacts. Write the metric as a
function of the sublayer outputs, ``M(o_0, ..., o_{n-1})``, and split what follows ``o_k`` into
the *direct* path (``o_k`` reaches the final pre-norm state ``y`` without passing through any
later sublayer: cumulative ``y = x = ... + o_k + ...``; kimi: ``o_k`` is in one source of the
final router) and the *indirect* paths (through later routers and sublayers).

Methods (``method=``):

- ``"gradient"``: today's :func:`gradient_attribution`, ``dM ~ g_alpha . d alpha``. Zeroing a
  high-mass slice moves ``h_k`` nearly parallel to itself, which the norm discards to first
  order, so large effects are estimated near 0 (``docs/attribution.md``).
- ``"norm_fix"`` (the AtP* recipe: recompute the saturating local step exactly): recompute
  ``h'_k`` (the router under the intervention, every mode) and ``o'_k = f_k(h'_k)`` exactly for
  every slice, batched across slices (one sublayer per slice, not one model), and linearise
  the rest with the gradient from one backward pass:
  ``dM ~ g_k . (o'_k - o_k)``, ``g_k = dM/do_k`` (the total derivative).
- ``"readout"`` (default): the norm fix, with the direct path computed exactly. With
  ``d_k = o'_k - o_k``, ``y' = y + P_k d_k`` (``P_k``: place ``d_k`` where the direct path puts
  it; kimi: into the final router's source holding ``o_k``, and the final router is rerun
  exactly) and ``g^dir_k`` the part of ``g_k`` that flows along the direct path
  (``dM/dy`` for cumulative; ``dM/dv_j`` at the final router's source ``j`` for kimi)::

      dM ~ [ m(head(norm(y'))) - m(head(norm(y))) ]  +  (g_k - g^dir_k) . d_k

  i.e. the direct path exactly (final norm, unembedding and log-softmax: the nonlinearity the
  linear estimate misses when ``d_k`` is large next to ``y``) and only the indirect paths to
  first order. A slice spanning several routers sums its ``d_k`` into one ``y'`` and its
  indirect terms. Where the router output moves by less than :data:`RECOMPUTE_ABOVE` of its
  norm at every token, the norm is close to linear along the move, so the slice is taken to
  first order at the router output instead (``dM ~ dM/dh_k . (h'_k - h_k)``), and neither
  its sublayer nor its readout is recomputed.

Measured on the bundled trained model (zero / mask, 32 x 128 held-out tokens; Spearman of
|estimate| with |exact|): gradient 0.41 / 0.52, norm_fix 0.77 / 0.74, readout 0.96 / 0.96
(``benchmarks/attribution.py``). Integrated gradients along the ``scale`` path (K = 4
midpoints; zero mode, 8 prompts) reached 0.86, at K forward and backward passes per slice,
so it is not offered.

Cost: one forward and one backward for all slices, then per slice one router, one sublayer and
one readout (final router, norm, unembedding, metric), independent of the depth after the
slice. The forward is the exact engine's clean run too (:class:`ChunkRun`), so the screen's
exact part does not repeat it. Measured against the exact sweep by ``benchmarks/attribution.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from ..interventions import Intervention, MaskAllSourcesError
from ..interventions.compile import compile_interventions, hooks_from_ops
from ..metrics import Metric
from ..components import KVCacheEntry
from ..model import DepthState
from ..selection import SweepUnit, resolve_positions, sweep_units
from ..sweep_engine import CleanRun, default_budget
from .data import in_input_order, prompt_batches, split_batch
from .gradients import gradient_rows

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer

METHODS: tuple[str, ...] = ("readout", "norm_fix", "gradient")
#: A slice whose router output moves by less than this fraction of its norm (at every token)
#: is taken to first order through ``dM/dh_k`` instead of recomputed: the norm's nonlinearity
#: only matters for large moves (as AtP* recomputes only saturated softmaxes).
RECOMPUTE_ABOVE = 0.05
#: Modes the estimator supports: those whose value does not come from another run.
ESTIMATE_MODES: tuple[str, ...] = ("zero", "mask", "scale")
#: How much memory of clean runs :func:`estimate_keeping_clean_runs` keeps for the exact
#: part of the screen (beyond it, the exact part reruns the clean forward of the rest).
KEEP_CLEAN_BYTES = 1 << 30
ESTIMATE_COLUMNS: tuple[str, ...] = (
    "router", "layer", "sublayer", "source", "family", "label", "n_copies", "mass", "metric_clean",
    "estimate", "mass_per_prompt", "estimate_per_prompt",
)


@dataclass
class ChunkRun:
    """One minibatch as the estimator ran it: which prompts of the dataset it holds (``rows``),
    their tokens, and the clean run of its forward (``None`` where not kept)."""

    rows: slice
    tokens: Tensor
    clean: Optional[CleanRun]


@dataclass
class _Pass:
    """The clean run of one chunk, kept for the per-slice recomputation."""

    sources: dict[str, Tensor]  # router -> [batch, pos, source, d_model]
    logits: dict[str, Tensor]  # router -> [batch, pos, source]
    weights: dict[str, Tensor]  # router -> [batch, pos, source]
    routed: dict[str, Tensor]  # router -> h_k, its output [batch, pos, d_model]
    routed_grads: dict[str, Tensor]  # router -> dM/dh_k
    outputs: list[Tensor]  # sublayer k -> o_k
    total: list[Tensor]  # sublayer k -> dM/do_k
    direct: list[Tensor]  # sublayer k -> the direct-path part of dM/do_k
    final_input: Tensor  # y
    metric: Tensor  # [batch]
    run: CleanRun  # the same forward as the exact engine keeps it (states, logits, weights, keys/values)


def estimate_effects(
    model: "HookedAttnResTransformer",
    tokens: Any,
    *,
    mode: str = "zero",
    metric: Any = "loss",
    method: str = "readout",
    groups: Any = "slice",
    positions: Any = None,
    factor: Optional[float] = None,
    batch_size: Optional[int] = None,
    merge_duplicates: bool = True,
    max_batch_tokens: Optional[int] = None,
    bands: Any = None,
    attention_mask: Optional[Tensor] = None,
) -> pd.DataFrame:
    """Estimate the effect of intervening on every slice (or family, or group) with ``mode``
    (``"zero"``, ``"mask"`` or ``"scale"`` with ``factor``) without the exact sweep.

    ``method``: ``"readout"`` (default), ``"norm_fix"`` or ``"gradient"`` (see the module
    docstring for each). ``metric``: ``"loss"`` or a differentiable callable ``(logits,
    tokens) -> [batch]``; ``"kl"`` is refused (its gradient is 0 at the clean run).
    ``groups``, ``bands``, ``positions``, ``batch_size`` and ``merge_duplicates`` as in
    :func:`~attnres_lens.patching.sweep_sources`; ``max_batch_tokens``: tokens per stack of
    recomputed slices (default: the exact engine's, :func:`~attnres_lens.sweep_engine.default_budget`).

    Returns the sweep's key columns (``router, layer, sublayer, source, family, label,
    n_copies``), ``mass`` (as in the sweep), ``metric_clean``, ``estimate`` (mean over prompts
    of the estimated ``metric(ablated) - metric(clean)``) and the per-prompt arrays
    ``mass_per_prompt`` and ``estimate_per_prompt``. Rows whose intervention is undefined
    (masking every source of a router) are NaN. ``df.attrs["units"]`` holds the
    :class:`~attnres_lens.selection.SweepUnit` of each row.

    A padded ``[batch, pos]`` tensor takes its ``attention_mask`` (1 = real token; a list of
    strings derives it): its prompts are unpadded and run by length, so each prompt's mass and
    estimate are the ones it has alone, the means are over prompts, and the per-prompt arrays
    are in input order.
    """
    table, _ = _estimate(model, tokens, mode, metric, method, groups, positions, factor, batch_size, merge_duplicates,
                         max_batch_tokens, bands, keep_bytes=0, attention_mask=attention_mask)
    return table


def estimate_keeping_clean_runs(
    model: "HookedAttnResTransformer",
    tokens: Any,
    *,
    mode: str,
    metric: Any,
    groups: Any,
    positions: Any,
    batch_size: Optional[int],
    merge_duplicates: bool,
    bands: Any,
    keep_bytes: int = KEEP_CLEAN_BYTES,
) -> tuple[pd.DataFrame, list[ChunkRun]]:
    """:func:`estimate_effects` (method ``"readout"``) and, per minibatch, the clean run its
    forward made, kept for the exact engine while they fit in ``keep_bytes`` (the screen's
    exact part starts from them instead of running the clean forward again)."""
    return _estimate(model, tokens, mode, metric, "readout", groups, positions, None, batch_size, merge_duplicates,
                     None, bands, keep_bytes=keep_bytes)


def _estimate(model, tokens, mode, metric, method, groups, positions, factor, batch_size, merge_duplicates,
              max_batch_tokens, bands, keep_bytes: int, attention_mask=None) -> tuple[pd.DataFrame, list[ChunkRun]]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {METHODS}")
    if mode not in ESTIMATE_MODES:
        raise ValueError(f"estimate_effects supports modes {ESTIMATE_MODES}, got {mode!r}")
    if (mode == "scale") != (factor is not None):
        raise ValueError("mode 'scale' needs factor= (and only it takes one)")
    resolved = Metric.resolve(metric)
    if resolved.differentiable() is None:
        raise ValueError("metric 'kl' has value and gradient 0 at the clean run; estimate 'loss' or a logit difference")
    batches, rows = prompt_batches(model, tokens, attention_mask)
    resolved = resolved.for_prompts(torch.tensor(rows))
    bands = bands if isinstance(groups, str) and groups == "family_band" else None
    units = sweep_units(model, groups, bands, merge_duplicates=merge_duplicates)
    chunks: list[ChunkRun] = []
    if method == "gradient":
        per_prompt, mass, clean = _gradient_estimates(model, batches, resolved, units, positions, batch_size, mode, factor)
    else:
        per_prompt, mass, clean = _recomputed_estimates(
            model, batches, resolved, units, positions, batch_size, mode, factor, method, max_batch_tokens,
            chunks, keep_bytes,
        )
    per_prompt, mass, clean = (in_input_order(values, rows) for values in (per_prompt, mass, clean))
    return _estimate_table(units, per_prompt, mass, clean, method, mode), chunks


def _estimate_table(
    units: list[SweepUnit], per_prompt: np.ndarray, mass: np.ndarray, clean: np.ndarray, method: str, mode: str
) -> pd.DataFrame:
    rows = []
    for i, unit in enumerate(units):
        rows.append(dict(unit.keys(), mass=float(np.mean(mass[i])), metric_clean=float(clean.mean()),
                         estimate=float(np.mean(per_prompt[i])), mass_per_prompt=mass[i].copy(),
                         estimate_per_prompt=per_prompt[i].copy()))
    table = pd.DataFrame(rows, columns=list(ESTIMATE_COLUMNS))
    for column in ("layer", "source", "n_copies"):
        table[column] = table[column].astype("Int64")
    table.attrs.update(method=method, mode=mode, units=units, metric_clean_per_prompt=clean)
    return table


# ============================================================================ gradient baseline
def _gradient_estimates(model, batches, metric, units, positions, batch_size, mode, factor):
    if mode == "scale":
        kinds = ("zero",)
    else:
        kinds = (mode,)
    rows = gradient_rows(model, batches, metric, [unit.slices for unit in units], positions, batch_size, kinds=kinds)
    estimate = rows[kinds[0]]
    if mode == "scale":  # linear in the weight change: (1 - s) times zeroing's
        estimate = estimate * (1.0 - factor)
    return estimate, rows["mass"], rows["metric"]


# ============================================================================ recomputed estimates
def _recomputed_estimates(model, batches, metric, units, positions, batch_size, mode, factor, method, budget,
                          chunks: list[ChunkRun], keep_bytes: int):
    n_prompts = sum(int(b.shape[0]) for b in batches)
    estimate = np.full((len(units), n_prompts), np.nan)
    mass = np.full((len(units), n_prompts), np.nan)
    clean = np.zeros(n_prompts)
    offset = 0
    for batch in batches:
        for chunk in split_batch(batch, batch_size):
            rows = slice(offset, offset + chunk.shape[0])
            chunk_metric = metric.for_prompts(torch.arange(rows.start, rows.stop))
            offset = rows.stop
            clean_pass = _clean_pass_with_gradients(model, chunk, chunk_metric.differentiable())
            clean[rows] = clean_pass.metric.double().cpu().numpy()
            kept = clean_pass.run if keep_bytes >= sum(_run_bytes(c.clean) for c in chunks) + _run_bytes(clean_pass.run) else None
            chunks.append(ChunkRun(rows, chunk, kept))
            read = _read_positions(chunk_metric, chunk.shape[1], positions)
            for i, unit in enumerate(units):
                mass[i, rows] = _unit_mass(clean_pass.weights, unit, read)
            values = _slice_estimates(model, chunk, chunk_metric, clean_pass, units, mode, factor, positions,
                                      method, budget)
            for i, value in values.items():
                estimate[i, rows] = value
    return estimate, mass, clean


def _run_bytes(run: Optional[CleanRun]) -> int:
    """The memory a clean run holds (each storage once: successive states share tensors)."""
    if run is None:
        return 0
    tensors = [t for state in run.states for t in state.sources()] + [run.logits] + list(run.weights.values())
    tensors += [t for entry in run.kv for t in (entry.keys, entry.values)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _read_positions(metric: Metric, n_pos: int, positions: Any) -> list[int]:
    intervened = resolve_positions(positions, n_pos) or list(range(n_pos))
    return sorted(set(metric.read_positions(n_pos)) & set(intervened)) or intervened


def _unit_mass(weights: dict[str, Tensor], unit: SweepUnit, read: list[int]) -> np.ndarray:
    per_router = [weights[spec.name][:, read][:, :, list(sources)].double().sum(-1).mean(-1) for spec, sources in unit.touched]
    return torch.stack(per_router).mean(0).cpu().numpy()


def _clean_pass_with_gradients(
    model: "HookedAttnResTransformer", tokens: Tensor, metric_fn: Callable[..., Tensor]
) -> _Pass:
    """One forward (keeping every router's sources and weights and every sublayer output) and
    one backward (``dM/do_k`` for every ``k``, and the direct-path gradient)."""
    sources: dict[str, Tensor] = {}
    weights: dict[str, Tensor] = {}

    def keep(store: dict, name: str) -> Callable:
        def hook(x: Tensor, hook: Any) -> None:
            store[name] = x

        return hook

    hooks = [("hook_embed", lambda x, hook: x.detach().requires_grad_(True))]
    logits_of: dict[str, Tensor] = {}
    routed: dict[str, Tensor] = {}
    for spec in model.router_specs:
        if spec.name != "final_router":
            hooks.append((f"{spec.name}.hook_out", keep(routed, spec.name)))
        hooks.append((f"{spec.name}.hook_sources", keep(sources, spec.name)))
        hooks.append((f"{spec.name}.hook_logits", keep(logits_of, spec.name)))
        hooks.append((f"{spec.name}.hook_weights", keep(weights, spec.name)))
    outputs: list[Tensor] = []

    def keep_output(x: Tensor, hook: Any) -> None:
        outputs.append(x)

    for layer in range(model.cfg.n_layers):
        hooks += [(f"blocks.{layer}.hook_attn_out", keep_output), (f"blocks.{layer}.hook_mlp_out", keep_output)]
    kv = [KVCacheEntry() for _ in range(model.cfg.n_layers)]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        states = model.states(tokens, kv)
        y = model.final_input(states[-1])
        logits = model.unembed(model.ln_final(y))
        values = metric_fn(logits, tokens)
        direct_wrt = [y] if model.final_router is None else [sources["final_router"]]
        names = list(routed)
        grads = torch.autograd.grad(values.sum(), [routed[n] for n in names] + outputs + direct_wrt, allow_unused=True)
    routed_grads = {n: (torch.zeros_like(routed[n]) if g is None else g.detach()) for n, g in zip(names, grads)}
    grads = grads[len(names):]
    total = [torch.zeros_like(o) if g is None else g.detach() for o, g in zip(outputs, grads)]
    g_direct = grads[-1].detach()
    direct = [g_direct if model.final_router is None else g_direct[:, :, _final_source_of(model, k)]
              for k in range(model.cfg.n_sublayers)]
    detached = {n: t.detach() for n, t in weights.items()}
    run = CleanRun([_detached(state) for state in states], logits.detach(), detached,
                   [KVCacheEntry(e.keys.detach(), e.values.detach()) for e in kv])
    return _Pass({n: t.detach() for n, t in sources.items()}, {n: t.detach() for n, t in logits_of.items()}, detached,
                 {n: t.detach() for n, t in routed.items()}, routed_grads,
                 [o.detach() for o in outputs], total, direct, y.detach(), values.detach(), run)


def _detached(state: DepthState) -> DepthState:
    return DepthState(tuple(t.detach() for t in state.completed), None if state.current is None else state.current.detach())


def _final_source_of(model: "HookedAttnResTransformer", k: int) -> int:
    """Kimi: the index of the final router's source that holds sublayer ``k``'s output (from
    the layout's ``members``)."""
    return model.router_specs[-1].source_of(k)


def _slice_estimates(model, tokens, metric, clean: _Pass, units, mode, factor, positions, method, budget):
    """Every defined unit's per-prompt estimate ``[batch]``; units are stacked along the batch."""
    batch, n_pos = tokens.shape
    budget = budget or default_budget(model, batch * n_pos)
    per_stack = max(1, budget // (batch * n_pos))
    seq = model.sequence_context(n_pos, tokens.device)
    defined = {}
    for i, unit in enumerate(units):
        iv = Intervention(unit.where, mode, value=factor, positions=positions)
        try:
            compile_interventions(model, [iv])
        except MaskAllSourcesError:
            continue
        defined[i] = iv
    return _stack_estimates(model, tokens, metric, clean, units, defined, list(defined), per_stack, seq, method)


def _stack_estimates(model, tokens, metric, clean: _Pass, units, defined, order, per_stack, seq, method):
    """The estimates of the units ``order``, ``per_stack`` at a time."""
    batch = tokens.shape[0]
    out = {}
    for first in range(0, len(order), per_stack):
        stack = order[first:first + per_stack]
        members = [defined[i] for i in stack]
        direct = _DirectPath(model, clean, len(stack), batch)
        stack_units = [units[i] for i in stack]
        direct.active.update(j for j, unit in enumerate(stack_units) if any(sp.name == "final_router" for sp, _ in unit.touched))
        with model.hooks(fwd_hooks=_stack_hooks(model, stack_units, members, batch)):
            linear = _sublayer_deltas(model, clean, stack_units, seq, batch, direct)
            readout = direct.readout_values(model, tokens, metric, clean, len(members))
        if method == "norm_fix":  # linear after the sublayer; the final router's own slices read out exactly
            final_only = [all(spec.name == "final_router" for spec, _ in units[i].touched) for i in stack]
            values = [readout[j] if final_only[j] else linear["total"][j] for j in range(len(stack))]
        else:
            values = [v + linear["indirect"][j] for j, v in enumerate(readout)]
        for j, i in enumerate(stack):
            out[i] = values[j].cpu().numpy()
    return out


class _DirectPath:
    """The stack's final pre-norm inputs, to which each member's ``d_k`` is added along its
    direct path: cumulative ``y`` itself, kimi the final router's sources."""

    def __init__(self, model, clean: _Pass, n: int, batch: int):
        self.batch = batch
        self.kimi = model.final_router is not None
        base = clean.sources["final_router"] if self.kimi else clean.final_input
        self.values = base.repeat(n, *([1] * (base.ndim - 1)))
        self.n = n
        self.active: set[int] = set()  # members whose y' differs from y (the others read out 0)

    def add(self, model, k: int, member: int, d: Tensor) -> None:
        rows = slice(member * self.batch, (member + 1) * self.batch)
        self.active.add(member)
        if self.kimi:
            self.values[rows, :, _final_source_of(model, k)] += d
        else:
            self.values[rows] += d

    def readout_values(self, model, tokens, metric, clean: _Pass, n: int) -> list[Tensor]:
        """``m(head(norm(y'))) - m(head(norm(y)))`` per member (kimi: the final router rerun
        exactly, with the members' own interventions on it)."""
        batch = self.batch
        with torch.no_grad():
            if self.kimi:
                router = model.final_router
                y = router.mix(router.logits(self.values), self.values)
            else:
                y = self.values
            active = sorted(self.active)
            y = y.view(n, batch, *y.shape[1:])[active].reshape(len(active) * batch, *y.shape[1:])
            logits = model.unembed(model.ln_final(y))
            clean_metric = clean.metric.double()
            out = [torch.zeros(batch, dtype=torch.float64) for _ in range(n)]
            for slot, j in enumerate(active):
                out[j] = (metric(logits[slot * batch:(slot + 1) * batch], tokens, None).double() - clean_metric).cpu()
            return out


def _stack_hooks(model, units, interventions, batch: int) -> list:
    """The hooks of a stack: at each router, the members touching it take consecutive slots
    (member order), matching the stacked runs of :func:`_sublayer_deltas`; at the final router
    every member has its own slot (the readout runs the whole stack)."""
    ops = []
    for spec in model.router_specs:
        members = [j for j, unit in enumerate(units) if any(s.name == spec.name for s, _ in unit.touched)]
        for slot, j in enumerate(members):
            offset = (j if spec.name == "final_router" else slot) * batch
            compiled = compile_interventions(model, [interventions[j]], offset=offset, local_batch=batch)
            ops += [op for op in compiled if op.spec.name == spec.name]
    return hooks_from_ops(ops)


def _dots(stacked: Tensor, grad: Tensor) -> Tensor:
    """``[member, batch]``: each member's ``[batch, pos, d_model]`` slice of ``stacked`` dotted with
    ``grad`` over positions and features, per prompt (one batched product, float64 out)."""
    return torch.einsum("mbpd,bpd->mb", stacked, grad).double().cpu()


def _sublayer_deltas(model, clean: _Pass, units, seq, batch, direct: _DirectPath):
    """For every sublayer ``k`` the stack touches, recompute it exactly under each member's
    intervention, add ``d_k = o'_k - o_k`` to ``direct``, and return per member the linear
    terms ``g_k . d_k`` (``total``) and ``(g_k - g^dir_k) . d_k`` (``indirect``), ``[batch]``."""
    n = len(units)
    step_of = {spec.name: spec.step for spec in model.router_specs}
    total = [torch.zeros(batch, dtype=torch.float64) for _ in range(n)]
    indirect = [torch.zeros(batch, dtype=torch.float64) for _ in range(n)]
    routers = sorted({spec.name for unit in units for spec, _ in unit.touched}, key=lambda r: step_of[r])
    for router in routers:
        if router == "final_router":
            continue  # the final router's change is in the readout itself
        k = step_of[router]
        members = [j for j, unit in enumerate(units) if any(spec.name == router for spec, _ in unit.touched)]
        block = model.blocks[k // 2]
        module = model.router(router)
        with torch.no_grad():
            h = module.mix(clean.logits[router].repeat(len(members), 1, 1), clean.sources[router])
            change = h.view(len(members), batch, *h.shape[1:]) - clean.routed[router]
            relative = (change.norm(dim=-1) / clean.routed[router].norm(dim=-1).clamp_min(1e-30)).amax(dim=(1, 2))
            small = [slot for slot in range(len(members)) if relative[slot] < RECOMPUTE_ABOVE]
            big = [slot for slot in range(len(members)) if relative[slot] >= RECOMPUTE_ABOVE]
            if small:  # small changes: first order through the norm is accurate
                terms = _dots(change[small], clean.routed_grads[router])
                for slot, term in zip(small, terms):
                    total[members[slot]] += term
                    indirect[members[slot]] += term
            members = [members[slot] for slot in big]
            if not members:
                continue
            h = change[big].add_(clean.routed[router]).view(len(big) * batch, *h.shape[1:])
            new = block.routed_sublayer(k, h, seq)
            parts = new.view(len(members), batch, *new.shape[1:]).sub_(clean.outputs[k])
            along_total = _dots(parts, clean.total[k])
            along_indirect = _dots(parts, clean.total[k] - clean.direct[k])
        for slot, j in enumerate(members):
            direct.add(model, k, j, parts[slot])
            total[j] += along_total[slot]
            indirect[j] += along_indirect[slot]
    return {"total": total, "indirect": indirect}


__all__ = [
    "ESTIMATE_COLUMNS",
    "ESTIMATE_MODES",
    "KEEP_CLEAN_BYTES",
    "METHODS",
    "ChunkRun",
    "estimate_effects",
    "estimate_keeping_clean_runs",
]
