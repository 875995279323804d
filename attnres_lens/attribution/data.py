"""The attribution functions' inputs: datasets as token batches, minibatches, weight capture."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:  # annotations only
    from ..model import HookedAttnResTransformer


def as_batches(model: "HookedAttnResTransformer", data: Any) -> list[Tensor]:
    """Normalise ``tokens_or_batches`` to a list of ``[batch, pos]`` token tensors.

    Accepts a token tensor, a sequence of token tensors (batches, possibly of different
    lengths), a string or a sequence of strings (each a prompt; prompts of equal token length
    are batched together, so nothing is padded)."""
    if isinstance(data, str):
        data = [data]
    if isinstance(data, Tensor):
        batches = [data]
    elif isinstance(data, (list, tuple)):
        if len(data) == 0:
            raise ValueError("the dataset is empty: pass at least one prompt (token tensor or text)")
        if all(isinstance(item, str) for item in data):
            by_length: dict[int, list[Tensor]] = {}
            for text in data:
                toks = model.to_tokens(text)[0]
                by_length.setdefault(int(toks.shape[0]), []).append(toks)
            batches = [torch.stack(rows) for rows in by_length.values()]
        elif all(isinstance(item, Tensor) for item in data):
            batches = list(data)
        else:
            raise TypeError(
                "tokens_or_batches must be a token tensor, a list of token tensors, a string or a "
                f"list of strings; got a {type(data).__name__} of "
                f"{sorted({type(item).__name__ for item in data})}"
            )
    else:
        raise TypeError(
            "tokens_or_batches must be a token tensor, a list of token tensors, a string or a list "
            f"of strings; got {type(data).__name__}"
        )
    out = []
    for batch in batches:
        if batch.ndim >= 1 and batch.numel() == 0:
            continue
        out.append(model.validate_tokens(batch))
    if not out or sum(int(b.shape[0]) for b in out) == 0:
        raise ValueError("the dataset is empty: it holds no tokens")
    return out


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



__all__ = ["as_batches", "capture_weights_hooks", "split_batch"]
