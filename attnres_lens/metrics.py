"""Metrics on logits: the one next-token loss of the library, and per-prompt loss / KL.

Every loss in the package (the model's ``return_type="loss"``, sweeps, training, the demo and
the protocol) is computed here, so "loss" means one thing everywhere: the mean next-token
cross-entropy in fp32, in nats per predicted token.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


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

    ``per_token`` returns ``[batch, pos - 1]``; otherwise the mean over predicted tokens, counting
    only those whose target is unmasked when ``attention_mask`` is given."""
    nll = next_token_nll(logits, tokens)
    if per_token:
        return nll
    if attention_mask is None:
        return nll.mean()
    mask = attention_mask[:, 1:].to(nll.device, nll.dtype)
    return (nll * mask).sum() / mask.sum().clamp_min(1)


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
