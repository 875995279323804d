"""Depth-state patching: the AttnRes analogue of TransformerLens' residual-stream patching.

In a vanilla transformer, "the residual before layer l at position p" is everything later
layers can read from that position, so ``get_act_patch_resid_pre`` patches all of it. A routed
model carries more than one tensor between sublayers: the :class:`~attnres_lens.DepthState`
(kimi: the embedding, block summaries and the partial sum; cumulative: the embedding, stream
snapshots and the stream). :func:`get_act_patch_depth_state` patches the whole state before a
sublayer: every source the next router reads, snapshots that alias the stream included, so both
flavours get TL's "patch the residual here" meaning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .compat import ActivationCache
from .model import DepthState, HookedAttnResTransformer


def clean_states(model: HookedAttnResTransformer, clean_cache: ActivationCache) -> list[DepthState]:
    """The state before every sublayer ``k`` (and, last, before the readout), rebuilt from the
    cached ``hook_sources`` of the router that reads it: a router at step ``k`` reads exactly
    the state's sources, the last one being the in-progress source."""
    states = []
    for spec in model.router_specs:
        key = f"{spec.name}.hook_sources"
        if key not in clean_cache.cache_dict:
            raise KeyError(f"clean_cache must hold {key!r} (cache the routers' hook_sources)")
        sources = clean_cache[key].unbind(dim=2)
        states.append(DepthState(tuple(sources[:-1]), sources[-1]))
    if model.final_router is None:  # cumulative: the readout reads the stream after the last MLP
        last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        states.append(DepthState((), clean_cache[last]))
    return states


def _corrupted_states(model: HookedAttnResTransformer, tokens: Tensor) -> list[DepthState]:
    state = model.initial_state(tokens)
    states = [state]
    for k in range(model.cfg.n_sublayers):
        state = model.step(k, state)
        states.append(state)
    if model.final_router is None:  # the readout reads the stream alone
        states[-1] = DepthState((), state.current)
    return states


def _with_position(corrupt: DepthState, clean: DepthState, pos: int) -> DepthState:
    """``corrupt`` with every source's position ``pos`` taken from ``clean``."""

    def mix(c: Tensor, cl: Tensor) -> Tensor:
        out = c.clone()
        out[:, pos] = cl[:, pos].to(out.device, out.dtype)
        return out

    if len(corrupt.completed) != len(clean.completed) or (corrupt.current is None) != (clean.current is None):
        raise ValueError("clean and corrupted states hold different sources; run both with the same model")
    current = None if corrupt.current is None else mix(corrupt.current, clean.current)
    return DepthState(tuple(mix(c, cl) for c, cl in zip(corrupt.completed, clean.completed)), current)


def _finish(model: HookedAttnResTransformer, state: DepthState, k: int) -> Tensor:
    """Logits from the state before sublayer ``k`` (``k = n_sublayers``: before the readout)."""
    if k < model.cfg.n_sublayers:
        state = model.run_from(state, k)
    return model.readout(state)


@torch.no_grad()
def get_act_patch_depth_state(
    model: HookedAttnResTransformer,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache: ActivationCache,
    patching_metric: Callable[[Tensor], Tensor],
    by_pos: bool = True,
    verbose: bool = False,
) -> Float[Tensor, "..."]:
    """Patch the whole depth state before each sublayer from the clean run into the corrupted
    run, and evaluate ``patching_metric(logits)`` (TL's patching signature).

    Rows ``k = 0 .. 2 * n_layers - 1`` are the states before ``attn_{k//2}`` / ``mlp_{k//2}``
    (``model.router_specs[k]``); the last row is the state before the readout (the kimi final
    router's sources, or the cumulative stream). Returns ``[n_sublayers + 1, pos]`` with
    ``by_pos`` (one position of every source at a time), else ``[n_sublayers + 1]`` (all
    positions: each row then reproduces the clean metric, a sanity check).
    ``clean_cache`` must hold every router's ``hook_sources`` (``run_with_cache`` keeps them).
    """
    tokens = model.validate_tokens(corrupted_tokens)
    clean = clean_states(model, clean_cache)
    if clean[0].sources()[0].shape[:2] != tokens.shape:
        raise ValueError(
            f"corrupted_tokens {tuple(tokens.shape)} and the clean cache "
            f"{tuple(clean[0].sources()[0].shape[:2])} must have the same [batch, pos]"
        )
    corrupt = _corrupted_states(model, tokens)
    n_rows, n_pos = len(clean), tokens.shape[1]
    if not by_pos:
        return torch.stack([patching_metric(_finish(model, clean[k], k)).float().reshape(()) for k in range(n_rows)])
    results = torch.zeros(n_rows, n_pos)
    for k in tqdm(range(n_rows), disable=not verbose):
        for pos in range(n_pos):
            logits = _finish(model, _with_position(corrupt[k], clean[k], pos), k)
            results[k, pos] = patching_metric(logits).float().item()
    return results
