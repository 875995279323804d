"""The attribution functions' inputs: datasets as token batches, minibatches, weight capture."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from torch import Tensor

from ..sequence import prompts_by_length

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer


def as_batches(model: "HookedAttnResTransformer", data: Any, attention_mask: Optional[Tensor] = None) -> list[Tensor]:
    """Normalise ``tokens_or_batches`` to a list of ``[batch, pos]`` token tensors (see
    :func:`prompt_batches`, which also says where each prompt came from)."""
    return prompt_batches(model, data, attention_mask)[0]


def prompt_batches(
    model: "HookedAttnResTransformer", data: Any, attention_mask: Optional[Tensor] = None
) -> tuple[list[Tensor], list[int]]:
    """The batches of ``tokens_or_batches`` and, for each of their prompts in order, its row in the input.

    Accepts a token tensor, a sequence of token tensors (batches, possibly of different
    lengths), a string or a sequence of strings. Strings, and a padded token tensor given with
    its ``attention_mask`` (``[batch, pos]``, 1 = real token), are unpadded and grouped by
    length (:func:`~attnres_lens.sequence.prompts_by_length`), so no batch holds a pad and every
    number equals the prompts run one by one. The rows are ``0, 1, ..`` for token input without
    a mask; :func:`in_input_order` puts per-prompt values back in input order."""
    if isinstance(data, str):
        data = [data]
    strings = isinstance(data, (list, tuple)) and len(data) > 0 and all(isinstance(item, str) for item in data)
    if attention_mask is not None and not (strings or isinstance(data, Tensor)):
        raise TypeError(
            "attention_mask= goes with one padded [batch, pos] token tensor (or a list of strings), got "
            f"a {type(data).__name__}; a list of batches holds no padding"
        )
    if strings or (attention_mask is not None):
        groups = prompts_by_length(model, list(data) if strings else data, attention_mask)
        return [group.tokens for group in groups], [row for group in groups for row in group.rows]
    if isinstance(data, Tensor):
        batches = [data]
    elif isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise ValueError("the dataset is empty: pass at least one prompt (token tensor or text)")
        if not all(isinstance(item, Tensor) for item in data):
            raise TypeError(
                "tokens_or_batches must be a token tensor, a list of token tensors, a string or a "
                f"list of strings; got a {type(data).__name__} of "
                f"{sorted({type(item).__name__ for item in data})}"
            )
        batches = list(data)
    else:
        raise TypeError(
            "tokens_or_batches must be a token tensor, a list of token tensors, a string or a list "
            f"of strings; got {type(data).__name__}"
        )
    out = [model.validate_tokens(batch) for batch in batches if not (batch.ndim >= 1 and batch.numel() == 0)]
    if not out or sum(int(b.shape[0]) for b in out) == 0:
        raise ValueError("the dataset is empty: it holds no tokens")
    return out, list(range(sum(int(b.shape[0]) for b in out)))


def in_input_order(values: np.ndarray, rows: list[int]) -> np.ndarray:
    """Per-prompt ``values`` (prompts on the last axis, in the batches' order) in input order."""
    return values[..., np.argsort(rows, kind="stable")]


def capture_weights_hooks(model: "HookedAttnResTransformer", store: dict) -> list[tuple[str, Callable]]:
    def keep(name: str) -> Callable:
        def hook(tensor: Tensor, hook: Any) -> None:
            store[name] = tensor

        return hook

    return [(spec.id.hook("weights"), keep(spec.name)) for spec in model.router_specs]


def split_batch(batch: Tensor, batch_size: Optional[int]) -> list[Tensor]:
    if batch_size is None or batch_size >= batch.shape[0]:
        return [batch]
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size}")
    return list(batch.split(batch_size))



__all__ = ["as_batches", "capture_weights_hooks", "in_input_order", "prompt_batches", "split_batch"]
