"""Positions and attention masks for padded batches and cached generation.

A batch whose rows are right-padded needs nothing: under causal attention a real token never
sees a later pad, and its position is its index. Left padding (or any mask with a hole before
a real token) needs two things, both computed here from the ``[batch, key_pos]`` attention
mask (1 = real token, 0 = pad), as Hugging Face and TransformerLens do:

- positions that count real tokens only (``cumsum(mask) - 1``), so the rotary angle of each
  real token equals its angle in the unpadded run;
- an explicit ``[batch, 1, query_pos, key_pos]`` mask that is causal and hides pad keys. A pad
  query may still attend to itself, so no row is empty (its output is finite and ignored).

The analysis functions (sweeps, ``mass_vs_effect``, routing statistics, gradients, the
estimators) never see a pad: :func:`prompts_by_length` unpads a padded batch with its mask
(or a list of strings) into groups of prompts of one length, each an unpadded batch, so every
per-position reduction covers real tokens only and equals the prompts run one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

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


def check_attention_mask(mask: Any, shape: tuple[int, int]) -> Int[Tensor, "batch pos"]:
    """``mask`` as a ``[batch, pos]`` long tensor of 0/1, checked for the analysis functions:
    the shape of the tokens, values 0 or 1 only, at least one real token per row, and the real
    tokens of each row contiguous (right or left padding; a hole between real tokens is refused,
    since the prompt would then not be one sequence). ``TypeError``/``ValueError`` otherwise."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor [batch, pos] of 0/1, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must have the tokens' shape {tuple(shape)} ([batch, pos]), got {tuple(mask.shape)}")
    bad = mask[(mask != 0) & (mask != 1)]
    if bad.numel():
        raise ValueError(f"attention_mask must hold only 0 (pad) and 1 (real token), got the value {bad[0].item()!r}")
    mask = mask.to(torch.long)
    n_real = mask.sum(dim=-1)
    if bool((n_real == 0).any()):
        row = int((n_real == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} is all 0: every prompt needs at least one real token (1)")
    starts = (mask.diff(dim=-1, prepend=torch.zeros_like(mask[:, :1])) == 1).sum(dim=-1)
    if bool((starts > 1).any()):
        row = int((starts > 1).nonzero()[0])
        raise ValueError(
            f"attention_mask row {row} is {mask[row].tolist()}: its real tokens (1) must be contiguous "
            "(right padding 1..1 0..0 or left padding 0..0 1..1), a pad between real tokens is not supported"
        )
    return mask


@dataclass(frozen=True)
class LengthGroup:
    """Prompts of one length, unpadded: ``tokens[i]`` is prompt ``rows[i]`` of the input."""

    rows: tuple[int, ...]
    tokens: Tensor


def prompts_by_length(model: Any, prompts: Any, attention_mask: Optional[Tensor] = None) -> list[LengthGroup]:
    """The prompts of ``prompts`` (a string, a list of strings, or ``[batch, pos]`` tokens),
    unpadded with ``attention_mask`` (1 = real token; strings derive it with ``model.to_tokens``)
    and grouped by length, in order of first appearance. Without a mask, token input is one
    group (no padding). ``model`` is the model (its ``to_tokens``/``validate_tokens``)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, list) and prompts and all(isinstance(p, str) for p in prompts):
        prompts, derived = model.to_tokens(prompts, return_attention_mask=True)
        attention_mask = derived if attention_mask is None else attention_mask
    tokens = model.validate_tokens(prompts)
    if attention_mask is None:
        return [LengthGroup(tuple(range(tokens.shape[0])), tokens)]
    mask = check_attention_mask(attention_mask, tuple(tokens.shape)).to(tokens.device)
    by_length: dict[int, list[int]] = {}
    for row, n_real in enumerate(mask.sum(dim=-1).tolist()):
        by_length.setdefault(int(n_real), []).append(row)
    return [LengthGroup(tuple(rows), torch.stack([tokens[r][mask[r] == 1] for r in rows])) for rows in by_length.values()]

