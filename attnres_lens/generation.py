"""Text generation with TransformerLens' ``generate`` arguments, with or without a KV cache.

With ``use_past_kv_cache=True`` the prompt runs once and each step runs only the new token: a
router mixes sources position by position, so only attention looks at earlier positions, and
its keys/values (after QK-norm and rotary) are what the cache keeps. The tokens are the same as
recomputing the whole prefix each step (``use_past_kv_cache=False``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .components import KVCacheEntry
from .sequence import leading_pad_mask

if TYPE_CHECKING:
    from .model import HookedAttnResTransformer

GENERATE_RETURN_TYPES = ("input", "str", "tokens")


@torch.no_grad()
def generate(
    model: "HookedAttnResTransformer",
    input: Union[str, list[str], Tensor],
    *,
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: Optional[Union[int, list[int]]] = None,
    do_sample: bool = True,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: Optional[bool] = None,
    padding_side: Optional[str] = None,
    return_type: Optional[str] = "input",
    verbose: bool = True,
    seed: Optional[int] = None,
) -> Union[str, list[str], Tensor]:
    """Extend ``input`` by up to ``max_new_tokens`` tokens.

    A list of strings is left-padded (unless ``padding_side`` says otherwise) so every row's
    last real token is at the end; left padding is exact (see ``attnres_lens.sequence``).
    ``stop_at_eos`` stops once every row has produced an end-of-sequence token (``eos_token_id``
    or the tokenizer's; rows that finished are padded with it); without any EOS id it runs
    ``max_new_tokens`` steps. ``seed`` makes sampling reproducible. ``return_type="input"``
    returns what was given (text for text, tokens for tokens).
    """
    _check_arguments(max_new_tokens, top_k, top_p, temperature, return_type)
    as_text = isinstance(input, (str, list))
    if as_text:
        side = padding_side if padding_side is not None else "left"
        tokens, mask = model.to_tokens(input, prepend_bos=prepend_bos, padding_side=side, return_attention_mask=True)
    else:
        tokens = model.validate_tokens(input)
        mask = leading_pad_mask(tokens, model.pad_token_id) if padding_side == "left" else None
    if use_past_kv_cache and tokens.shape[1] + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"prompt ({tokens.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds n_ctx="
            f"{model.cfg.n_ctx}; the KV cache does not slide (use_past_kv_cache=False windows)"
        )
    eos_ids = _eos_ids(model, eos_token_id)
    greedy = not do_sample or temperature == 0
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    kv_cache = [KVCacheEntry() for _ in range(model.cfg.n_layers)] if use_past_kv_cache else None
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for step in tqdm(range(max_new_tokens), disable=not verbose):
        logits = _next_logits(model, tokens, mask, kv_cache, first=step == 0)
        if greedy:
            nxt = logits.argmax(dim=-1)
        else:
            nxt = _sample(logits, tokens, top_k, top_p, temperature, freq_penalty, generator)
        if stop_at_eos and eos_ids:
            nxt = torch.where(finished, torch.full_like(nxt, eos_ids[0]), nxt)
            finished |= torch.isin(nxt, torch.tensor(eos_ids, device=nxt.device))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if stop_at_eos and eos_ids and bool(finished.all()):
            break
    if return_type == "tokens" or (return_type == "input" and not as_text):
        return tokens
    texts = [model.to_string(row if mask is None else row[m.bool()]) for row, m in zip(tokens, _rows(mask, tokens))]
    return texts[0] if isinstance(input, str) or (not as_text and len(texts) == 1) else texts


def _check_arguments(
    max_new_tokens: int, top_k: Optional[int], top_p: Optional[float], temperature: float, return_type: Any
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if return_type not in GENERATE_RETURN_TYPES:
        raise ValueError(f"return_type must be one of {GENERATE_RETURN_TYPES}, got {return_type!r}")


def _eos_ids(model: Any, eos_token_id: Optional[Union[int, list[int]]]) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(model.tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


def _next_logits(
    model: Any, tokens: Tensor, mask: Optional[Tensor], kv_cache: Optional[list[KVCacheEntry]], first: bool
) -> Tensor:
    """Logits of the next token ``[batch, d_vocab]`` (fp32)."""
    if kv_cache is not None:
        new = tokens if first else tokens[:, -1:]
        return model(new, attention_mask=mask, past_kv_cache=kv_cache)[:, -1].float()
    window = tokens[:, -model.cfg.n_ctx :]
    window_mask = None if mask is None else mask[:, -model.cfg.n_ctx :]
    return model(window, attention_mask=window_mask)[:, -1].float()


def _sample(
    logits: Tensor,
    tokens: Tensor,
    top_k: Optional[int],
    top_p: Optional[float],
    temperature: float,
    freq_penalty: float,
    generator: torch.Generator,
) -> Tensor:
    """TransformerLens' ``sample_logits``: frequency penalty, temperature, top-k, top-p."""
    logits = logits / temperature
    if freq_penalty:
        counts = torch.zeros_like(logits).scatter_add_(1, tokens, torch.ones_like(tokens, dtype=logits.dtype))
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative > top_p
        drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
        drop_sorted[..., 0] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(tokens.device)


def _rows(mask: Optional[Tensor], tokens: Tensor) -> list[Tensor]:
    return [None] * tokens.shape[0] if mask is None else list(mask)
