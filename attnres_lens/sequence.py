"""Positions and attention masks for padded batches and cached generation.

A batch whose rows are right-padded needs nothing: under causal attention a real token never
sees a later pad, and its position is its index. Left padding (or any mask with a hole before
a real token) needs two things, both computed here from the ``[batch, key_pos]`` attention
mask (1 = real token, 0 = pad), as Hugging Face and TransformerLens do:

- positions that count real tokens only (``cumsum(mask) - 1``), so the rotary angle of each
  real token equals its angle in the unpadded run;
- an explicit ``[batch, 1, query_pos, key_pos]`` mask that is causal and hides pad keys. A pad
  query may still attend to itself, so no row is empty (its output is finite and ignored).
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Int
from torch import Tensor


def is_right_padded(mask: Int[Tensor, "batch pos"]) -> bool:
    """Whether every row is ones then zeros (the causal kernel alone is then exact)."""
    mask = mask.to(torch.long)
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def leading_pad_mask(tokens: Int[Tensor, "batch pos"], pad_token_id: int) -> Int[Tensor, "batch pos"]:
    """The attention mask of a left-padded batch: 0 on the run of pad tokens each row starts
    with, 1 from the first other token on (TransformerLens' ``get_attention_mask`` for left
    padding)."""
    return ((tokens != pad_token_id).to(torch.long).cumsum(dim=-1) > 0).to(torch.long)


def positions_from_mask(mask: Int[Tensor, "batch key_pos"], n_query: int) -> Int[Tensor, "batch n_query"]:
    """Rotary positions of the last ``n_query`` columns: the number of real tokens before each
    (pads get position 0)."""
    positions = (mask.to(torch.long).cumsum(dim=-1) - 1).clamp_min(0)
    return positions[:, -n_query:]


def padded_causal_mask(
    mask: Optional[Int[Tensor, "batch key_pos"]], n_query: int, n_key: int, device: torch.device
) -> Tensor:
    """``[batch, 1, n_query, n_key]`` (batch 1 when ``mask`` is None): query ``i`` (the key
    position ``n_key - n_query + i``) sees real keys up to itself, and always itself."""
    offset = n_key - n_query
    query_index = torch.arange(offset, n_key, device=device)[:, None]
    key_index = torch.arange(n_key, device=device)[None, :]
    causal = key_index <= query_index
    if mask is None:
        return causal[None, None]
    real_keys = mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    itself = (key_index == query_index)[None, None]
    return (causal[None, None] & real_keys) | itself
