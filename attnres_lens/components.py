"""Qwen3 backbone components with TransformerLens hook points.

Hook placement and meaning follow TransformerLens (``attn.hook_q`` is the projection before
QK-norm and rotary, ``hook_rot_q`` after them, ``hook_pattern`` the post-softmax pattern,
``hook_z`` the per-head mixed values). Parameter names follow Hugging Face's
``modeling_qwen3.py`` (``q_proj.weight``, ``q_norm.weight``, ...), so checkpoint keys map
one-to-one, and the arithmetic mirrors it op for op so logits match ``Qwen3ForCausalLM``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .compat import HookPoint
from .config import AttnResConfig


class RMSNorm(nn.Module):
    """RMSNorm as in Qwen3 (computed in fp32), with TransformerLens' ``hook_scale`` (the RMS,
    ``[..., 1]``) and ``hook_normalized`` (``x / scale``, before the gain).

    ``hook_scale`` is only computed when a TransformerLens hook is attached to it, or when
    ``materialize_scale`` is set (``model.set_materialize_norm_scales(True)``) for tools that
    use plain torch hooks; otherwise the norm runs Hugging Face's exact ``rsqrt`` arithmetic."""

    def __init__(self, length: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(length))
        self.materialize_scale = False
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... length"]) -> Float[Tensor, "... length"]:
        in_dtype = x.dtype
        x = x.float()
        mean_square = x.pow(2).mean(-1, keepdim=True) + self.eps
        if self.materialize_scale or self.hook_scale.fwd_hooks or self.hook_scale.bwd_hooks:
            x = x / self.hook_scale(mean_square.sqrt())
        else:
            # Hugging Face's exact arithmetic (multiply by rsqrt), for bit-level logit parity.
            x = x * torch.rsqrt(mean_square)
        x = self.hook_normalized(x).to(in_dtype)
        return self.weight * x


def rotary_cos_sin(
    n_pos: int, d_head: int, base: float, device: torch.device
) -> tuple[Float[Tensor, "pos d_head"], Float[Tensor, "pos d_head"]]:
    """Default (unscaled) rotary tables, computed exactly as Hugging Face Qwen3 does (fp32)."""
    inv_freq = 1.0 / (
        base ** (torch.arange(0, d_head, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / d_head)
    )
    positions = torch.arange(n_pos, device=device, dtype=torch.float)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"],
    cos: Float[Tensor, "*batch pos d_head"],
    sin: Float[Tensor, "*batch pos d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate ``x``; the tables are ``[pos, d_head]`` (shared positions) or ``[batch, pos,
    d_head]`` (per-row positions, e.g. left padding)."""
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    return (x * cos) + (_rotate_half(x) * sin)


@dataclass
class KVCacheEntry:
    """One attention layer's past keys and values (after QK-norm and rotary), for generation.

    ``keys``/``values`` are ``[batch, kv_head, past_pos, d_head]``; :meth:`extend` appends the
    new positions and returns the full tensors."""

    keys: Optional[Tensor] = None
    values: Optional[Tensor] = None

    def extend(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys is not None:
            keys = torch.cat([self.keys, keys], dim=2)
            values = torch.cat([self.values, values], dim=2)
        self.keys, self.values = keys, values
        return keys, values

    @property
    def n_pos(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


@dataclass
class SharedPrefixKV(KVCacheEntry):
    """The keys and values of a sequence's first ``n_pos`` positions, shared by ``copies``
    stacked copies of its batch (the batched sweep runs many interventions on copies of one
    batch, none of which changes those positions).

    ``keys``/``values`` are ``[batch, kv_head, n_pos, d_head]``; the new positions of a forward
    are ``[copies * batch, kv_head, new_pos, d_head]``, copy ``j`` owning items
    ``j * batch .. j * batch + batch - 1``. :meth:`extend` returns the full keys and values of
    every copy (what attending over this entry means); :class:`Attention` computes the same
    without copying the prefix per copy. Unlike :class:`KVCacheEntry` it stores nothing, so one
    entry serves every forward from the same prefix."""

    copies: int = 1

    def extend(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        self.check_new(keys)
        repeat = lambda t: t.repeat(self.copies, 1, 1, 1)  # noqa: E731
        return torch.cat([repeat(self.keys), keys], dim=2), torch.cat([repeat(self.values), values], dim=2)

    def check_new(self, new: Tensor) -> None:
        if new.shape[0] != self.copies * self.keys.shape[0]:
            raise ValueError(
                f"the new keys/values have batch {new.shape[0]}, but {self.copies} copies of a "
                f"batch of {self.keys.shape[0]} share this prefix"
            )


@dataclass(frozen=True)
class SequenceContext:
    """What attention needs besides its input: rotary tables for the positions being run,
    an optional explicit mask (``[batch, 1, query_pos, key_pos]``, ``True`` = may attend; set
    for left padding and for cached generation, ``None`` for the fused causal kernel) and an
    optional KV cache (one entry per layer)."""

    cos: Tensor
    sin: Tensor
    attn_mask: Optional[Tensor] = None
    kv_cache: Optional[list[KVCacheEntry]] = None


@dataclass(frozen=True)
class HeadInputs:
    """Per-head attention inputs, already normed (``ln1``): ``q`` ``[batch, pos, head, d_model]``,
    ``k``/``v`` ``[batch, pos, kv_head, d_model]``. What the block hands the attention under
    TransformerLens' ``use_split_qkv_input``/``use_attn_in``, so each head reads its own copy."""

    q: Tensor
    k: Tensor
    v: Tensor


def per_head(x: Float[Tensor, "batch pos d_model"], n_heads: int) -> Float[Tensor, "batch pos head d_model"]:
    """``n_heads`` copies of ``x`` (a copy, not a view, so a hook may edit one head in place)."""
    return x.unsqueeze(-2).repeat(*([1] * (x.ndim - 1)), n_heads, 1)


class Embed(nn.Embedding):
    """The token embedding; ``W_E`` ``[d_vocab, d_model]`` is a view on ``weight`` (TL's name)."""

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:  # noqa: N802 (TL's name)
        return self.weight


class Unembed(nn.Linear):
    """The LM head (no bias); ``W_U`` ``[d_model, d_vocab]`` is a view on ``weight`` and ``b_U``
    is zero (TL's names)."""

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:  # noqa: N802 (TL's name)
        return self.weight.T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:  # noqa: N802 (TL's name)
        return torch.zeros(self.weight.shape[0], dtype=self.weight.dtype, device=self.weight.device)


class Attention(nn.Module):
    """Causal grouped-query attention with per-head RMSNorm on q and k (QK-norm) and rotary."""

    def __init__(self, cfg: AttnResConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_key_value_heads
        self.d_head = cfg.d_head
        self.scaling = cfg.d_head**-0.5
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.d_head, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * cfg.d_head, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * cfg.d_head, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.d_head, cfg.eps)
        self.k_norm = RMSNorm(cfg.d_head, cfg.eps)
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head_index, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head_index, d_head]
        self.hook_rot_q = HookPoint()  # after QK-norm and rotary
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head_index, query_pos, key_pos], masked
        self.hook_pattern = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]
        #: Each head's write ``z_h @ W_O[h]``; fires when ``cfg.use_attn_result`` (TL's
        #: ``set_use_attn_result``), and then sums over heads to the output.
        self.hook_result = HookPoint()  # [batch, pos, head_index, d_model]
        #: Build the explicit pattern even without a TL hook (``model.set_materialize_patterns``).
        self.materialize_pattern = False

    def _pattern_is_observed(self) -> bool:
        """Whether to build the pattern: when switched on, when a TL hook is attached, or when
        a tool has wrapped the hook point's ``forward`` on the instance (nnsight does this to
        every module it wraps, so ``hook_pattern.output`` is there to read without
        ``set_materialize_patterns``)."""
        points = (self.hook_attn_scores, self.hook_pattern)
        return self.materialize_pattern or any(
            hp.fwd_hooks or hp.bwd_hooks or "forward" in hp.__dict__ for hp in points
        )

    def forward(
        self,
        x: "Union[Float[Tensor, 'batch pos d_model'], HeadInputs]",
        cos: Float[Tensor, "*batch pos d_head"],
        sin: Float[Tensor, "*batch pos d_head"],
        attn_mask: Optional[Tensor] = None,
        kv_cache: Optional[KVCacheEntry] = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """``attn_mask`` (``[batch, 1, query_pos, key_pos]`` bool, ``True`` = may attend) replaces
        the causal mask when given; ``kv_cache`` supplies and stores the past keys/values."""
        q, k, v = self._project(x)
        batch, n_pos = q.shape[:2]
        q = self.hook_rot_q(apply_rotary(self.q_norm(q), cos, sin)).transpose(1, 2)
        k = self.hook_rot_k(apply_rotary(self.k_norm(k), cos, sin)).transpose(1, 2)
        v = v.transpose(1, 2)
        if isinstance(kv_cache, SharedPrefixKV) and kv_cache.n_pos:
            z = self._attention_over_shared_prefix(q, k, v, kv_cache, attn_mask)
            return self._write(self.hook_z(z.transpose(1, 2)))
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)
        if attn_mask is None and k.shape[2] != n_pos:
            raise ValueError(
                f"{n_pos} queries over {k.shape[2]} cached keys need an explicit attn_mask "
                "(the fused causal kernel aligns queries with the first keys)"
            )
        if self._pattern_is_observed():
            z = self._explicit_attention(q, k, v, attn_mask)
        else:
            # The fused kernel never materialises the pattern, which keeps an unhooked forward
            # as fast as Hugging Face's.
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, scale=self.scaling,
                enable_gqa=self.n_kv != self.n_heads,
            )
        return self._write(self.hook_z(z.transpose(1, 2)))

    def _project(self, x: "Tensor | HeadInputs") -> tuple[Tensor, Tensor, Tensor]:
        """``hook_q``/``hook_k``/``hook_v`` ``[batch, pos, head, d_head]``, from one input or from
        per-head inputs (:class:`HeadInputs`, TL's split-qkv path)."""
        if isinstance(x, HeadInputs):
            q = torch.einsum("bphm,hmd->bphd", x.q, self.W_Q)
            k = torch.einsum("bphm,hmd->bphd", x.k, self._W_K)
            v = torch.einsum("bphm,hmd->bphd", x.v, self._W_V)
        else:
            batch, n_pos, _ = x.shape
            q = self.q_proj(x).view(batch, n_pos, self.n_heads, self.d_head)
            k = self.k_proj(x).view(batch, n_pos, self.n_kv, self.d_head)
            v = self.v_proj(x).view(batch, n_pos, self.n_kv, self.d_head)
        return self.hook_q(q), self.hook_k(k), self.hook_v(v)

    def _write(self, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos d_model"]:
        """The output ``o_proj(z)``; with ``cfg.use_attn_result`` the per-head writes
        ``hook_result`` ``[batch, pos, head, d_model]`` are formed first and summed."""
        if self.cfg.use_attn_result:
            return self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O)).sum(-2)
        return self.o_proj(z.reshape(*z.shape[:2], self.n_heads * self.d_head))

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
        """Attention with the scores and pattern materialised (and hooked)."""
        k_all = k.repeat_interleave(self.repeat_kv_heads, dim=1)
        v_all = v.repeat_interleave(self.repeat_kv_heads, dim=1)
        scores = torch.matmul(q, k_all.transpose(-1, -2)) * self.scaling
        if attn_mask is None:
            n_q, n_k = scores.shape[-2:]
            blocked = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        else:
            blocked = ~attn_mask
        scores = self.hook_attn_scores(scores.masked_fill(blocked, float("-inf")))
        pattern = self.hook_pattern(torch.softmax(scores.float(), dim=-1).to(q.dtype))
        return torch.matmul(pattern, v_all)

    def _attention_over_shared_prefix(
        self, q: Tensor, k: Tensor, v: Tensor, prefix: SharedPrefixKV, attn_mask: Optional[Tensor]
    ) -> Tensor:
        """Explicit attention (scores and pattern hooked, as :meth:`_explicit_attention`) over
        ``prefix`` then the new keys, without repeating the prefix per copy: the queries of all
        copies (and of the heads sharing a key/value head) of prompt ``b`` meet its prefix keys
        in one matmul. ``q`` is ``[copies * batch, head, new_pos, d_head]``, ``k``/``v``
        ``[copies * batch, kv_head, new_pos, d_head]``."""
        prefix.check_new(k)
        copies, (batch, n_kv, n_prefix, d_head) = prefix.copies, prefix.keys.shape
        rep, n_new = self.repeat_kv_heads, q.shape[2]
        shape = (copies, batch, n_kv, rep, n_new)  # the layout of q's leading axes

        def fold(t: Tensor) -> Tensor:  # [copies * batch, head, new, x] -> [batch, kv_head, copies * rep * new, x]
            return t.reshape(*shape, -1).permute(1, 2, 0, 3, 4, 5).reshape(batch, n_kv, -1, t.shape[-1])

        def unfold(t: Tensor) -> Tensor:  # the inverse of fold
            return t.reshape(batch, n_kv, copies, rep, n_new, -1).permute(2, 0, 1, 3, 4, 5).reshape(
                copies * batch, n_kv * rep, n_new, t.shape[-1]
            )

        prefix_scores = unfold(torch.matmul(fold(q), prefix.keys.transpose(-1, -2)))
        new_scores = torch.matmul(q, k.repeat_interleave(rep, dim=1).transpose(-1, -2))
        scores = torch.cat([prefix_scores, new_scores], dim=-1) * self.scaling
        if attn_mask is None:  # causal: every prefix key, and the new keys up to the query
            blocked = torch.ones(n_new, n_new, dtype=torch.bool, device=q.device).triu(1)
            blocked = torch.cat([blocked.new_zeros(n_new, n_prefix), blocked], dim=-1)
        else:
            blocked = ~attn_mask
        scores = self.hook_attn_scores(scores.masked_fill(blocked, float("-inf")))
        pattern = self.hook_pattern(torch.softmax(scores.float(), dim=-1).to(q.dtype))
        from_prefix = unfold(torch.matmul(fold(pattern[..., :n_prefix]), prefix.values))
        return from_prefix + torch.matmul(pattern[..., n_prefix:], v.repeat_interleave(rep, dim=1))

    # ------------------------------------------------------------------ TL weight views
    # Views on the checkpoint-named parameters (no copies: an edit to ``q_proj.weight`` shows up
    # here and an in-place edit here changes ``q_proj.weight``). Grouped-query attention follows
    # TransformerLens 3.9's ``GroupedQueryAttention``: ``_W_K``/``_W_V`` hold the key/value
    # heads and ``W_K``/``W_V`` repeat them to ``n_heads`` with ``repeat_interleave`` (that
    # repetition is a copy, as in TL). QK-norm and rotary act between ``W_Q``/``W_K`` and the
    # scores, so ``W_Q @ W_K^T`` is the bilinear form *before* the per-head norm, as TL's
    # ``QK`` is for its QK-normed models.
    @property
    def repeat_kv_heads(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def W_Q(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self.q_proj.weight.unflatten(0, (self.n_heads, self.d_head)).transpose(1, 2)

    @property
    def _W_K(self) -> Float[Tensor, "n_kv_heads d_model d_head"]:
        return self.k_proj.weight.unflatten(0, (self.n_kv, self.d_head)).transpose(1, 2)

    @property
    def _W_V(self) -> Float[Tensor, "n_kv_heads d_model d_head"]:
        return self.v_proj.weight.unflatten(0, (self.n_kv, self.d_head)).transpose(1, 2)

    @property
    def W_K(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return torch.repeat_interleave(self._W_K, dim=0, repeats=self.repeat_kv_heads)

    @property
    def W_V(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return torch.repeat_interleave(self._W_V, dim=0, repeats=self.repeat_kv_heads)

    @property
    def W_O(self) -> Float[Tensor, "n_heads d_head d_model"]:
        return self.o_proj.weight.T.unflatten(0, (self.n_heads, self.d_head))

    def _zeros(self, *shape: int) -> Tensor:
        weight = self.q_proj.weight
        return torch.zeros(shape, dtype=weight.dtype, device=weight.device)

    @property
    def b_Q(self) -> Float[Tensor, "n_heads d_head"]:
        """Zero: Qwen3 attention has no biases (so are ``b_K``, ``b_V``, ``b_O``)."""
        return self._zeros(self.n_heads, self.d_head)

    @property
    def b_K(self) -> Float[Tensor, "n_heads d_head"]:
        return self._zeros(self.n_heads, self.d_head)

    @property
    def b_V(self) -> Float[Tensor, "n_heads d_head"]:
        return self._zeros(self.n_heads, self.d_head)

    @property
    def _b_K(self) -> Float[Tensor, "n_kv_heads d_head"]:
        return self._zeros(self.n_kv, self.d_head)

    @property
    def _b_V(self) -> Float[Tensor, "n_kv_heads d_head"]:
        return self._zeros(self.n_kv, self.d_head)

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        return self._zeros(self.o_proj.weight.shape[0])


class GatedMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``. ``hook_pre`` is the gate pre-activation,
    ``hook_pre_linear`` the up projection, ``hook_post`` their product (TransformerLens'
    ``GatedMLP`` naming)."""

    def __init__(self, cfg: AttnResConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(self.gate_proj(x))
        pre_linear = self.hook_pre_linear(self.up_proj(x))
        post = self.hook_post(F.silu(pre) * pre_linear)
        return self.down_proj(post)

    # ------------------------------------------------------------------ TL weight views
    # Views (no copies) in TransformerLens' ``GatedMLP`` convention:
    # ``post = silu(x @ W_gate) * (x @ W_in)``, ``out = post @ W_out``.
    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.up_proj.weight.T

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.gate_proj.weight.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.down_proj.weight.T

    @property
    def b_in(self) -> Float[Tensor, " d_mlp"]:
        """Zero: the Qwen3 MLP has no biases (so is ``b_out``)."""
        weight = self.up_proj.weight
        return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)

    @property
    def b_out(self) -> Float[Tensor, " d_model"]:
        weight = self.down_proj.weight
        return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
