"""`HookedAttnResTransformer`: a hooked Qwen3 whose residual additions are replaced by routing.

The forward reads top to bottom as the model's loop (``docs/concepts.md``)::

    state = embed(tokens)                   # DepthState: completed sources + current one
    for k in range(2 * n_layers):           # attn_0, mlp_0, attn_1, ...
        state = step(k, state)              # route -> sublayer -> update the sources
    logits = readout(state)                 # (kimi: final router) -> final norm -> head

:class:`DepthState` is immutable, so the state before any sublayer can be kept and the rest of
the model rerun from it (the sweep engine does this to reuse the clean prefix).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .compat import ActivationCache, HookedRootModule, HookPoint
from .components import Attention, GatedMLP, RMSNorm, rotary_cos_sin
from .config import AttnResConfig, RoutingSchedule
from .metrics import next_token_loss
from .router import DepthRouter, RouterSpec, closes_block_before, snapshot_after, source_layout
from .tokenizer import ByteTokenizer

TokensLike = Union[str, list[str], Tensor]
RETURN_TYPES = ("logits", "loss", "both", None)


@dataclasses.dataclass(frozen=True)
class DepthState:
    """The sources the next router reads.

    ``completed`` are the finished sources (kimi: embedding and block summaries; cumulative:
    embedding and stream snapshots). ``current`` is the in-progress one (kimi: the intra-block
    partial sum, ``None`` right after a block closed; cumulative: the stream ``x``).
    """

    completed: tuple[Tensor, ...]
    current: Optional[Tensor]

    def sources(self) -> list[Tensor]:
        return list(self.completed) + ([self.current] if self.current is not None else [])


class AttnResBlock(nn.Module):
    """One layer: an attention sublayer and an MLP sublayer, each reading through its router.

    Hooks: ``hook_attn_in``/``hook_mlp_in`` (the routed input, before ``ln1``/``ln2``) and
    ``hook_attn_out``/``hook_mlp_out`` (the sublayer outputs). Cumulative models also have
    ``hook_resid_pre``/``hook_resid_mid``/``hook_resid_post``: the cumulative stream ``x``, which
    in that flavour is a true additive residual (``resid_mid = resid_pre + attn_out``). Kimi
    models have no such stream, so they expose no ``hook_resid_*``.
    """

    def __init__(self, cfg: AttnResConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_router = DepthRouter(cfg.d_model, cfg.eps, cfg.router_bias, cfg.recency_bias_init)
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_router = DepthRouter(cfg.d_model, cfg.eps, cfg.router_bias, cfg.recency_bias_init)
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps)
        self.mlp = GatedMLP(cfg)
        self.hook_attn_in = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_in = HookPoint()
        self.hook_mlp_out = HookPoint()
        if cfg.flavour == "cumulative":
            self.hook_resid_pre = HookPoint()
            self.hook_resid_mid = HookPoint()
            self.hook_resid_post = HookPoint()

    def attn_sublayer(self, sources: list[Tensor], cos: Tensor, sin: Tensor) -> Tensor:
        h = self.hook_attn_in(self.attn_router(sources))
        return self.hook_attn_out(self.attn(self.ln1(h), cos, sin))

    def mlp_sublayer(self, sources: list[Tensor]) -> Tensor:
        h = self.hook_mlp_in(self.mlp_router(sources))
        return self.hook_mlp_out(self.mlp(self.ln2(h)))


class HookedAttnResTransformer(HookedRootModule):
    """A Qwen3 decoder with Block AttnRes routing, hookable like a TransformerLens model.

    Router hooks (``blocks.{l}.attn_router``, ``blocks.{l}.mlp_router`` and, for kimi,
    ``final_router``) each expose ``hook_sources``, ``hook_logits``, ``hook_weights`` and
    ``hook_out``. So that ``transformer_lens.patching.generic_activation_patch`` (which names
    activations ``blocks.{layer}.hook_{name}``) can reach the routing weights, they are also
    reachable as ``blocks.{l}.hook_attn_router_weights`` / ``blocks.{l}.hook_mlp_router_weights``
    (and ``..._router_logits``, ``..._router_sources``): aliases of the same hook points, which
    :meth:`run_with_cache` also fills.
    """

    def __init__(
        self,
        cfg: Union[AttnResConfig, dict],
        tokenizer: Any = None,
        *,
        init_weights: bool = True,
    ):
        super().__init__()
        if isinstance(cfg, dict):
            cfg = AttnResConfig.from_dict(cfg)
        if not isinstance(cfg, AttnResConfig):
            raise TypeError(f"cfg must be an AttnResConfig or a dict, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(AttnResBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.final_router = (
            DepthRouter(cfg.d_model, cfg.eps, cfg.router_bias, cfg.recency_bias_init)
            if cfg.has_final_router
            else None
        )
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        if cfg.tie_word_embeddings:
            self.unembed.weight = self.embed.weight
        #: How the routing was set when a plain Qwen3 was wrapped (see ``attnres_lens.loading``).
        self.schedule = RoutingSchedule()
        #: Which checkpoint format the weights came from ("fresh" when built from a config).
        self.checkpoint_format = "fresh"
        self._rotary_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._router_specs = source_layout(cfg)
        if init_weights:
            self.init_weights()
        self.setup()
        self.eval()  # no dropout anywhere; TL patching requires eval mode
        if str(cfg.dtype) != str(torch.float32):
            self.to(cfg.dtype)
        if init_weights and cfg.device is not None:
            self.to(cfg.device)  # as HookedTransformer does; loading places weights itself

    # ---------------------------------------------------------------------- construction
    def setup(self) -> None:
        super().setup()
        self.hook_aliases: dict[str, str] = {}
        for block in self.blocks:
            for sub in ("attn", "mlp"):
                for what in ("sources", "logits", "weights"):
                    alias = f"blocks.{block.layer}.hook_{sub}_router_{what}"
                    self.hook_aliases[alias] = f"blocks.{block.layer}.{sub}_router.hook_{what}"
        for alias, canonical in self.hook_aliases.items():
            self.mod_dict[alias] = self.mod_dict[canonical]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Hugging Face's Qwen3 init (normal(0, initializer_range), unit norm gains); routers
        zero-initialised as in the Kimi report, biases at ``cfg.recency_bias_init``."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        # Routers last: their query is an nn.Linear that the loop above also drew at random.
        for _, router in self.routers():
            router.proj.weight.zero_()
            router.norm.weight.fill_(1.0)
            if router.bias is not None:
                router.bias.fill_(self.cfg.recency_bias_init)

    # ---------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(
        cls,
        source: Any,
        *,
        flavour: Optional[str] = None,
        schedule: Optional[str] = None,
        recency_bias: Optional[float] = None,
        n_blocks: Optional[int] = None,
        dtype: Optional[Union[torch.dtype, str]] = None,
        device: Optional[Union[str, torch.device]] = None,
        tokenizer: Any = None,
    ) -> "HookedAttnResTransformer":
        """Load a checkpoint, or wrap a vanilla Qwen3.

        ``source`` is a local directory, an in-memory ``transformers.Qwen3ForCausalLM`` or a hub
        id. What it holds is detected (see :mod:`attnres_lens.loading`):

        - a vanilla ``qwen3`` checkpoint is wrapped with ``flavour="kimi"`` and
          ``schedule="uniform"`` (all queries zero: every router averages its sources, which
          computes the vanilla function with each routed norm's eps scaled by ``n_sources**2``)
          or ``flavour="cumulative"`` and ``schedule="recency"`` with ``recency_bias=b`` (routing
          weights exactly ``e^b / (e^b + n - 1)`` on the current stream; vanilla as b -> inf).
          ``n_blocks`` defaults to ``min(8, n_layers)``;
        - a ``qwen3_attnres`` checkpoint (cumulative in block or full mode, or kimi in block
          mode), its flavour decided by its router keys;
        - a checkpoint written by :meth:`save_pretrained`, schedule included.

        ``dtype`` is float32 (default), bfloat16 or float16. The user's model is never changed.
        """
        from .loading import read_checkpoint

        return read_checkpoint(
            source,
            flavour=flavour,
            schedule=schedule,
            recency_bias=recency_bias,
            n_blocks=n_blocks,
            dtype=dtype,
            device=device,
            tokenizer=tokenizer,
        ).into(cls)

    def save_pretrained(self, directory: Any, *, max_shard_size: Union[int, str, None] = None) -> Any:
        """Write ``config.json`` + safetensors in the ``qwen3_attnres`` layout of this model's
        flavour (loadable by that flavour's original codebase), plus this library's metadata
        (schedule, routing mode) under the ``attnres_lens`` config key."""
        from .loading import save_pretrained

        return save_pretrained(self, directory, max_shard_size=max_shard_size)

    # ---------------------------------------------------------------------- routing layout
    @property
    def router_specs(self) -> list[RouterSpec]:
        """Every router with its sources, in forward order."""
        return list(self._router_specs)

    def router(self, name: str) -> DepthRouter:
        """The router module with hook prefix ``name`` (e.g. ``"blocks.2.mlp_router"``)."""
        names = [spec.name for spec in self._router_specs]
        if name not in names:
            raise KeyError(f"no router named {name!r}; routers are {names}")
        return self.get_submodule(name)

    def routers(self) -> list[tuple[RouterSpec, DepthRouter]]:
        return [(spec, self.get_submodule(spec.name)) for spec in self._router_specs]

    def source_table(self) -> pd.DataFrame:
        """One row per (router, source): ``router`` (hook prefix), ``layer`` (None for final),
        ``sublayer``, ``source`` (index), ``family`` and ``label``. Plots, interventions and
        reports name slices from this table."""
        rows = [
            {
                "router": spec.name,
                "layer": spec.layer,
                "sublayer": spec.sublayer,
                "source": src.index,
                "family": src.family,
                "label": src.label,
            }
            for spec in self._router_specs
            for src in spec.sources
        ]
        table = pd.DataFrame(rows, columns=["router", "layer", "sublayer", "source", "family", "label"])
        table["layer"] = table["layer"].astype("Int64")
        return table

    # ---------------------------------------------------------------------- forward pieces
    def rotary(self, n_pos: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Rotary cos/sin tables for positions ``0 .. n_pos-1``. One table per device, grown to
        the longest sequence seen and sliced, so generation does not cache one per length."""
        key = str(device)
        cached = self._rotary_cache.get(key)
        if cached is None or cached[0].shape[0] < n_pos:
            cached = rotary_cos_sin(n_pos, self.cfg.d_head, self.cfg.rotary_base, device)
            self._rotary_cache[key] = cached
        return cached[0][:n_pos], cached[1][:n_pos]

    def initial_state(self, tokens: Int[Tensor, "batch pos"]) -> DepthState:
        """Embed ``tokens``: the state before the first sublayer."""
        emb = self.hook_embed(self.embed(tokens))
        if self.cfg.flavour == "kimi":
            return DepthState(completed=(), current=emb)
        return DepthState(completed=(emb,), current=emb)

    def step(self, k: int, state: DepthState) -> DepthState:
        """Run sublayer ``k`` (``attn_{k//2}`` if ``k`` is even, else ``mlp_{k//2}``)."""
        cfg = self.cfg
        block = self.blocks[k // 2]
        is_attn = k % 2 == 0
        if cfg.flavour == "kimi":
            if closes_block_before(cfg, k):
                state = DepthState(state.completed + (state.current,), None)
            out = self._run_sublayer(block, is_attn, state.sources())
            partial = out if state.current is None else state.current + out
            return DepthState(state.completed, partial)
        # cumulative: x is a true additive stream; the sublayer reads it through its router.
        x = state.current
        if is_attn:
            x = block.hook_resid_pre(x)
            state = DepthState(state.completed, x)
        x = x + self._run_sublayer(block, is_attn, state.sources())
        x = block.hook_resid_mid(x) if is_attn else block.hook_resid_post(x)
        completed = state.completed + ((x,) if snapshot_after(cfg, k) else ())
        return DepthState(completed, x)

    def _run_sublayer(self, block: AttnResBlock, is_attn: bool, sources: list[Tensor]) -> Tensor:
        if is_attn:
            cos, sin = self.rotary(sources[0].shape[1], sources[0].device)
            return block.attn_sublayer(sources, cos, sin)
        return block.mlp_sublayer(sources)

    def final_input(self, state: DepthState) -> Tensor:
        """What the final norm reads: the final router's output (kimi) or the stream (cumulative)."""
        if self.final_router is None:
            return state.current
        if closes_block_before(self.cfg, self.cfg.n_sublayers):
            state = DepthState(state.completed + (state.current,), None)
        return self.final_router(state.sources())

    def readout(self, state: DepthState) -> Float[Tensor, "batch pos d_vocab"]:
        return self.unembed(self.ln_final(self.final_input(state)))

    def run_from(
        self, state: DepthState, start: int = 0, stop: Optional[int] = None
    ) -> DepthState:
        """Run sublayers ``start .. stop-1`` from ``state``."""
        stop = self.cfg.n_sublayers if stop is None else stop
        for k in range(start, stop):
            state = self.step(k, state)
        return state

    # ---------------------------------------------------------------------- forward
    def forward(
        self,
        input: TokensLike,
        return_type: Optional[str] = "logits",
        loss_per_token: bool = False,
        attention_mask: Optional[Tensor] = None,
    ) -> Union[None, Tensor, tuple[Tensor, Tensor]]:
        """Run the model.

        Args:
            input: a string, a list of strings (tokenised and right-padded) or integer tokens
                ``[batch, pos]`` (or ``[pos]``).
            return_type: ``"logits"`` ``[batch, pos, d_vocab]``, ``"loss"`` (mean next-token
                cross-entropy), ``"both"`` (``(logits, loss)``) or ``None``.
            loss_per_token: return the loss per token ``[batch, pos - 1]`` instead of its mean.
            attention_mask: ``[batch, pos]`` with 1 for real tokens, 0 for right padding; padded
                targets are left out of the loss (right padding never reaches earlier positions
                under causal attention, so nothing else changes).
        """
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        if isinstance(input, (str, list)):
            if attention_mask is None:
                input, attention_mask = self.to_tokens(input, return_attention_mask=True)
            else:
                input = self.to_tokens(input)
        tokens = self.validate_tokens(input)
        state = self.run_from(self.initial_state(tokens))
        logits = self.readout(state)
        if return_type is None:
            return None
        if return_type == "logits":
            return logits
        loss = self.loss_fn(logits, tokens, attention_mask=attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def validate_tokens(self, tokens: Tensor) -> Int[Tensor, "batch pos"]:
        """Check a token tensor and return it as ``[batch, pos]`` on the model's device."""
        if not isinstance(tokens, Tensor):
            raise TypeError(
                f"tokens must be a str, a list of str or an integer torch.Tensor, got "
                f"{type(tokens).__name__}"
            )
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(
                f"tokens must be an integer tensor (torch.long or torch.int), got dtype {tokens.dtype}"
            )
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise ValueError(
                f"tokens must have shape [batch, pos] (or [pos]), got {tuple(tokens.shape)} "
                f"(rank {tokens.ndim})"
            )
        if tokens.shape[1] == 0:
            raise ValueError("tokens must hold at least one position, got shape " f"{tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.n_ctx:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the model's context n_ctx={self.cfg.n_ctx}"
            )
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.cfg.d_vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.cfg.d_vocab})")
        return tokens.to(device=self.embed.weight.device, dtype=torch.long)

    @staticmethod
    def loss_fn(
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Optional[Tensor] = None,
        per_token: bool = False,
    ) -> Tensor:
        """Next-token cross-entropy (TransformerLens' ``lm_cross_entropy_loss``)."""
        return next_token_loss(logits, tokens, attention_mask=attention_mask, per_token=per_token)

    # ---------------------------------------------------------------------- TL surface
    def run_with_cache(self, *model_args: Any, names_filter: Any = None, **kwargs: Any):
        """Like ``HookedTransformer.run_with_cache``: returns ``(output, ActivationCache)``.

        ``names_filter`` may use the block-level aliases; the cache holds them as keys too
        (same tensors, no copies)."""
        names_filter = self._expand_alias_filter(names_filter)
        out, cache_dict = super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)
        for alias, canonical in self.hook_aliases.items():
            for suffix in ("", "_grad"):
                if canonical + suffix in cache_dict:
                    cache_dict[alias + suffix] = cache_dict[canonical + suffix]
        return out, ActivationCache(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))

    def _expand_alias_filter(self, names_filter: Any) -> Any:
        if names_filter is None:
            return None
        canonical_to_alias = {c: a for a, c in self.hook_aliases.items()}
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, (list, tuple)):
            unknown = [n for n in names_filter if n not in self.mod_dict]
            if unknown:
                raise KeyError(f"unknown hook names in names_filter: {unknown}")
            return [self.hook_aliases.get(n, n) for n in names_filter]
        if callable(names_filter):
            user_filter = names_filter
            return lambda name: bool(user_filter(name)) or (
                name in canonical_to_alias and bool(user_filter(canonical_to_alias[name]))
            )
        raise ValueError("names_filter must be None, a string, a list of strings, or a function")

    # ---------------------------------------------------------------------- tokens
    def to_tokens(
        self,
        input: Union[str, list[str]],
        prepend_bos: Optional[bool] = None,
        truncate: bool = True,
        return_attention_mask: bool = False,
    ):
        """Tokenise ``input`` into ``[batch, pos]`` (right-padded with the pad id).

        With ``return_attention_mask=True`` also returns the ``[batch, pos]`` mask (1 = real)."""
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("to_tokens takes a str or a non-empty list of str")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        bos = getattr(self.tokenizer, "bos_token_id", None)
        seqs = []
        for text in texts:
            ids = list(self._encode(text))
            if prepend_bos and bos is not None:
                ids = [bos] + ids
            if truncate:
                ids = ids[: self.cfg.n_ctx]
            seqs.append(ids)
        width = max(len(s) for s in seqs)
        if width == 0:
            raise ValueError("input tokenises to zero tokens")
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else pad
        tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, ids in enumerate(seqs):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[i, : len(ids)] = 1
        tokens = tokens.to(self.embed.weight.device)
        if return_attention_mask:
            return tokens, mask.to(tokens.device)
        return tokens

    def _encode(self, text: str) -> list[int]:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.encode(text)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def to_string(self, tokens: Union[Tensor, list[int]]) -> Union[str, list[str]]:
        """Decode ``[pos]`` tokens to a string, or ``[batch, pos]`` to a list of strings."""
        if isinstance(tokens, Tensor) and tokens.ndim == 2:
            return [self.to_string(row) for row in tokens]
        if isinstance(tokens, Tensor):
            tokens = tokens.tolist()
        return self.tokenizer.decode(tokens)

    def to_str_tokens(self, input: Union[str, Tensor, list[int]], prepend_bos: Optional[bool] = None) -> list[str]:
        """One string per token of a single sequence."""
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos)[0]
        if isinstance(input, Tensor):
            if input.ndim == 2:
                if input.shape[0] != 1:
                    raise ValueError(f"to_str_tokens takes one sequence, got batch {input.shape[0]}")
                input = input[0]
            input = input.tolist()
        if hasattr(self.tokenizer, "convert_ids_to_tokens") and isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.convert_ids_to_tokens(input)
        return [self.tokenizer.decode([i]) for i in input]

    @torch.no_grad()
    def generate(
        self,
        input: Union[str, Tensor],
        max_new_tokens: int = 20,
        temperature: float = 0.0,
        seed: Optional[int] = None,
        stop_at_eos: bool = True,
    ) -> Union[str, Tensor]:
        """Greedy (``temperature=0``) or sampled continuation, recomputing the whole prefix
        each step (no KV cache: this is for sanity checks, not throughput)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        as_text = isinstance(input, str)
        tokens = self.to_tokens(input) if as_text else self.validate_tokens(input)
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        for _ in range(max_new_tokens):
            window = tokens[:, -self.cfg.n_ctx :]
            logits = self(window)[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                nxt = torch.multinomial(probs, 1, generator=gen).to(tokens.device)
            tokens = torch.cat([tokens, nxt], dim=1)
            if stop_at_eos and eos is not None and bool((nxt == eos).all()):
                break
        return self.to_string(tokens[0]) if as_text else tokens

    # ---------------------------------------------------------------------- conveniences
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.weight.T

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"flavour={c.flavour!r}, routing_mode={c.routing_mode!r}, "
            f"n_layers={c.n_layers}, layers_per_block={c.layers_per_block}, d_model={c.d_model}, "
            f"schedule={self.schedule.kind!r}"
        )
