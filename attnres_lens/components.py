"""Qwen3 backbone components with TransformerLens hook points.

Hook placement and meaning follow TransformerLens (``attn.hook_q`` is the projection before
QK-norm and rotary, ``hook_rot_q`` after them, ``hook_pattern`` the post-softmax pattern,
``hook_z`` the per-head mixed values). Parameter names follow Hugging Face's
``modeling_qwen3.py`` (``q_proj.weight``, ``q_norm.weight``, ...), so checkpoint keys map
one-to-one, and the arithmetic mirrors it op for op so logits match ``Qwen3ForCausalLM``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .compat import HookPoint
from .config import AttnResConfig


class RMSNorm(nn.Module):
    """RMSNorm as in Qwen3 (computed in fp32), with TransformerLens' ``hook_scale`` (the RMS,
    ``[..., 1]``) and ``hook_normalized`` (``x / scale``, before the gain)."""

    def __init__(self, length: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(length))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... length"]) -> Float[Tensor, "... length"]:
        in_dtype = x.dtype
        x = x.float()
        mean_square = x.pow(2).mean(-1, keepdim=True) + self.eps
        if self.hook_scale.fwd_hooks or self.hook_scale.bwd_hooks:
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
    cos: Float[Tensor, "pos d_head"],
    sin: Float[Tensor, "pos d_head"],
) -> Float[Tensor, "batch pos head d_head"]:
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    return (x * cos) + (_rotate_half(x) * sin)


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

    def _pattern_is_observed(self) -> bool:
        return any(
            hp.fwd_hooks or hp.bwd_hooks for hp in (self.hook_attn_scores, self.hook_pattern)
        )

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        cos: Float[Tensor, "pos d_head"],
        sin: Float[Tensor, "pos d_head"],
    ) -> Float[Tensor, "batch pos d_model"]:
        batch, n_pos, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(batch, n_pos, self.n_heads, self.d_head))
        k = self.hook_k(self.k_proj(x).view(batch, n_pos, self.n_kv, self.d_head))
        v = self.hook_v(self.v_proj(x).view(batch, n_pos, self.n_kv, self.d_head))
        q = self.hook_rot_q(apply_rotary(self.q_norm(q), cos, sin)).transpose(1, 2)
        k = self.hook_rot_k(apply_rotary(self.k_norm(k), cos, sin)).transpose(1, 2)
        v = v.transpose(1, 2)
        if self._pattern_is_observed():
            # The explicit pattern is only built when someone hooks it: the fused kernel below
            # never materialises it, which keeps an unhooked forward as fast as Hugging Face's.
            groups = self.n_heads // self.n_kv
            k_all = k.repeat_interleave(groups, dim=1)
            v_all = v.repeat_interleave(groups, dim=1)
            scores = torch.matmul(q, k_all.transpose(-1, -2)) * self.scaling
            causal = torch.ones(n_pos, n_pos, dtype=torch.bool, device=x.device).triu(1)
            scores = self.hook_attn_scores(scores.masked_fill(causal, float("-inf")))
            pattern = self.hook_pattern(torch.softmax(scores.float(), dim=-1).to(q.dtype))
            z = torch.matmul(pattern, v_all)
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scaling, enable_gqa=self.n_kv != self.n_heads
            )
        z = self.hook_z(z.transpose(1, 2))
        return self.o_proj(z.reshape(batch, n_pos, self.n_heads * self.d_head))


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
