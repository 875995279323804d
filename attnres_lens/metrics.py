"""Metrics on logits: the one next-token loss of the library, per-prompt loss / KL / logit
difference, and the one metric resolver (:class:`Metric`) that sweeps and attribution share.

Every loss in the package (the model's ``return_type="loss"``, sweeps, training, the demo and
the protocol) is computed here, so "loss" means one thing everywhere: the mean next-token
cross-entropy in fp32, in nats per predicted token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import numpy as np
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from .selection import resolve_positions


def next_token_nll(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos_minus_1"]:
    """Negative log-likelihood of each next token, in fp32 (position ``i`` predicts ``i + 1``)."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
    per_token: bool = False,
) -> Tensor:
    """Next-token cross-entropy, as TransformerLens' ``lm_cross_entropy_loss``.

    ``per_token`` returns ``[batch, pos - 1]``; otherwise the mean over predicted tokens. With
    ``attention_mask`` only targets whose mask is 1 count: the mean leaves the others out and,
    as in TransformerLens, ``per_token`` holds 0 at them (a pad target has no loss)."""
    nll = next_token_nll(logits, tokens)
    if attention_mask is None:
        return nll if per_token else nll.mean()
    mask = attention_mask[:, 1:].to(nll.device, nll.dtype)
    if per_token:
        return nll.masked_fill(mask == 0, 0.0)
    return nll.masked_fill(mask == 0, 0.0).sum() / mask.sum().clamp_min(1)


def per_prompt_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, " batch"]:
    """Mean next-token cross-entropy of each prompt."""
    return next_token_nll(logits, tokens).mean(dim=-1)


def per_prompt_kl(
    logits: Float[Tensor, "batch pos d_vocab"], clean_log_probs: Float[Tensor, "batch pos d_vocab"]
) -> Float[Tensor, " batch"]:
    """``KL(clean || ablated)`` of the next-token distributions, averaged over positions."""
    log_q = F.log_softmax(logits.float(), dim=-1)
    kl = (clean_log_probs.exp() * (clean_log_probs - log_q)).sum(dim=-1)
    return kl.mean(dim=-1)


class LogitDiff:
    """Metric ``logits[b, position, correct[b]] - logits[b, position, incorrect[b]]`` per prompt.

    ``correct``/``incorrect`` are token ids: an int for every prompt or one per prompt. With
    ``sweep_sources(batch_size=...)`` the sweep calls :meth:`subset` for each minibatch.
    """

    def __init__(self, correct: Any, incorrect: Any, position: int = -1):
        self.correct = torch.as_tensor(correct, dtype=torch.long).reshape(-1)
        self.incorrect = torch.as_tensor(incorrect, dtype=torch.long).reshape(-1)
        if isinstance(position, bool) or not isinstance(position, int):
            raise TypeError(f"position must be an int, got {position!r}")
        self.position = position

    @property
    def positions(self) -> tuple[int, ...]:
        """The logit positions the metric reads (used for the routing mass)."""
        return (self.position,)

    def subset(self, index: Int[Tensor, " n"]) -> "LogitDiff":
        """The metric for the prompts ``index`` of the batch."""

        def pick(ids: Tensor) -> Tensor:
            return ids if ids.numel() == 1 else ids[index.to(ids.device)]

        return LogitDiff(pick(self.correct), pick(self.incorrect), self.position)

    def __call__(
        self, logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, " batch"]:
        batch = logits.shape[0]
        read = logits[:, self.position].float()
        rows = torch.arange(batch, device=logits.device)

        def ids(t: Tensor, name: str) -> Tensor:
            if t.numel() not in (1, batch):
                raise ValueError(f"{name} has {t.numel()} token ids for a batch of {batch}")
            return t.to(logits.device).expand(batch) if t.numel() == 1 else t.to(logits.device)

        return read[rows, ids(self.correct, "correct")] - read[rows, ids(self.incorrect, "incorrect")]


def logit_diff_metric(correct: Any, incorrect: Any, position: int = -1) -> LogitDiff:
    """A per-prompt logit-difference metric for ``sweep_sources`` (see :class:`LogitDiff`)."""
    return LogitDiff(correct, incorrect, position)


#: The metrics named by a string.
METRICS: tuple[str, ...] = ("loss", "kl")


@dataclass
class Metric:
    """A per-prompt metric, resolved once from what the user passed (:meth:`resolve`).

    ``fn`` is ``"loss"``, ``"kl"`` or a callable ``(logits, tokens) -> [batch]``; a callable may
    carry ``positions`` (the logit positions it reads) and ``subset(index)`` (its restriction
    to some prompts).
    """

    name: str
    fn: Any

    @classmethod
    def resolve(cls, metric: Any) -> "Metric":
        if isinstance(metric, Metric):
            return metric
        if isinstance(metric, str):
            if metric not in METRICS:
                raise ValueError(
                    f"unknown metric {metric!r}; valid: {METRICS}, logit_diff_metric(...) or a "
                    "callable (logits, tokens) -> [batch] tensor"
                )
            return cls(metric, metric)
        if not callable(metric):
            raise TypeError(f"metric must be 'loss', 'kl' or a callable, got {metric!r}")
        return cls(getattr(metric, "__name__", type(metric).__name__), metric)

    def for_prompts(self, index: Int[Tensor, " n"]) -> "Metric":
        """The metric restricted to the prompts ``index`` (metrics with per-prompt data carry ``subset``)."""
        if callable(self.fn) and hasattr(self.fn, "subset"):
            return Metric(self.name, self.fn.subset(index))
        return self

    def read_positions(self, n_pos: int) -> list[int]:
        """The logit positions the metric reads in sequences of ``n_pos``."""
        if self.fn == "loss":
            return list(range(n_pos - 1))
        positions = None if self.fn == "kl" else getattr(self.fn, "positions", None)
        return resolve_positions(positions, n_pos, "metric") or list(range(n_pos))

    def differentiable(self) -> Optional[Callable[..., Tensor]]:
        """The per-prompt function ``(logits, tokens) -> [batch]`` to differentiate, or ``None``
        when a first-order estimate is meaningless: ``"kl"`` from the clean distribution has value
        and gradient 0 at the clean run, so every first-order estimate of it is exactly 0."""
        if self.fn == "kl":
            return None
        return per_prompt_loss if self.fn == "loss" else self.fn

    def __call__(
        self,
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "batch pos"],
        clean_log_probs: Optional[Float[Tensor, "batch pos d_vocab"]] = None,
    ) -> Float[Tensor, " batch"]:
        """The metric of every prompt, detached, in fp32 (``clean_log_probs``: for ``"kl"``)."""
        if self.fn == "loss":
            return per_prompt_loss(logits, tokens)
        if self.fn == "kl":
            return per_prompt_kl(logits, clean_log_probs)
        out = torch.as_tensor(self.fn(logits, tokens))
        if out.ndim != 1 or out.shape[0] != logits.shape[0]:
            raise ValueError(
                f"metric {self.name!r} must return a [batch] tensor of length {logits.shape[0]} "
                f"(one value per prompt), got shape {tuple(out.shape)}"
            )
        return out.detach().float()


def non_finite_prompts(values: Any) -> list[int]:
    """Indices of the prompts whose metric value is NaN or infinite (empty when all are finite)."""
    values = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=float)
    return np.flatnonzero(~np.isfinite(values)).tolist()
