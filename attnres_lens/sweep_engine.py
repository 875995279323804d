"""The exact engines behind :func:`~attnres_lens.patching.sweep_sources` and
:func:`~attnres_lens.patching.get_act_patch_routing` (``by_pos=True``).

Every row of a sweep is one intervened forward. The naive engine runs each in full. The
batched engine reruns only what can change, and stacks several rows in one forward:

- **depth**: a row whose first intervened sublayer is ``k`` starts from the clean
  :class:`~attnres_lens.DepthState` before ``k`` (kept by one clean pass);
- **positions**: a row that intervenes only at positions ``>= p`` changes nothing before ``p``.
  Routers, norms and MLPs act on each position alone (a router reads its own position's
  sources), and attention at positions ``>= p`` reads the earlier positions only through their
  keys and values, which are the clean pass's. So the row runs positions ``p ..`` only
  (:meth:`~attnres_lens.HookedAttnResTransformer.run_from_position`, rotary angles of the true
  positions), and its logits before ``p`` are the clean pass's;
- **stacking**: several rows run in one forward, each on its own copy of the batch (row ``j``
  of a stack owns items ``j*B .. j*B + B - 1``, its interventions compiled onto them). Rows
  are ordered by ``k``; the stack starts at the first row's ``k`` and each later row joins,
  as the clean state repeated along the batch, at its own ``k``, so every sublayer runs once
  per stack. Attention reads the clean keys/values of the shared prefix once per prompt, not
  once per copy (:class:`~attnres_lens.components.SharedPrefixKV`).

A stack's rows may start at different positions (``get_act_patch_routing(by_pos=True)``); it
runs from the smallest, which is exact for the others too, and is only formed where that at
most doubles any row's recomputed length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .components import KVCacheEntry, SharedPrefixKV
from .interventions import Intervention
from .interventions.compile import compile_interventions, hooks_from_ops
from .interventions.providers import ReferenceMemo
from .metrics import Metric
from .model import DepthState, HookedAttnResTransformer
from .selection import select_indices


@dataclass
class CleanRun:
    """One unintervened forward: the state before every sublayer (and after the last), the
    logits, every router's weights (``{router: [batch, pos, source]}``) and every layer's keys
    and values."""

    states: list[DepthState]
    logits: Float[Tensor, "batch pos d_vocab"]
    weights: dict[str, Tensor]
    kv: list[KVCacheEntry]


def clean_pass(model: HookedAttnResTransformer, tokens: Int[Tensor, "batch pos"]) -> CleanRun:
    """The :class:`CleanRun` of ``tokens`` (no padding), in one forward."""
    weights: dict[str, Tensor] = {}

    def capture(name: str) -> Callable:
        def hook(x: Tensor, hook: Any) -> None:
            weights[name] = x.detach()

        return hook

    hooks = [(f"{spec.name}.hook_weights", capture(spec.name)) for spec in model.router_specs]
    kv = [KVCacheEntry() for _ in range(model.cfg.n_layers)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        states = model.states(tokens, kv)
        logits = model.readout(states[-1])
    return CleanRun(states, logits, weights, kv)


@dataclass(frozen=True)
class Rerun:
    """One row of a batched run: its intervention (on the full sequence), the first sublayer it
    touches and the first position it touches (0 when it cannot be cut: see :func:`first_position`)."""

    row: Any
    intervention: Intervention
    start: int
    first_position: int


def first_position(intervention: Intervention, n_pos: int) -> int:
    """The first position ``intervention`` touches in a run of ``n_pos``, or 0 where its value is
    not laid out along those positions (tokens of a reference run, tensors of another length,
    a mean over positions): such a row reruns every position."""
    if intervention.average_positions or not _value_is_cut_at_positions(intervention.value, n_pos):
        return 0
    return min(select_indices("positions", intervention.positions, n_pos, repr(intervention)))


def _value_is_cut_at_positions(value: Any, n_pos: int) -> bool:
    if value is None or isinstance(value, (int, float)):
        return True
    if isinstance(value, Tensor):
        return value.dtype.is_floating_point and value.ndim >= 2 and value.shape[1] == n_pos
    if isinstance(value, Mapping):
        return all(isinstance(t, Tensor) and t.ndim >= 2 and t.shape[1] == n_pos for t in value.values())
    return False


def full_logits(clean: CleanRun, new: Float[Tensor, "batch new_pos d_vocab"]) -> Float[Tensor, "batch pos d_vocab"]:
    """A row's logits: the clean pass's before the positions it reran, ``new`` from there on."""
    first = clean.logits.shape[1] - new.shape[1]
    return new if first == 0 else torch.cat([clean.logits[:, :first].to(new.dtype), new], dim=1)


# ============================================================================ stacks
def default_budget(model: HookedAttnResTransformer, tokens_per_prompt_batch: int) -> int:
    """Tokens per stacked forward: about 1 GiB of activations and logits, and on CPU at most
    4096 (beyond that a stack only adds memory traffic there: measured with
    ``benchmarks/sweep.py``)."""
    cap = 1 << 12 if model.embed.weight.device.type == "cpu" else 1 << 15
    return max(tokens_per_prompt_batch, min(cap, (1 << 30) // activation_bytes_per_token(model)))


def activation_bytes_per_token(model: HookedAttnResTransformer) -> int:
    """What one token of a forward keeps at its widest: logits twice over, the stacked sources
    of the widest router and the sublayer activations (the unit of :func:`default_budget`)."""
    cfg = model.cfg
    max_sources = max(spec.n_sources for spec in model.router_specs)
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    return itemsize * (2 * cfg.d_vocab + cfg.d_model * (max_sources + 8) + 3 * cfg.d_mlp)


def sweep_memory_bytes(model: HookedAttnResTransformer, tokens_per_prompt_batch: int) -> int:
    """A rough upper estimate of what an exact sweep over a batch of
    ``tokens_per_prompt_batch`` tokens holds at once: the weights, the clean pass kept for the
    reruns, and one stack of reruns at :func:`default_budget` tokens."""
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    stack = default_budget(model, tokens_per_prompt_batch)
    return weights + activation_bytes_per_token(model) * (tokens_per_prompt_batch + stack)


def stacks(reruns: Iterable[Rerun], batch: int, n_pos: int, budget: int) -> Iterator[list[Rerun]]:
    """Consecutive reruns grouped into stacks: at most ``budget`` tokens (stacked rows x batch
    x rerun positions; one row always fits), and no row rerunning more than twice its own
    positions (the stack runs from its smallest first position). Give them in order of their
    first sublayer (:func:`run_stack`)."""
    stack: list[Rerun] = []
    for rerun in reruns:
        if stack and _fits(stack + [rerun], batch, n_pos, budget):
            stack.append(rerun)
            continue
        if stack:
            yield stack
        stack = [rerun]
    if stack:
        yield stack


def _fits(stack: list[Rerun], batch: int, n_pos: int, budget: int) -> bool:
    longest = n_pos - min(r.first_position for r in stack)
    shortest = n_pos - max(r.first_position for r in stack)
    return len(stack) * batch * longest <= budget and 2 * shortest >= longest


class ValuesFromPosition:
    """Intervention values cut to positions ``p ..``, memoised per (value, p) so that the
    reference memo (means, resample maps) is shared across the rows of one run."""

    def __init__(self) -> None:
        self._cut: dict[tuple[int, int], Any] = {}
        self._keep: list[Any] = []  # the originals stay alive while their ids are keys

    def __call__(self, value: Any, first: int) -> Any:
        if first == 0 or value is None or isinstance(value, (int, float)):
            return value
        key = (id(value), first)
        if key not in self._cut:
            self._keep.append(value)
            if isinstance(value, Tensor):
                self._cut[key] = value[:, first:]
            else:
                self._cut[key] = {name: t[:, first:] for name, t in value.items()}
        return self._cut[key]

    def intervention(self, iv: Intervention, first: int, n_pos: int) -> Intervention:
        """``iv`` on a run of positions ``first .. n_pos - 1`` (positions renumbered from 0)."""
        if first == 0:
            return iv
        positions = tuple(p - first for p in select_indices("positions", iv.positions, n_pos, repr(iv)))
        return dataclasses.replace(iv, positions=positions, value=self(iv.value, first))


def _expand(state: DepthState, n: int) -> DepthState:
    if n == 1:
        return state
    rep = lambda t: t.repeat(n, *([1] * (t.ndim - 1)))  # noqa: E731
    return DepthState(
        tuple(rep(t) for t in state.completed), None if state.current is None else rep(state.current)
    )


def _append(state: Optional[DepthState], more: DepthState) -> DepthState:
    """``more``'s items after ``state``'s (two states before the same sublayer)."""
    if state is None:
        return more
    completed = tuple(torch.cat([a, b]) for a, b in zip(state.completed, more.completed, strict=True))
    current = None if state.current is None else torch.cat([state.current, more.current])
    return DepthState(completed, current)


def run_stack(
    model: HookedAttnResTransformer,
    clean: CleanRun,
    stack: list[Rerun],
    memo: ReferenceMemo,
    values: ValuesFromPosition,
) -> Float[Tensor, "stacked new_pos d_vocab"]:
    """The logits of a stack's rows (row ``j``: items ``j*B .. j*B + B - 1``) at the positions
    it reran: ``p ..``, ``p`` its smallest first position.

    The rows must come in order of their first sublayer. The stack runs from the first row's
    first sublayer; each later row joins, from the clean state, at its own, so no row reruns
    more sublayers than it needs while every sublayer runs once for all the rows it has."""
    batch, n_pos = clean.logits.shape[:2]
    first = min(r.first_position for r in stack)
    starts = sorted({r.start for r in stack})
    if [r.start for r in stack] != sorted(r.start for r in stack):
        raise ValueError("a stack's rows must come in order of their first sublayer")
    ops = []
    for j, rerun in enumerate(stack):
        iv = values.intervention(rerun.intervention, first, n_pos)
        ops += compile_interventions(model, [iv], offset=j * batch, local_batch=batch, memo=memo)
    state: Optional[DepthState] = None
    with torch.no_grad(), model.hooks(fwd_hooks=hooks_from_ops(ops)):
        for k, stop in zip(starts, starts[1:] + [model.cfg.n_sublayers]):
            joining = sum(r.start == k for r in stack)
            state = _append(state, _expand(clean.states[k].from_position(first), joining))
            state = _run_segment(model, clean, state, k, stop, first)
        return model.readout(state)


def _run_segment(
    model: HookedAttnResTransformer, clean: CleanRun, state: DepthState, start: int, stop: int, first: int
) -> DepthState:
    """Sublayers ``start .. stop - 1`` for positions ``first ..`` of stacked copies of the batch."""
    if first == 0:
        return model.run_from(state, start, stop)
    copies = state.sources()[0].shape[0] // clean.logits.shape[0]
    past = [SharedPrefixKV(e.keys[:, :, :first], e.values[:, :, :first], copies=copies) for e in clean.kv]
    return model.run_from_position(state, start, first, past, stop)


# ============================================================================ the sweep's runners
def run_batched(
    model: HookedAttnResTransformer,
    tokens: Int[Tensor, "batch pos"],
    reruns: list[Rerun],
    metric: Metric,
    clean: CleanRun,
    clean_log_probs: Optional[Tensor],
    budget: int,
    bar: Any,
) -> dict[Any, Tensor]:
    """``{row: metric [batch]}`` of every rerun, by stacks (see the module docstring)."""
    batch, n_pos = tokens.shape
    ordered = sorted(reruns, key=lambda r: (r.start, r.first_position))
    memo, values = ReferenceMemo(), ValuesFromPosition()
    out = {}
    for stack in stacks(ordered, batch, n_pos, budget):
        logits = run_stack(model, clean, stack, memo, values)
        for j, rerun in enumerate(stack):
            row_logits = full_logits(clean, logits[j * batch : (j + 1) * batch])
            out[rerun.row] = metric(row_logits, tokens, clean_log_probs)
        bar.update(len(stack))
    return out


def run_naive(
    model: HookedAttnResTransformer,
    tokens: Int[Tensor, "batch pos"],
    ivs: dict[Any, Intervention],
    metric: Metric,
    clean_log_probs: Optional[Tensor],
    bar: Any,
) -> dict[Any, Tensor]:
    """One full hooked forward per row."""
    memo = ReferenceMemo()
    out = {}
    for i, iv in ivs.items():
        hooks = hooks_from_ops(compile_interventions(model, [iv], memo=memo))
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        out[i] = metric(logits, tokens, clean_log_probs)
        bar.update(1)
    return out


# ============================================================================ TL's patching loop
class BatchedPatchRuns:
    """The ``model`` that ``transformer_lens.patching.generic_activation_patch`` is given by
    :func:`~attnres_lens.patching.get_act_patch_routing`: TL's loop, output and arguments stay
    TL's own, but each patched forward it asks for (one per row of its ``index_df``, in order)
    is answered from the batched engine, which computes the rows stack by stack, as the loop
    reaches them.

    A call that is not the expected row (another hook, other tokens) runs the model itself.
    Every other attribute is the model's; ``original_model`` names it for TL 4's eval-mode check.
    """

    def __init__(
        self,
        model: HookedAttnResTransformer,
        tokens: Int[Tensor, "batch pos"],
        reruns: list[Rerun],
        hook_names: list[str],
        budget: int,
    ):
        self.original_model = model
        self._tokens, self._reruns, self._hook_names, self._budget = tokens, reruns, hook_names, budget
        self._next = 0  # the row the loop asks for next
        self._clean: Optional[CleanRun] = None
        self._stacks: Optional[Iterator[list[Rerun]]] = None
        self._ready: dict[int, Tensor] = {}  # row -> its rerun positions' logits (current stack)
        self._memo, self._values = ReferenceMemo(), ValuesFromPosition()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original_model, name)

    def run_with_hooks(self, tokens: Any, *args: Any, fwd_hooks: Any = (), **kwargs: Any) -> Any:
        if not self._is_next_row(tokens, args, fwd_hooks, kwargs):
            return self.original_model.run_with_hooks(tokens, *args, fwd_hooks=fwd_hooks, **kwargs)
        row = self._next
        self._next += 1
        while row not in self._ready:
            self._compute_next_stack()
        return full_logits(self._clean, self._ready.pop(row))

    def _is_next_row(self, tokens: Any, args: tuple, fwd_hooks: Any, kwargs: dict) -> bool:
        if args or kwargs or tokens is not self._tokens or self._next >= len(self._reruns):
            return False
        hooks = list(fwd_hooks)
        if len(hooks) != 1 or hooks[0][0] != self._hook_names[self._next]:
            return False
        index = getattr(hooks[0][1], "keywords", {}).get("index")
        return index is None or list(index) == list(self._reruns[self._next].row)

    def _compute_next_stack(self) -> None:
        """Run the next stack of rows (in the loop's order) and keep its logits until asked for."""
        model, batch = self.original_model, self._tokens.shape[0]
        if self._clean is None:
            self._clean = clean_pass(model, self._tokens)
            numbered = [dataclasses.replace(r, row=i) for i, r in enumerate(self._reruns)]
            self._stacks = stacks(numbered, batch, self._tokens.shape[1], self._budget)
        stack = next(self._stacks)
        logits = run_stack(model, self._clean, stack, self._memo, self._values)
        for j, rerun in enumerate(stack):
            self._ready[rerun.row] = logits[j * batch : (j + 1) * batch]


__all__ = [
    "BatchedPatchRuns",
    "CleanRun",
    "Rerun",
    "ValuesFromPosition",
    "activation_bytes_per_token",
    "clean_pass",
    "default_budget",
    "first_position",
    "full_logits",
    "run_batched",
    "run_naive",
    "run_stack",
    "stacks",
    "sweep_memory_bytes",
]
