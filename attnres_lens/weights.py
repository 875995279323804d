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
after the projection. Centring options are refused: centring the residual writes (or the
unembedding) is exact only when every reader subtracts the mean, which RMSNorm does not.
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
        refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """TransformerLens' weight processing, where it is exact for this architecture.

        ``fold_ln`` folds the RMSNorm gains read by linear maps (see the module docstring); the
        logits stay the same within float rounding, and ``cache.apply_ln_to_stack(...) @ W_U``
        is then exact direct logit attribution (TL's frozen-scale sense). The centring options
        are refused with ``ValueError`` (RMSNorm does not subtract the mean), as is
        ``refactor_factored_attn_matrices`` (QK-norm and rotary sit between ``W_Q`` and ``W_K``).
        """
        for name, value in (("center_writing_weights", center_writing_weights), ("center_unembed", center_unembed)):
            if value:
                raise ValueError(f"{name}=True " + CENTRING_REFUSAL.format(name=name))
        if refactor_factored_attn_matrices:
            raise ValueError(
                "refactor_factored_attn_matrices=True is not exact for this model: QK-norm and "
                "rotary act between W_Q and W_K, so W_Q W_K^T cannot be refactored. Pass False."
            )
        if fold_ln:
            self.fold_layer_norm()

    @torch.no_grad()
    def fold_layer_norm(self) -> None:
        """Fold ``ln_final`` into ``W_U``, ``ln1`` into ``W_Q/W_K/W_V``, ``ln2`` into
        ``W_in/W_gate``, and set those gains to 1. A tied unembedding is untied first (the
        embedding must stay unscaled)."""
        if self.cfg.tie_word_embeddings:
            self.unembed.weight = torch.nn.Parameter(self.unembed.weight.detach().clone())
            self.cfg.tie_word_embeddings = False
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
