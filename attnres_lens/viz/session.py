"""The explorer's logic, without any widget: state -> interventions -> results.

An :class:`ExplorerSession` holds one prompt, its clean run (the :class:`~attnres_lens.DepthState`
before every sublayer, the clean logits and the clean routing of every router) and a set of
per-slice choices (zero, mask, scale, patch from a second prompt). :meth:`ExplorerSession.result`
turns the choices into :class:`~attnres_lens.interventions.Intervention` values and reruns only
what they can change: from the state before the earliest intervened router to the logits (the
clean prefix is reused; the stepwise forward ``run_from`` makes that exact). Results are cached
per set of choices, so toggling back costs nothing. :meth:`ExplorerSession.code` writes the
Python that reproduces the chosen interventions with the public API.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..interventions import Intervention, Slice, to_hooks
from ..metrics import next_token_loss, next_token_nll
from ..names import TARGETS
from .layout import router_label
from .tokens import display_token, one_prompt

#: What a slice can be set to in the explorer ("none" clears it).
CHOICES: tuple[str, ...] = ("none", "zero", "mask", "scale", "patch")
MetricLike = Union[str, Callable[[Tensor, Tensor], Any]]


@dataclass(frozen=True)
class SliceChoice:
    """What the user ticked for one slice."""

    router: str
    source: int
    mode: str  # zero | mask | scale | patch
    factor: float = 0.0  # scale only
    target: str = "weight"  # patch only


@dataclass(frozen=True)
class Prediction:
    token: str
    token_id: int
    prob: float


@dataclass(frozen=True)
class ExplorerResult:
    """What one set of choices does to the prompt."""

    interventions: tuple[Intervention, ...]
    metric_name: str
    metric_clean: float
    metric_intervened: float
    position: int  # the position whose next-token predictions are listed
    top_clean: list[Prediction]
    top_intervened: list[Prediction]
    loss_clean: np.ndarray  # [pos - 1], next-token loss per position
    loss_intervened: np.ndarray
    routing: dict[str, np.ndarray] = field(repr=False)  # router -> [pos, source] mass, as run
    rerun_from: Optional[int] = None  # first sublayer rerun (n_sublayers: readout only; None: clean)
    seconds: float = 0.0

    @property
    def metric_delta(self) -> float:
        return self.metric_intervened - self.metric_clean


class ExplorerSession:
    """One prompt, its clean run, and the slices the user has chosen to intervene on.

    Args:
        model: a :class:`~attnres_lens.HookedAttnResTransformer`.
        text: the prompt (a string, or integer tokens ``[pos]``/``[1, pos]``).
        patch_text: the second prompt that ``patch`` choices take their values from (same number
            of tokens as ``text``); can be set later with :meth:`set_patch_text`.
        metric: ``"loss"`` (mean next-token loss of the prompt) or a callable
            ``metric(logits [1, pos, vocab], tokens [1, pos]) -> float``.
        top_k: how many next-token predictions to list.
        position: the position whose next-token predictions are listed (negative from the end).
        cache_size: how many results (sets of choices) to keep.
    """

    def __init__(
        self,
        model: Any,
        text: Any,
        *,
        patch_text: Any = None,
        metric: MetricLike = "loss",
        top_k: int = 5,
        position: int = -1,
        cache_size: int = 64,
    ):
        if not (metric == "loss" or callable(metric)):
            raise ValueError(f"metric must be 'loss' or a callable(logits, tokens) -> float, got {metric!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        self.model = model
        self.text = text
        self.tokens = one_prompt(model, text)
        n_pos = int(self.tokens.shape[1])
        if isinstance(position, bool) or not isinstance(position, int) or not -n_pos <= position < n_pos:
            raise ValueError(f"position must be an int in [{-n_pos}, {n_pos}), got {position!r}")
        self.position = position % n_pos
        self.metric = metric
        self.top_k = top_k
        self.specs = {spec.name: spec for spec in model.router_specs}
        self.str_tokens = [display_token(t) for t in model.to_str_tokens(self.tokens[0])]
        self._choices: dict[tuple[str, int], SliceChoice] = {}
        self._results: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self.patch_text: Any = None
        self._patch_cache: Any = None
        self._clean_run()
        if patch_text is not None:
            self.set_patch_text(patch_text)

    # ------------------------------------------------------------------ the clean run
    @torch.no_grad()
    def _clean_run(self) -> None:
        model = self.model
        captured: dict[str, Tensor] = {}
        with model.hooks(fwd_hooks=self._capture_hooks(captured, list(self.specs))):
            states = [model.initial_state(self.tokens)]
            for k in range(model.cfg.n_sublayers):
                states.append(model.step(k, states[-1]))
            logits = model.readout(states[-1])
        self._states = states
        self.clean_logits = logits
        self.clean_routing = {name: t[0].float().cpu().numpy() for name, t in captured.items()}
        self._clean = self._summarise(logits, (), self.clean_routing, None, 0.0)

    @staticmethod
    def _capture_hooks(store: dict, routers: list[str]) -> list[tuple[str, Any]]:
        def capture(tensor: Tensor, hook: Any) -> None:
            store[hook.name.rsplit(".", 1)[0]] = tensor.detach()

        return [(f"{name}.hook_weights", capture) for name in routers]

    # ------------------------------------------------------------------ choices
    @property
    def routers(self) -> list[str]:
        return list(self.specs)

    def router_label(self, router: str) -> str:
        spec = self._spec(router)
        return router_label(spec.layer, spec.sublayer)

    def _spec(self, router: str) -> Any:
        if router not in self.specs:
            raise KeyError(f"no router named {router!r}; routers are {list(self.specs)}")
        return self.specs[router]

    @property
    def choices(self) -> list[SliceChoice]:
        """The current choices in forward order (router step, then source)."""
        return sorted(self._choices.values(), key=lambda c: (self.specs[c.router].step, c.source))

    def choice(self, router: str, source: int) -> Optional[SliceChoice]:
        return self._choices.get((router, source))

    def set_choice(
        self, router: str, source: int, mode: str, *, factor: float = 0.0, target: str = "weight"
    ) -> None:
        """Set slice ``(router, source)`` to ``mode`` (one of :data:`CHOICES`; ``"none"`` clears
        it). ``factor`` is the scale factor, ``target`` what ``patch`` replaces."""
        spec = self._spec(router)
        if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < spec.n_sources:
            raise ValueError(f"source must be an int in [0, {spec.n_sources}) for {router!r}, got {source!r}")
        if mode not in CHOICES:
            raise ValueError(f"unknown choice {mode!r}; valid: {CHOICES}")
        if mode == "none":
            self._choices.pop((router, source), None)
            return
        if mode == "scale" and not np.isfinite(float(factor)):
            raise ValueError(f"the scale factor must be finite, got {factor!r}")
        if target not in TARGETS:
            raise ValueError(f"unknown patch target {target!r}; valid: {TARGETS}")
        if mode == "patch" and self._patch_cache is None:
            raise ValueError("patching needs a second prompt: call set_patch_text(text) first")
        self._choices[(router, source)] = SliceChoice(
            router, source, mode, float(factor) if mode == "scale" else 0.0, target if mode == "patch" else "weight"
        )

    def clear(self, router: str, source: int) -> None:
        self._choices.pop((router, source), None)

    def reset(self) -> None:
        """Forget every choice (the clean run and the second prompt stay)."""
        self._choices.clear()

    @torch.no_grad()
    def set_patch_text(self, patch_text: Any) -> None:
        """The prompt ``patch`` takes its values from; it must have as many tokens as the prompt."""
        tokens = one_prompt(self.model, patch_text)
        if tokens.shape[1] != self.tokens.shape[1]:
            raise ValueError(
                f"the patch prompt has {tokens.shape[1]} tokens and the prompt {self.tokens.shape[1]}; "
                "patching takes each position's value from the same position, so they must match"
            )
        suffixes = (".hook_sources", ".hook_weights", ".hook_out")
        _, cache = self.model.run_with_cache(
            tokens, names_filter=lambda name: name.endswith(suffixes) and name.rsplit(".", 1)[0] in self.specs,
            return_type=None,
        )
        self.patch_text = patch_text
        self.patch_tokens = tokens
        self._patch_cache = cache
        self._results.clear()

    # ------------------------------------------------------------------ interventions
    def interventions(self) -> list[Intervention]:
        """The choices as :class:`Intervention` values (forward order)."""
        out = []
        for c in self.choices:
            where = Slice(c.router, c.source)
            if c.mode == "scale":
                out.append(Intervention(where, "scale", value=c.factor))
            elif c.mode == "patch":
                out.append(Intervention(where, "patch", target=c.target, value=self._patch_cache))
            else:
                out.append(Intervention(where, c.mode))
        return out

    def result(self) -> ExplorerResult:
        """The predictions, metric, loss per token and routing under the current choices."""
        if not self._choices:
            return self._clean
        key = (tuple(self.choices), id(self._patch_cache))
        if key in self._results:
            self._results.move_to_end(key)
            return self._results[key]
        start = time.perf_counter()
        interventions = self.interventions()
        first = min(self.specs[c.router].step for c in self.choices)
        logits, routing = self._rerun(interventions, first)
        result = self._summarise(logits, tuple(interventions), routing, first, time.perf_counter() - start)
        self._results[key] = result
        if len(self._results) > self._cache_size:
            self._results.popitem(last=False)
        return result

    @torch.no_grad()
    def _rerun(self, interventions: list[Intervention], first: int) -> tuple[Tensor, dict[str, np.ndarray]]:
        """Rerun from the clean state before sublayer ``first`` with the interventions hooked;
        the routing of routers before ``first`` is the clean one."""
        model = self.model
        later = [name for name, spec in self.specs.items() if spec.step >= first]
        captured: dict[str, Tensor] = {}
        hooks = to_hooks(model, interventions) + self._capture_hooks(captured, later)
        with model.hooks(fwd_hooks=hooks):
            state = model.run_from(self._states[first], first)
            logits = model.readout(state)
        routing = dict(self.clean_routing)
        routing.update({name: t[0].float().cpu().numpy() for name, t in captured.items()})
        return logits, routing

    def _metric(self, logits: Tensor) -> float:
        if self.metric == "loss":
            return float(next_token_loss(logits, self.tokens))
        return float(self.metric(logits, self.tokens))

    def _top(self, logits: Tensor) -> list[Prediction]:
        probs = torch.softmax(logits[0, self.position].float(), dim=-1)
        values, ids = probs.topk(min(self.top_k, probs.shape[-1]))
        return [
            Prediction(display_token(self.model.to_string([int(i)])), int(i), float(v))
            for v, i in zip(values.tolist(), ids.tolist())
        ]

    def _summarise(
        self, logits: Tensor, interventions: tuple, routing: dict, first: Optional[int], seconds: float
    ) -> ExplorerResult:
        clean = getattr(self, "_clean", None)
        loss = next_token_nll(logits, self.tokens)[0].cpu().numpy()
        metric = self._metric(logits)
        top = self._top(logits)
        return ExplorerResult(
            interventions=interventions,
            metric_name=self.metric if isinstance(self.metric, str) else getattr(self.metric, "__name__", "metric"),
            metric_clean=clean.metric_clean if clean else metric,
            metric_intervened=metric,
            position=self.position,
            top_clean=clean.top_clean if clean else top,
            top_intervened=top,
            loss_clean=clean.loss_clean if clean else loss,
            loss_intervened=loss,
            routing=routing,
            rerun_from=first,
            seconds=seconds,
        )

    # ------------------------------------------------------------------ export
    def code(self, *, include_run: bool = True) -> str:
        """Python that rebuilds the chosen interventions (and, with ``include_run``, reruns
        the prompt with them) given a ``model``: a list of :class:`Intervention` values."""
        lines = ["from attnres_lens.interventions import Intervention, Slice"]
        if include_run:
            lines.insert(0, "import torch")
            lines.append("from attnres_lens.interventions import run_with_interventions")
        lines.append("")
        if include_run:
            lines.append(f"tokens = {self._tokens_code(self.text, self.tokens)}")
        if any(c.mode == "patch" for c in self.choices):
            lines.append(f"patch_tokens = {self._tokens_code(self.patch_text, self.patch_tokens)}")
            lines.append("_, patch_cache = model.run_with_cache(patch_tokens)")
        lines.append("interventions = [")
        for c in self.choices:
            where = f"Slice({c.router!r}, {c.source})"
            if c.mode == "scale":
                lines.append(f"    Intervention({where}, 'scale', value={c.factor!r}),")
            elif c.mode == "patch":
                lines.append(f"    Intervention({where}, 'patch', target={c.target!r}, value=patch_cache),")
            else:
                lines.append(f"    Intervention({where}, {c.mode!r}),")
        lines.append("]")
        if include_run:
            lines.append("with torch.no_grad():")
            lines.append("    logits = run_with_interventions(model, tokens, interventions)")
        return "\n".join(lines) + "\n"

    @staticmethod
    def _tokens_code(text: Any, tokens: Tensor) -> str:
        if isinstance(text, str):
            return f"model.to_tokens({text!r})"
        return f"torch.tensor({tokens.tolist()!r})"
