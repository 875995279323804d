"""The refusals every TransformerLens path shares (issue 24's contract, ``docs/hooks.md``).

A TL tool that assumes something this model does not have (one additive residual stream, a
BOS token, a hook of the other flavour) is refused with an error that names the flavour, why
the assumption fails and the call to use instead. The messages live here once, so that
``run_with_hooks``, ``add_hook``, the cache and the TL 4 bridge say the same thing.
"""

from __future__ import annotations

import re
from typing import Optional


class MissingHookError(KeyError):
    """A hook name that does not exist on this model's flavour (a ``KeyError``, as TL raises,
    printed as its message rather than as a quoted key)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


#: The routing-aware calls that replace TL's residual-stream hooks on kimi models.
KIMI_RESID_WAY_OUT = (
    "Patch the whole depth state with attnres_lens.depth_patching.get_act_patch_depth_state, "
    "decompose a read with cache.decompose_router(name) / cache.decompose_resid(), or read "
    "'{router}.hook_sources' (the sources a router mixes)"
)


def missing_hook_message(name: str, flavour: str, n_layers: Optional[int] = None) -> str:
    """Why ``name`` is not a hook of a ``flavour`` model, and what to use instead."""
    return flavour_refusal(name, flavour, n_layers) or (
        f"{name}: no hook point of that name on this {flavour} AttnRes model; model.hook_dict "
        "lists them (docs/hooks.md has the table)."
    )


def flavour_refusal(name: str, flavour: str, n_layers: Optional[int] = None) -> Optional[str]:
    """The message for a TL hook that this flavour lacks by design (kimi: the residual stream;
    cumulative: the final router; both: a positional embedding), else ``None``."""
    if flavour == "kimi" and ("resid" in name or re.fullmatch(r"blocks\.\d+\.hook_(in|out)", name)):
        return (
            f"{name}: a kimi (Block AttnRes) model has no single residual stream, so no "
            f"hook_resid_* (each sublayer reads its own router's mix of sources). {KIMI_RESID_WAY_OUT}."
        )
    if flavour == "cumulative" and name.startswith("final_router"):
        last = "{n_layers - 1}" if n_layers is None else str(n_layers - 1)
        return (
            f"{name}: a cumulative (AttnRes) model has no final router: ln_final reads the stream "
            f"itself. Use blocks.{last}.hook_resid_post (or ln_final.hook_normalized)."
        )
    if "pos_embed" in name:
        return f"{name}: this {flavour} AttnRes model has no positional embedding (it uses rotary); use hook_embed."
    return None


def missing_hook_error(name: str, flavour: str, n_layers: Optional[int] = None) -> MissingHookError:
    return MissingHookError(missing_hook_message(name, flavour, n_layers))


class HookDict(dict):
    """``mod_dict``/``hook_dict`` of a model: a dict whose missing keys raise
    :class:`MissingHookError` with :func:`missing_hook_message`."""

    def __init__(self, entries: dict, flavour: str, n_layers: int):
        super().__init__(entries)
        self.flavour = flavour
        self.n_layers = n_layers

    def __missing__(self, name: str):
        raise missing_hook_error(str(name), self.flavour, self.n_layers)


def no_bos_message(tokenizer_name: str) -> str:
    """Why ``prepend_bos=True`` is refused for a tokenizer without a BOS token."""
    return (
        f"prepend_bos=True: this model's tokenizer ({tokenizer_name}) has no BOS token (the "
        "bundled byte-level models embed the 256 byte values and nothing else), so there is no "
        "token to prepend. Pass prepend_bos=False (the default), or load the checkpoint with a "
        "tokenizer that defines bos_token."
    )


class PartialStatePatchWarning(UserWarning):
    """An edit of the cumulative stream (``hook_resid_*``) that leaves older stream snapshots,
    which later routers also read, as they were (see :func:`partial_patch_message`)."""


def partial_patch_message(hook_name: str) -> str:
    return (
        f"{hook_name} was edited. In a cumulative AttnRes model the routers also read older "
        "snapshots of the stream (the history sources), which an edit of the stream leaves as "
        "they were: the result is the exact effect of editing the stream x, but TL's invariant "
        "(patching resid_pre at every position restores the clean run) does not hold. To patch "
        "everything the later sublayers read, use "
        "attnres_lens.depth_patching.get_act_patch_depth_state (docs/hooks.md)."
    )
