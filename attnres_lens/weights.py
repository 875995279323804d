"""TransformerLens' weight surface and weight processing for the hooked model.

:class:`TLWeights` is mixed into :class:`~attnres_lens.HookedAttnResTransformer`. Per block,
``blocks[l].attn.W_Q``/``W_K``/``W_V``/``W_O`` and ``blocks[l].mlp.W_in``/``W_gate``/``W_out``
are views on the checkpoint-named parameters (see :mod:`attnres_lens.components`); the
model-level ``W_Q``... stack them over layers (a copy, as in TransformerLens).

``process_weights_(fold_ln=True)`` folds every RMSNorm gain that a linear map reads directly:
``ln_final`` into ``W_U``, ``ln1`` into ``W_Q``/``W_K``/``W_V`` and ``ln2`` into
``W_in``/``W_gate``; the gains become 1. The model computes the same function (within float
rounding). The routers' key norms, and QK-norm's per-head norms, keep their gains: a router's
key norm gain is part of its logit, not of a linear map that follows, and QK-norm normalises
after the projection. ``center_unembed`` is applied (it moves every logit of a position by one constant);
``center_writing_weights`` is refused: centring the residual writes is exact only when every
reader subtracts the mean, which RMSNorm does not.
"""

from __future__ import annotations

from typing import Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .compat import FactoredMatrix

CENTRING_REFUSAL = (
    "is not exact for this model: centring the residual writes/unembedding relies on a "
    "LayerNorm that subtracts the mean, and Qwen3 uses RMSNorm (TransformerLens itself skips "
    "centring for RMSNorm models). Pass {name}=False."
)


class TLWeights:
    """TransformerLens' model-level weight properties and ``process_weights_``."""

    # ---------------------------------------------------------------------- embed / unembed
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding, a view on ``unembed.weight`` (``lm_head.weight``)."""
        return self.unembed.weight.T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """Zero: Qwen3's head has no bias."""
        weight = self.unembed.weight
        return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)

    # ---------------------------------------------------------------------- stacked over layers
    def _stack(self, part: str, name: str) -> Tensor:
        return torch.stack([getattr(getattr(block, part), name) for block in self.blocks], dim=0)

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("attn", "W_Q")

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("attn", "W_K")

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack("attn", "W_V")

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack("attn", "W_O")

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("attn", "b_Q")

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("attn", "b_K")

    @property
    def b_V(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack("attn", "b_V")

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack("attn", "b_O")

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack("mlp", "W_in")

    @property
    def W_gate(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack("mlp", "W_gate")

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stack("mlp", "W_out")

    @property
    def b_in(self) -> Float[Tensor, "n_layers d_mlp"]:
        return self._stack("mlp", "b_in")

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack("mlp", "b_out")

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q @ W_K^T`` per layer and head, ``[n_layers, n_heads, d_model, d_model]``
        factored. QK-norm and rotary act between the projections and the scores, so this is
        the bilinear form *before* the per-head norm, as TransformerLens' ``QK`` is for its
        QK-normed models."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V @ W_O`` per layer and head, ``[n_layers, n_heads, d_model, d_model]`` factored:
        exact (no norm acts between them)."""
        return FactoredMatrix(self.W_V, self.W_O)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """Zero: no sublayer of Qwen3 writes a bias (TL's signature, for its cache methods)."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= self.cfg.n_layers:
            raise ValueError(f"layer must be an int in [0, {self.cfg.n_layers}], got {layer!r}")
        if mlp_input and layer == self.cfg.n_layers:
            raise ValueError("mlp_input=True needs layer < n_layers")
        weight = self.embed.weight
        return torch.zeros(self.cfg.d_model, dtype=weight.dtype, device=weight.device)

    # ---------------------------------------------------------------------- tokens -> directions
    def tokens_to_residual_directions(
        self, tokens: Union[str, int, Int[Tensor, ""], Int[Tensor, " pos"], Int[Tensor, "batch pos"]]
    ) -> Tensor:
        """The unembedding column of each token (``W_U[:, token]``), as TransformerLens. Without
        ``fold_ln`` this ignores the ``ln_final`` gain (TL's warning applies); the cache's
        ``logit_attrs`` applies that gain itself."""
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens].movedim(0, -1)
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        elif isinstance(tokens, Tensor):
            tokens = int(tokens.item())
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 <= tokens < self.cfg.d_vocab:
            raise ValueError(f"token must be an int in [0, {self.cfg.d_vocab}), got {tokens!r}")
        return self.W_U[:, tokens]

    def all_head_labels(self) -> list[str]:
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    # ---------------------------------------------------------------------- processing
    def process_weights_(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
        refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """TransformerLens' weight processing, where it is exact for this architecture.

        - ``fold_ln`` folds the RMSNorm gains read by linear maps (see the module docstring);
          the logits stay the same within float rounding, and ``cache.apply_ln_to_stack(...) @
          W_U`` is then exact direct logit attribution (TL's frozen-scale sense).
        - ``center_unembed`` subtracts from ``W_U`` its mean over the vocabulary, as TL: every
          logit of a position moves by the same constant, so probabilities and logit
          differences are unchanged.
        - ``fold_value_biases`` is exact and a no-op: Qwen3 attention has no value bias.
        - ``center_writing_weights`` (``ValueError``): exact only when every reader subtracts the
          mean, and RMSNorm does not.
        - ``refactor_factored_attn_matrices`` (``ValueError``): QK-norm and rotary sit between
          ``W_Q`` and ``W_K``.

        Every option is checked before any weight changes.
        """
        self.check_weight_processing(
            center_writing_weights=center_writing_weights,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
        if fold_ln:
            self.fold_layer_norm()
        if center_unembed:
            self.center_unembed()

    @staticmethod
    def check_weight_processing(
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
        refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """Raise ``ValueError`` (with the reason) for the TL weight-processing options that are
        not exact for this architecture; the others pass. Changes nothing."""
        del fold_ln, center_unembed, fold_value_biases  # exact: applied (or a no-op)
        if center_writing_weights:
            raise ValueError("center_writing_weights=True " + CENTRING_REFUSAL.format(name="center_writing_weights"))
        if refactor_factored_attn_matrices:
            raise ValueError(
                "refactor_factored_attn_matrices=True is not exact for this model: QK-norm and "
                "rotary act between W_Q and W_K, so W_Q W_K^T cannot be refactored. Pass False."
            )

    @torch.no_grad()
    def center_unembed(self) -> None:
        """Subtract from ``W_U`` its mean over the vocabulary (TL's ``center_unembed``): logits
        move by one constant per position, so probabilities are unchanged. A tied unembedding
        is untied first (the embedding must stay as it is)."""
        self._untie_unembed()
        weight = self.unembed.weight  # [d_vocab, d_model]
        weight.copy_((weight.float() - weight.float().mean(0, keepdim=True)).to(weight.dtype))

    def _untie_unembed(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.unembed.weight = torch.nn.Parameter(self.unembed.weight.detach().clone())
            self.cfg.tie_word_embeddings = False

    @torch.no_grad()
    def fold_layer_norm(self) -> None:
        """Fold ``ln_final`` into ``W_U``, ``ln1`` into ``W_Q/W_K/W_V``, ``ln2`` into
        ``W_in/W_gate``, and set those gains to 1. A tied unembedding is untied first (the
        embedding must stay unscaled)."""
        self._untie_unembed()
        _fold(self.ln_final, [self.unembed])
        for block in self.blocks:
            _fold(block.ln1, [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj])
            _fold(block.ln2, [block.mlp.gate_proj, block.mlp.up_proj])


def _fold(norm: torch.nn.Module, readers: list[torch.nn.Linear]) -> None:
    """Multiply each reader's input columns by ``norm``'s gain (in fp32), then set the gain to 1."""
    gain = norm.weight.float()
    for linear in readers:
        linear.weight.copy_((linear.weight.float() * gain[None, :]).to(linear.weight.dtype))
    norm.weight.fill_(1.0)
