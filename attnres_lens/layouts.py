"""The public AttnRes checkpoint layouts, by name: which load, and what the others compute.

Every Block AttnRes codebase we read (``docs/checkpoints.md``, "Public layouts") saves more
settings than this library computes. A setting it does not compute is refused by name, saying
what that setting computes, so that a researcher holding such a checkpoint learns why (and
never gets a different model than the one they trained). The facts come from reading:

- DELTA: wdlctc/delta-attention-residuals-code@fc11c3e, ``Attention-Residuals/modeling_qwen3_attnres.py``;
- OPEN: wdlctc/open-attention-residuals@83d2b8d, same path (and ``modeling_attnres.py``, the cumulative layout);
- MHAR: Zimmer061310/multi-head-attention-residuals-test-stuff@49410f1,
  ``src/attention_residuals/modeling_qwen3_attnres.py``;
- NANO: YpLarryWang/nanoGPT@78b6df6 ``eval/hf_nanogpt/modeling_nanogpt.py`` (the BabyLM set).

This module only states facts; :mod:`attnres_lens.loading` raises the refusals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

#: ``attnres_mode`` values that name a mode the library computes under another name: DELTA's
#: ``train_scratch.py`` accepts ``delta_centered_reset``, which has no branch of its own in the
#: modeling file, so it runs the ``full`` branch and gets the final router (DELTA 1001-1007).
MODE_ALIASES = {"delta_centered_reset": "full"}

_ADDITIVE = "an additive residual plus a routed correction, not a softmax over depth sources that replaces the residual"
_V_STREAM = "with a second router (v_res_proj, v_res_norm) whose output feeds only the attention's values"

#: ``attnres_mode`` -> what it computes (DELTA unless said otherwise).
REFUSED_MODES: dict[str, str] = {
    "delta": f"DELTA's delta mode: h = x + softmax-weighted sum of the earlier sublayer outputs; {_ADDITIVE}",
    "delta_v": f"DELTA's delta mode {_V_STREAM}; {_ADDITIVE}",
    "delta_block": f"DELTA's delta mode over block-aggregated outputs (h = x + routed sum); {_ADDITIVE}",
    "delta_block_v": f"DELTA's delta_block mode {_V_STREAM}; {_ADDITIVE}",
    "full_additive": f"DELTA's full_additive mode: h = x + softmax-weighted sum of the cumulative states; {_ADDITIVE}",
    "pre_gated": "DELTA's pre_gated mode: the delta mode with an input-dependent sigmoid gate "
    "(attn_pre_gate, mlp_pre_gate) multiplying every source before the softmax; " + _ADDITIVE,
    "first_layer": "DELTA's first_layer mode: from layer 1 on, a two-source router over "
    "[stream, mlp output of layer 0] beside a plain residual stream (layer 0 reads the stream as is)",
    "full_v": f"DELTA's full_v mode: cumulative-state sources {_V_STREAM}; the library routes one input per sublayer",
    "block_v": f"DELTA's block_v mode: kimi block sources {_V_STREAM}; the library routes one input per sublayer",
    "delta_replace": "DELTA's delta_replace mode: a softmax over [earlier sublayer outputs ..., the "
    "cumulative stream] replaces each sublayer's input while the head reads the stream; a source "
    "program this library has no RoutingScheme for",
    "full_mh": "MHAR's per-head routing (multi-head-attention-residuals@bb6172c, "
    "_mh_block_attn_res_kernel): each router's [1, d_model] query, the final router's too, is read "
    "as attnres_num_heads queries of d_model / heads channels; the key RMSNorm runs over the whole "
    "d_model, then each head takes a softmax over delta full's sources on its own channel slice and "
    "mixes only that slice; per-head routing weights [batch, pos, head, source] are not supported yet",
    "full_hw": "MHAR's head-wise routing (multi-head-attention-residuals@bb6172c, "
    "_hw_block_attn_res_kernel): a [num_key_value_heads, d_model] query per attention router, each "
    "group scoring and mixing the full d_model, and the attention (Qwen3HeadwiseAttention) projects "
    "each key/value group's queries, keys and values from its own routed input [batch, pos, group, "
    "d_model]; its MLP and final routers are full_mh's. A sublayer with one input per group is not "
    "Qwen3's attention; not supported",
}
#: Names DELTA's ``train_scratch.py`` accepts (its line 37) with no branch in the modeling file:
#: they fall through to the full branch but get no final router (DELTA 1001-1007), so the head
#: reads the last MLP output alone. That is what such a checkpoint computes, and no layout here.
for _name in ("delta_sublayer", "delta_centered", "delta_centered_block", "delta_avg_block", "delta_replace_block"):
    REFUSED_MODES[_name] = (
        f"a DELTA training-script name with no branch in its modeling file: it runs DELTA's full "
        "branch without a final router, so the head reads the last MLP output alone"
    )

#: ``attnres_gate_type`` -> what it computes (DELTA 399-417 and 450-465; OPEN the same).
REFUSED_GATES: dict[str, str] = {
    "sigmoid_scalar": "h = (1 - sigmoid(g)) * partial + sigmoid(g) * routed, with one learned scalar "
    "g per router ({attn,mlp}_res_gate_logit): the router's read is mixed with the current partial "
    "by a gate outside the softmax",
    "sigmoid_vector": "h = (1 - s) * partial + s * routed with an input-dependent per-channel gate "
    "s = sigmoid(W partial + b) ({attn,mlp}_res_gate_proj): a gate outside the softmax",
    "learnable_alpha": "h = (1 - a) * partial + a * routed with an unconstrained learned scalar a "
    "({attn,mlp}_res_alpha): not a convex mix, a gate outside the softmax",
}


@dataclass(frozen=True)
class Refusal:
    """A checkpoint setting the library does not compute, and what it computes."""

    setting: str  # e.g. "attnres_mode 'delta'"
    what: str

    def message(self, supported: str) -> str:
        return f"{self.setting} is not supported; {supported}. It is {self.what}"


def mode_refusal(mode: Any) -> Optional[Refusal]:
    """The refusal of an ``attnres_mode`` the library does not compute (``None``: it does)."""
    if mode in ("block", "full") or mode in MODE_ALIASES:
        return None
    what = REFUSED_MODES.get(mode, "a mode none of the public codebases we read defines")
    return Refusal(f"attnres_mode {mode!r}", what)


def gate_refusal(gate: Any) -> Optional[Refusal]:
    if gate == "bias":
        return None
    what = REFUSED_GATES.get(gate, "a gate type none of the public codebases we read defines")
    return Refusal(f"attnres_gate_type {gate!r}", what)


def null_source_refusal(hf: dict[str, Any]) -> Optional[Refusal]:
    """DELTA/OPEN's ``attnres_use_null_source`` adds ``{attn,mlp}_null_source`` [d_model] per layer,
    a learned source prepended to the delta modes' sources (DELTA 419-424)."""
    if not hf.get("attnres_use_null_source"):
        return None
    return Refusal(
        "attnres_use_null_source=True",
        "a learned extra source per router ({attn,mlp}_null_source [d_model]) that the delta-type "
        "modes prepend to their sources; its keys have no place in the block and full layouts",
    )


def foreign_model_refusal(hf: dict[str, Any]) -> Optional[Refusal]:
    """Public AttnRes checkpoints whose ``model_type`` is not Qwen3's."""
    if hf.get("model_type") == "nanogpt":
        # the static control sets use_attn_res too (its training flags pass both), so it is asked first
        kind = "the static-routing control" if hf.get("use_static_attn_res") else (
            "Block AttnRes" if hf.get("use_attn_res") else "a plain residual baseline"
        )
        return Refusal(
            "model_type 'nanogpt'",
            f"the BabyLM nanoGPT layout (NanoGPTForCausalLM, GPT-2-style transformer.h.{{l}} keys; "
            f"this one is {kind}): its backbone is nanoGPT's, not Qwen3's, and has no component set here yet",
        )
    return None


#: The key that tells open-attention-residuals' block mode (kimi-style blocks with recency
#: biases) from the others: its final router's bias (OPEN 816-820).
OPEN_FINAL_BIAS = "model.final_res_bias"

#: (flavour, routing mode) -> the public layout a loaded model is in, as ``inspect`` names it.
LOADED_LAYOUTS: dict[tuple[str, str], str] = {
    ("kimi", "block"): "kimi block: delta-attention-residuals attnres_mode 'block' (Kimi-faithful blocks, final router)",
    ("kimi", "full"): "kimi full: delta-attention-residuals attnres_mode 'full' (every sublayer output a source, final router)",
    ("kimi", "open_block"): "kimi block with recency biases: open-attention-residuals Attention-Residuals/modeling_qwen3_attnres.py attnres_mode 'block' (block 0 includes the embedding, biased final router)",
    ("cumulative", "full"): "cumulative full: open-attention-residuals attnres_mode 'full' (a stream snapshot per sublayer, recency biases)",
    ("cumulative", "block"): "cumulative block: open-attention-residuals modeling_attnres.py attnres_mode 'block' (stream snapshots at block ends, recency biases)",
}


def layout_name(flavour: str, routing_mode: str) -> str:
    """The public layout of a model of this flavour and routing mode."""
    return LOADED_LAYOUTS[(flavour, routing_mode)]
