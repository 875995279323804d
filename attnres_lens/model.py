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

import contextlib
import dataclasses
import warnings
from typing import Any, Optional, Union

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .cache import AttnResActivationCache
from .compat import HookedRootModule, HookPoint
from .components import (
    Attention,
    Embed,
    GatedMLP,
    HeadInputs,
    KVCacheEntry,
    RMSNorm,
    SequenceContext,
    Unembed,
    per_head,
    rotary_cos_sin,
)
from .config import AttnResConfig, RoutingSchedule
from .metrics import next_token_loss
from .names import ALIASED_HOOKS, RouterId
from .refusals import (
    HookDict,
    PartialStatePatchWarning,
    missing_hook_error,
    no_bos_message,
    partial_patch_message,
)
from .router import DepthRouter, RouterSpec
from .scheme import RoutingScheme
from .selection import copies_of, duplicate_of
from .sequence import is_right_padded, leading_pad_mask, padded_causal_mask, positions_from_mask
from .tokenizer import ByteTokenizer
from .weights import TLWeights

TokensLike = Union[str, list[str], Tensor]
RETURN_TYPES = ("logits", "loss", "both", None)
#: The two sublayers of a block, in forward order (``k % 2`` indexes them).
SUBLAYER_NAMES: tuple[str, str] = ("attn", "mlp")


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

    def closed(self) -> "DepthState":
        """The state with its in-progress source stored as completed (a block closes)."""
        if self.current is None:
            return self
        return DepthState(self.completed + (self.current,), None)

    def from_position(self, first: int) -> "DepthState":
        """The state of positions ``first ..`` only (every source sliced along positions).

        Routers, norms and MLPs act on each position alone, so this is the state the model
        would hold at those positions; only attention also reads earlier positions (see
        :meth:`HookedAttnResTransformer.run_from_position`)."""
        if first == 0:
            return self
        cut = lambda t: t[:, first:]  # noqa: E731
        return DepthState(tuple(cut(t) for t in self.completed), None if self.current is None else cut(self.current))


class AttnResBlock(nn.Module):
    """One layer: an attention sublayer and an MLP sublayer, each reading through its router.

    The block runs as a module: ``block(state, seq)`` takes the :class:`DepthState` before its
    attention router and returns the state after its MLP (``sublayers=("attn",)`` or
    ``("mlp",)`` runs one of them, which is how the model resumes from any sublayer), so torch
    forward hooks and nnsight's ``blocks[l].output`` see a :class:`DepthState`.

    Hooks: ``hook_attn_in``/``hook_mlp_in`` (the routed input, before ``ln1``/``ln2``) and
    ``hook_attn_out``/``hook_mlp_out`` (the sublayer outputs). Layouts whose current source is
    a true additive residual (``scheme.has_residual_stream``: cumulative) also have
    ``hook_resid_pre``/``hook_resid_mid``/``hook_resid_post`` on it (``resid_mid = resid_pre +
    attn_out``). Kimi models have no such stream, so they expose no ``hook_resid_*``.

    :meth:`step` runs the scheme's :class:`~attnres_lens.scheme.StepProgram` for one sublayer on
    tensors: close block, route + run the sublayer (:meth:`sublayer`), accumulate, snapshot.
    """

    #: TL 4's logit lens reads ``hook_resid_post`` of the last block as the stream ``ln_final``
    #: reads; that holds for the cumulative flavour only (set per instance below).
    hook_out_is_single_residual_stream = False

    def __init__(self, cfg: AttnResConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.scheme = cfg.scheme
        self.attn_router = new_router(cfg)
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_router = new_router(cfg)
        self.ln2 = RMSNorm(cfg.d_model, cfg.eps)
        self.mlp = GatedMLP(cfg)
        self.hook_attn_in = HookPoint()
        # TL's split-qkv inputs [batch, pos, head, d_model]; fire with cfg.use_split_qkv_input
        self.hook_q_input = HookPoint()
        self.hook_k_input = HookPoint()
        self.hook_v_input = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_mlp_in = HookPoint()
        self.hook_mlp_out = HookPoint()
        if self.scheme.has_residual_stream:
            self.hook_resid_pre = HookPoint()
            self.hook_resid_mid = HookPoint()
            self.hook_resid_post = HookPoint()
            self.hook_out_is_single_residual_stream = True

    def forward(
        self, state: DepthState, seq: SequenceContext, sublayers: tuple[str, ...] = ("attn", "mlp")
    ) -> DepthState:
        """Run this layer's ``sublayers`` (in order) from ``state``."""
        for sublayer in sublayers:
            if sublayer not in ("attn", "mlp"):
                raise ValueError(f"sublayers must hold 'attn' and/or 'mlp', got {sublayers!r}")
            state = self.step(2 * self.layer + (sublayer == "mlp"), state, seq)
        return state

    def step(self, k: int, state: DepthState, seq: SequenceContext) -> DepthState:
        """Sublayer ``k`` (``2 * layer`` or ``2 * layer + 1``): the scheme's program on tensors."""
        program = self.scheme.program[k]
        is_attn = k % 2 == 0
        if program.close_block:
            state = state.closed()
        if self.scheme.has_residual_stream and is_attn:
            state = self._hooked_resid_pre(state, has_history=k > 0)
        out = self.sublayer(k, state.sources(), seq)
        current = out if state.current is None else state.current + out  # accumulate
        if self.scheme.has_residual_stream:
            hook = self.hook_resid_mid if is_attn else self.hook_resid_post
            current = self._stream_hook(hook, current, has_history=True)
        return DepthState(state.completed + ((current,) if program.snapshot else ()), current)

    def _hooked_resid_pre(self, state: DepthState, has_history: bool) -> DepthState:
        """The stream through ``hook_resid_pre``. A snapshot taken just before (block start; the
        embedding at layer 0) is the same tensor as the stream: a hook that replaced it replaces
        it there too, so patching resid_pre[l] means what patching resid_post[l-1] means."""
        x = self._stream_hook(self.hook_resid_pre, state.current, has_history)
        return DepthState(tuple(x if source is state.current else source for source in state.completed), x)

    def _stream_hook(self, hook: HookPoint, x: Tensor, has_history: bool) -> Tensor:
        """Run a ``hook_resid_*`` point; when a hook edits the stream (a new tensor or an
        in-place write) and older snapshots exist that the edit cannot reach, warn once (per
        call site) with the depth-state call (``docs/hooks.md``, "Patching the residual")."""
        version = x._version
        out = hook(x)
        if has_history and (out is not x or x._version != version):
            warnings.warn(partial_patch_message(hook.name or "hook_resid"), PartialStatePatchWarning, stacklevel=2)
        return out

    def sublayer(self, k: int, sources: list[Tensor], seq: SequenceContext) -> Tensor:
        """Route ``sources`` into sublayer ``k`` of this layer and run it: its output ``o_k``."""
        router = self.attn_router if k % 2 == 0 else self.mlp_router
        return self.routed_sublayer(k, router(sources), seq)

    def attn_input(self, h: Tensor) -> Union[Tensor, HeadInputs]:
        """What the attention reads, normed by ``ln1``: ``hook_attn_in`` ``[batch, pos,
        d_model]``; per head under TL's ``use_split_qkv_input`` (``hook_q_input``/``hook_k_input``/
        ``hook_v_input``) or ``use_attn_in`` (``hook_attn_in`` ``[batch, pos, head, d_model]``)."""
        cfg, attn = self.cfg, self.attn
        if cfg.use_split_qkv_input:
            return HeadInputs(
                self.ln1(self.hook_q_input(per_head(h, attn.n_heads))),
                self.ln1(self.hook_k_input(per_head(h, attn.n_kv))),
                self.ln1(self.hook_v_input(per_head(h, attn.n_kv))),
            )
        if getattr(cfg, "use_attn_in", False):
            heads = self.ln1(self.hook_attn_in(per_head(h, attn.n_heads)))
            return HeadInputs(heads, heads, heads)
        return self.ln1(self.hook_attn_in(h))

    def routed_sublayer(self, k: int, h: Tensor, seq: SequenceContext) -> Tensor:
        """Sublayer ``k`` from its routed input ``h`` (what the router's ``hook_out`` holds):
        ``hook_{attn,mlp}_in`` -> norm -> sublayer -> ``hook_{attn,mlp}_out``. The forward and
        the estimators (which reroute under an intervention) both run sublayers through here."""
        if k % 2 == 0:
            kv = seq.kv_cache[self.layer] if seq.kv_cache is not None else None
            return self.hook_attn_out(self.attn(self.attn_input(h), seq.cos, seq.sin, seq.attn_mask, kv))
        return self.hook_mlp_out(self.mlp(self.ln2(self.hook_mlp_in(h))))


class HookedAttnResTransformer(TLWeights, HookedRootModule):
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
        self.embed = Embed(cfg.d_vocab, cfg.d_model)
        self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(AttnResBlock(cfg, layer) for layer in range(cfg.n_layers))
        #: The routing layout (:mod:`attnres_lens.scheme`): the one place it is stated.
        self.scheme: RoutingScheme = cfg.scheme
        self.final_router = new_router(cfg) if self.scheme.has_final_router else None
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab, bias=False)
        if cfg.tie_word_embeddings:
            self.unembed.weight = self.embed.weight
        #: How the routing was set when a plain Qwen3 was wrapped (see ``attnres_lens.loading``).
        self.schedule = RoutingSchedule()
        #: Which checkpoint format the weights came from ("fresh" when built from a config).
        self.checkpoint_format = "fresh"
        self._rotary_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._sequence: Optional[SequenceContext] = None  # set while a forward runs
        self._router_specs = self.scheme.layout()
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
        for spec in self._router_specs:
            if spec.sublayer != "final":
                for what in ALIASED_HOOKS:
                    self.hook_aliases[spec.id.alias(what)] = spec.id.hook(what)
        if self.scheme.has_residual_stream:  # TL 4's block names for the stream
            for block in self.blocks:
                self.hook_aliases[f"blocks.{block.layer}.hook_in"] = f"blocks.{block.layer}.hook_resid_pre"
                self.hook_aliases[f"blocks.{block.layer}.hook_out"] = f"blocks.{block.layer}.hook_resid_post"
        for alias, canonical in self.hook_aliases.items():
            self.mod_dict[alias] = self.mod_dict[canonical]
        # A name that is not a hook of this flavour is refused with the one message that
        # run_with_hooks, add_hook, the cache and the bridge share (attnres_lens.refusals).
        self.mod_dict = HookDict(self.mod_dict, self.cfg.flavour, self.cfg.n_layers)
        self.hook_dict = HookDict(self.hook_dict, self.cfg.flavour, self.cfg.n_layers)

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
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        fold_value_biases: bool = False,
        refactor_factored_attn_matrices: bool = False,
        check_finite: bool = True,
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
        TransformerLens' weight-processing keywords (``fold_ln``, ``center_writing_weights``,
        ``center_unembed``, ``fold_value_biases``, ``refactor_factored_attn_matrices``; all off
        by default) are applied where exact and otherwise refused with ``ValueError`` before
        anything is read (see :meth:`process_weights_`). A checkpoint with NaN or inf weights is
        refused, naming them; ``check_finite=False`` loads it anyway (``model.non_finite_keys``
        then names them).
        """
        from .loading import read_checkpoint

        processing = dict(
            fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
            fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )
        cls.check_weight_processing(**processing)

        model = read_checkpoint(
            source,
            flavour=flavour,
            schedule=schedule,
            recency_bias=recency_bias,
            n_blocks=n_blocks,
            dtype=dtype,
            device=device,
            tokenizer=tokenizer,
            check_finite=check_finite,
        ).into(cls)
        if any(processing.values()):
            model.process_weights_(**processing)
        return model

    def save_pretrained(self, directory: Any, *, max_shard_size: Union[int, str, None] = None) -> Any:
        """Write ``config.json`` + safetensors in the ``qwen3_attnres`` layout of this model's
        flavour (loadable by that flavour's original codebase), plus this library's metadata
        (schedule, routing mode) under the ``attnres_lens`` config key."""
        from .loading import save_pretrained

        return save_pretrained(self, directory, max_shard_size=max_shard_size)

    @property
    def layers(self) -> nn.ModuleList:
        """``blocks`` under the Hugging Face Qwen3 name, for recipes that walk
        ``model.model.layers[i]`` (nnsight): the same module list, not a second registration."""
        return self.blocks

    # ---------------------------------------------------------------------- routing layout
    @property
    def router_specs(self) -> list[RouterSpec]:
        """Every router with its sources, in forward order."""
        return list(self._router_specs)

    def router_id(self, router: Any) -> RouterId:
        """The :class:`~attnres_lens.names.RouterId` of one of this model's routers, from any
        form :meth:`RouterId.parse` accepts (``UnknownRouterError``, a ``KeyError``, otherwise)."""
        return RouterId.parse(router, [spec.id for spec in self._router_specs])

    def router_spec(self, router: Any) -> RouterSpec:
        """The :class:`~attnres_lens.router.RouterSpec` (sources included) of ``router``, in any
        form :meth:`router_id` accepts."""
        rid = self.router_id(router)
        return next(spec for spec in self._router_specs if spec.id == rid)

    def router(self, name: Any) -> DepthRouter:
        """The router module ``name`` (``"blocks.2.mlp_router"``, ``(2, "mlp")``, a hook name, ...)."""
        return self.get_submodule(self.router_id(name).name)

    def routers(self) -> list[tuple[RouterSpec, DepthRouter]]:
        return [(spec, self.get_submodule(spec.name)) for spec in self._router_specs]

    def source_table(self) -> pd.DataFrame:
        """One row per (router, source): ``router`` (hook prefix), ``layer`` (None for final),
        ``sublayer``, ``source`` (index), ``family``, ``label``, ``duplicate_of`` (the index of
        the first source of the router holding the same tensor, from the layout; ``<NA>`` for a
        first holder) and ``n_copies`` (how many sources hold that tensor). Plots,
        interventions and reports name slices from this table."""
        duplicates = duplicate_of(self._router_specs)
        rows = [
            {
                "router": spec.name,
                "layer": spec.layer,
                "sublayer": spec.sublayer,
                "source": src.index,
                "family": src.family,
                "label": src.label,
                "duplicate_of": duplicates[spec.name][src.index],
                "n_copies": len(copies_of(duplicates[spec.name], src.index)),
            }
            for spec in self._router_specs
            for src in spec.sources
        ]
        columns = ["router", "layer", "sublayer", "source", "family", "label", "duplicate_of", "n_copies"]
        table = pd.DataFrame(rows, columns=columns)
        table["layer"] = table["layer"].astype("Int64")
        table["duplicate_of"] = table["duplicate_of"].astype("Int64")
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

    def sequence_context(
        self,
        n_pos: int,
        device: torch.device,
        attention_mask: Optional[Tensor] = None,
        kv_cache: Optional[list[KVCacheEntry]] = None,
    ) -> SequenceContext:
        """Rotary tables and mask for ``n_pos`` new positions.

        ``attention_mask`` is ``[batch, past + n_pos]`` (1 = real token) and covers the cached
        positions too. Right padding (or no mask) and no cache use the fused causal kernel;
        otherwise positions count real tokens only and an explicit mask hides pad keys."""
        past = kv_cache[0].n_pos if kv_cache else 0
        if attention_mask is not None and is_right_padded(attention_mask):
            attention_mask = None
        if attention_mask is None and past == 0:
            cos, sin = self.rotary(n_pos, device)
            return SequenceContext(cos, sin, None, kv_cache)
        if attention_mask is None:
            positions = torch.arange(past, past + n_pos, device=device)[None]
        else:
            if attention_mask.shape[-1] != past + n_pos:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} positions, but {past} are "
                    f"cached and {n_pos} are new"
                )
            attention_mask = attention_mask.to(device)
            positions = positions_from_mask(attention_mask, n_pos)
        cos, sin = self.rotary(past + n_pos, device)
        mask = padded_causal_mask(attention_mask, n_pos, past + n_pos, device)
        return SequenceContext(cos[positions], sin[positions], mask, kv_cache)

    @contextlib.contextmanager
    def _running(self, seq: SequenceContext):
        """Make ``seq`` the context of :meth:`step`/:meth:`run_from` for one forward."""
        previous, self._sequence = self._sequence, seq
        try:
            yield
        finally:
            self._sequence = previous

    def _context_for(self, state: DepthState) -> SequenceContext:
        if self._sequence is not None:
            return self._sequence
        first = state.sources()[0]
        return self.sequence_context(first.shape[1], first.device)

    def initial_state(self, tokens: Int[Tensor, "batch pos"]) -> DepthState:
        """Embed ``tokens``: the state before the first sublayer."""
        emb = self.hook_embed(self.embed(tokens))
        return DepthState(completed=(emb,) if self.scheme.snapshots_embedding else (), current=emb)

    def step(self, k: int, state: DepthState) -> DepthState:
        """Run sublayer ``k`` (``attn_{k//2}`` if ``k`` is even, else ``mlp_{k//2}``)."""
        return self.blocks[k // 2](state, self._context_for(state), (SUBLAYER_NAMES[k % 2],))

    def final_input(self, state: DepthState) -> Tensor:
        """What the final norm reads: the final router's output (kimi) or the stream (cumulative):
        the last step of the scheme's program (close block, route), or the current source."""
        if not self.scheme.has_final_router:
            return state.current
        if self.scheme.program[-1].close_block:
            state = state.closed()
        return self.final_router(state.sources())

    def readout(self, state: DepthState) -> Float[Tensor, "batch pos d_vocab"]:
        return self.unembed(self.ln_final(self.final_input(state)))

    def run_from(
        self, state: DepthState, start: int = 0, stop: Optional[int] = None
    ) -> DepthState:
        """Run sublayers ``start .. stop-1`` from ``state``, one block call per layer."""
        stop = self.cfg.n_sublayers if stop is None else stop
        seq = self._context_for(state)
        k = start
        while k < stop:
            layer, first = divmod(k, 2)
            last = min(2, stop - 2 * layer)
            state = self.blocks[layer](state, seq, SUBLAYER_NAMES[first:last])
            k = 2 * layer + last
        return state

    def states(
        self, tokens: Int[Tensor, "batch pos"], kv_cache: Optional[list[KVCacheEntry]] = None
    ) -> list[DepthState]:
        """The :class:`DepthState` before every sublayer and after the last (``n_sublayers + 1``
        states) of one forward on ``tokens`` (no padding). With ``kv_cache`` (one empty
        :class:`~attnres_lens.components.KVCacheEntry` per layer) every layer's keys and values
        are kept there, for :meth:`run_from_position`."""
        tokens = self.validate_tokens(tokens)
        if kv_cache is not None and (len(kv_cache) != self.cfg.n_layers or any(e.n_pos for e in kv_cache)):
            raise ValueError(f"kv_cache must hold {self.cfg.n_layers} empty KVCacheEntry objects, one per layer")
        seq = self.sequence_context(tokens.shape[1], tokens.device, kv_cache=kv_cache)
        with self._running(seq):
            states = [self.initial_state(tokens)]
            for k in range(self.cfg.n_sublayers):
                states.append(self.step(k, states[-1]))
        return states

    def run_from_position(
        self,
        state: DepthState,
        start: int,
        first_position: int,
        past_kv: list[KVCacheEntry],
        stop: Optional[int] = None,
    ) -> DepthState:
        """Run sublayers ``start .. stop-1`` for positions ``first_position ..`` only.

        ``state`` holds those positions (``DepthState.from_position``); ``past_kv`` holds, per
        layer, the keys and values of positions ``0 .. first_position - 1`` (of the layers from
        ``start``'s on): :class:`~attnres_lens.components.KVCacheEntry` objects (extended in
        place, as in generation) or :class:`~attnres_lens.components.SharedPrefixKV` (for
        stacked copies of a batch; left as they are). Rotary
        angles are those of the true positions. When nothing before ``first_position`` differs
        from the run the keys and values came from, the result equals that run's state sliced
        to ``first_position ..`` (routing, norms and MLPs are per position)."""
        if len(past_kv) != self.cfg.n_layers or any(e.n_pos != first_position for e in past_kv):
            raise ValueError(
                f"past_kv must hold {self.cfg.n_layers} entries (one per layer) of {first_position} "
                f"positions each, got {[e.n_pos for e in past_kv]}"
            )
        first = state.sources()[0]
        seq = self.sequence_context(first.shape[1], first.device, kv_cache=past_kv)
        with self._running(seq):
            return self.run_from(state, start, stop)

    def stream_of(self, state: DepthState) -> Float[Tensor, "batch pos d_model"]:
        """What ``forward(..., stop_at_layer=L)`` returns. Cumulative: the residual stream ``x``
        (TransformerLens' meaning). Kimi: the sum of all sources, i.e. embedding plus every
        sublayer output so far: the stream a vanilla residual model would hold (no router
        reads it; a zero-query router reads it divided by the number of sources)."""
        if self.scheme.has_residual_stream:
            return state.current
        return torch.stack(state.sources(), dim=0).sum(dim=0)

    # ---------------------------------------------------------------------- forward
    def forward(
        self,
        input: Union[TokensLike, DepthState],
        return_type: Optional[str] = "logits",
        loss_per_token: bool = False,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        start_at_layer: Optional[int] = None,
        tokens: Optional[Tensor] = None,
        stop_at_layer: Optional[int] = None,
        attention_mask: Optional[Tensor] = None,
        past_kv_cache: Optional[list[KVCacheEntry]] = None,
    ) -> Any:
        """Run the model; the arguments are TransformerLens' ``HookedTransformer.forward``'s.

        Args:
            input: a string, a list of strings (tokenised and padded on ``padding_side``) or
                integer tokens ``[batch, pos]`` (or ``[pos]``). With ``start_at_layer`` it is the
                :class:`DepthState` before that layer (from ``stop_at_layer=L,
                return_type="state"``): a residual tensor alone cannot restart a routed model,
                whose routers also read earlier sources.
            return_type: ``"logits"``, ``"loss"`` (mean next-token cross-entropy), ``"both"``,
                ``None``, or (only with ``stop_at_layer``) ``"state"``.
            loss_per_token: the loss per token ``[batch, pos - 1]`` instead of its mean.
            prepend_bos: as in :meth:`to_tokens`, for string input.
            padding_side: as in :meth:`to_tokens`, for string input. With token input,
                ``padding_side="left"`` (or a left-padding tokenizer) derives the attention mask
                from the leading pad tokens, as TransformerLens does.
            start_at_layer: run layers ``start_at_layer ..`` from the state ``input``; pass
                ``tokens`` for a loss.
            stop_at_layer: run layers ``.. stop_at_layer - 1`` (negative counts from the end)
                and return :meth:`stream_of` the state (cumulative: the residual stream after
                block ``stop_at_layer - 1``, as TL), or the state itself with
                ``return_type="state"``.
            attention_mask: ``[batch, pos]``, 1 for real tokens. Right padding is exact with the
                causal kernel; left padding shifts positions and masks pad keys, so real tokens
                compute what they compute unpadded. Padded targets are left out of the loss.
            past_kv_cache: one :class:`~attnres_lens.components.KVCacheEntry` per layer (used by
                :meth:`generate`); it is extended in place.
        """
        start, stop = self._layer_range(start_at_layer, stop_at_layer, return_type)
        if start_at_layer is not None:
            if not isinstance(input, DepthState):
                raise TypeError(
                    f"with start_at_layer, input must be the DepthState before layer {start} "
                    "(model(tokens, stop_at_layer=L, return_type='state')), got "
                    f"{type(input).__name__}"
                )
            state, n_pos = input, input.sources()[0].shape[1]
            device = input.sources()[0].device
            if tokens is not None:
                tokens = self.validate_tokens(tokens)
        else:
            n_past = past_kv_cache[0].n_pos if past_kv_cache else 0
            tokens, attention_mask = self._tokens_and_mask(input, prepend_bos, padding_side, attention_mask, n_past)
            state, n_pos, device = None, tokens.shape[1], tokens.device
        if attention_mask is None and tokens is not None and self._pads_left(padding_side):
            attention_mask = leading_pad_mask(tokens, self.pad_token_id)
        loss_mask = _target_mask(attention_mask, n_pos)
        seq = self.sequence_context(n_pos, device, attention_mask, past_kv_cache)
        with self._running(seq):
            if state is None:
                state = self.initial_state(tokens)
            state = self.run_from(state, 2 * start, 2 * stop)
            if stop_at_layer is not None:
                return state if return_type == "state" else self.stream_of(state)
            logits = self.readout(state)
        if return_type is None:
            return None
        if return_type == "logits":
            return logits
        if tokens is None:
            raise ValueError(f"return_type={return_type!r} from a DepthState needs tokens= for the loss")
        loss = self.loss_fn(logits, tokens, attention_mask=loss_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _layer_range(
        self, start_at_layer: Optional[int], stop_at_layer: Optional[int], return_type: Optional[str]
    ) -> tuple[int, int]:
        n = self.cfg.n_layers
        if return_type not in RETURN_TYPES and not (return_type == "state" and stop_at_layer is not None):
            raise ValueError(
                f"return_type must be one of {RETURN_TYPES} (or 'state' with stop_at_layer), got "
                f"{return_type!r}"
            )
        bounds = {}
        for name, value, default in (("start_at_layer", start_at_layer, 0), ("stop_at_layer", stop_at_layer, n)):
            if value is None:
                bounds[name] = default
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not -n <= value <= n:
                raise ValueError(f"{name} must be an int in [-{n}, {n}] (n_layers={n}), got {value!r}")
            bounds[name] = value + n if value < 0 else value
        start, stop = bounds["start_at_layer"], bounds["stop_at_layer"]
        if start > stop:
            raise ValueError(f"start_at_layer={start_at_layer} is after stop_at_layer={stop_at_layer}")
        return start, stop

    def _tokens_and_mask(
        self,
        input: Any,
        prepend_bos: Optional[bool],
        padding_side: Optional[str],
        attention_mask: Optional[Tensor],
        n_past: int = 0,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if isinstance(input, (str, list)):
            tokens, mask = self.to_tokens(
                input, prepend_bos=prepend_bos, padding_side=padding_side, return_attention_mask=True
            )
            return tokens, mask if attention_mask is None else attention_mask
        tokens = self.validate_tokens(input)
        if attention_mask is not None:
            expected = (tokens.shape[0], n_past + tokens.shape[1])
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"attention_mask must have shape {expected} ([batch, cached + new positions]), "
                    f"got {tuple(attention_mask.shape)}"
                )
            attention_mask = attention_mask.to(tokens.device)
        return tokens, attention_mask

    def _pads_left(self, padding_side: Optional[str]) -> bool:
        side = padding_side if padding_side is not None else getattr(self.tokenizer, "padding_side", "right")
        return side == "left"

    @property
    def pad_token_id(self) -> int:
        """The id padding uses: the tokenizer's ``pad_token_id``, else 0."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else int(pad)

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
    def run_with_cache(
        self, *model_args: Any, names_filter: Any = None, return_cache_object: bool = True, **kwargs: Any
    ):
        """Like ``HookedTransformer.run_with_cache``: returns ``(output, cache)``, the cache an
        :class:`~attnres_lens.cache.AttnResActivationCache` (routing-aware; see
        ``docs/hooks.md``). Forward arguments (``stop_at_layer=``, ``prepend_bos=``, ...) pass
        through.

        ``names_filter`` may use the block-level aliases; the cache holds them as keys too
        (same tensors, no copies)."""
        names_filter = self._expand_alias_filter(names_filter)
        backward_hooks = any(hp.bwd_hooks for hp in self.hook_dict.values())
        out, cache_dict = super().run_with_cache(*model_args, names_filter=names_filter, **kwargs)
        for alias, canonical in self.hook_aliases.items():
            for suffix in ("", "_grad"):
                if canonical + suffix in cache_dict:
                    cache_dict[alias + suffix] = cache_dict[canonical + suffix]
        if not return_cache_object:
            return out, cache_dict
        has_batch_dim = not kwargs.get("remove_batch_dim", False)
        cache = AttnResActivationCache(cache_dict, self, has_batch_dim=has_batch_dim)
        cache.recorded_with_backward_hooks = backward_hooks
        return out, cache

    def _expand_alias_filter(self, names_filter: Any) -> Any:
        if names_filter is None:
            return None
        canonical_to_alias = {c: a for a, c in self.hook_aliases.items()}
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, (list, tuple)):
            unknown = [n for n in names_filter if n not in self.mod_dict]
            if unknown:
                raise missing_hook_error(unknown[0], self.cfg.flavour, self.cfg.n_layers)
            return [self.hook_aliases.get(n, n) for n in names_filter]
        if callable(names_filter):
            user_filter = names_filter
            return lambda name: bool(user_filter(name)) or (
                name in canonical_to_alias and bool(user_filter(canonical_to_alias[name]))
            )
        raise ValueError("names_filter must be None, a string, a list of strings, or a function")

    # ---------------------------------------------------------------------- TL's hook switches
    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """TL's switch: ``blocks.{l}.attn.hook_result`` ``[batch, pos, head, d_model]`` fires with
        each head's write ``z_h @ W_O[h]``, and the heads sum to ``hook_attn_out``."""
        self.cfg.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """TL's switch: each head reads its own copy of the routed input, hooked as
        ``blocks.{l}.hook_q_input`` ``[batch, pos, head, d_model]`` and ``hook_k_input``/
        ``hook_v_input`` ``[batch, pos, kv_head, d_model]`` (before ``ln1``, as TL)."""
        if use_split_qkv_input and getattr(self.cfg, "use_attn_in", False):
            raise ValueError("use_split_qkv_input and use_attn_in are mutually exclusive: call set_use_attn_in(False) first")
        self.cfg.use_split_qkv_input = bool(use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """TL's switch: ``blocks.{l}.hook_attn_in`` fires per head, ``[batch, pos, head,
        d_model]`` (each head's copy of the routed input, before ``ln1``). Refused on
        grouped-query models, whose key/value heads are shared by several query heads (use
        :meth:`set_use_split_qkv_input`)."""
        if use_attn_in and self.cfg.use_split_qkv_input:
            raise ValueError("use_attn_in and use_split_qkv_input are mutually exclusive: call set_use_split_qkv_input(False) first")
        if use_attn_in and self.cfg.n_key_value_heads not in (None, self.cfg.n_heads):
            raise ValueError(
                f"use_attn_in needs one input per head, and this grouped-query model shares each of its "
                f"{self.cfg.n_key_value_heads} key/value heads between {self.cfg.n_heads // self.cfg.n_key_value_heads} "
                "query heads; use set_use_split_qkv_input(True) (hook_q_input per query head, "
                "hook_k_input/hook_v_input per key/value head)"
            )
        self.cfg.use_attn_in = bool(use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """TL's switch for ``blocks.{l}.hook_mlp_in``. That hook (the routed MLP input, before
        ``ln2``) always fires here, so this only records the setting."""
        self.cfg.use_hook_mlp_in = bool(use_hook_mlp_in)

    def set_materialize_patterns(self, on: bool = True) -> None:
        """Build every attention pattern (``attn.hook_pattern``/``hook_attn_scores``) even when
        no TransformerLens hook is attached, for tools that use plain torch hooks (nnsight).
        Off by default: the fused kernel is faster and never builds the pattern."""
        for block in self.blocks:
            block.attn.materialize_pattern = bool(on)

    def set_materialize_norm_scales(self, on: bool = True) -> None:
        """Compute every RMSNorm's ``hook_scale`` even when no TransformerLens hook is attached
        (for plain torch hooks). Off by default (Hugging Face's exact ``rsqrt`` arithmetic)."""
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.materialize_scale = bool(on)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "HookedAttnResTransformer":
        """Keep ``cfg.device``/``cfg.dtype`` true after ``.to()``/``.half()``/``.cuda()``/``.cpu()``
        (every one of them goes through ``nn.Module._apply``)."""
        out = super()._apply(fn, *args, **kwargs)
        weight = self.embed.weight
        if weight.device.type != "meta":
            self.cfg.device = str(weight.device)
        self.cfg.dtype = weight.dtype
        return out

    # ---------------------------------------------------------------------- tokens
    def to_tokens(
        self,
        input: Union[str, list[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        move_to_device: bool = True,
        truncate: bool = True,
        return_attention_mask: bool = False,
    ):
        """Tokenise ``input`` into ``[batch, pos]``, padded with the pad id on ``padding_side``
        (default: the tokenizer's, ``"right"`` for the byte tokenizer), as TransformerLens'
        ``to_tokens``. ``truncate`` cuts each row to ``n_ctx``; ``move_to_device`` puts the tokens on
        the model's device (else CPU).

        With ``return_attention_mask=True`` also returns the ``[batch, pos]`` mask (1 = real)."""
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"to_tokens takes a str or a non-empty list of str, got {type(input).__name__}")
        side = padding_side if padding_side is not None else getattr(self.tokenizer, "padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if prepend_bos and bos is None:
            raise ValueError(no_bos_message(getattr(self.tokenizer, "name_or_path", type(self.tokenizer).__name__)))
        seqs = []
        for text in texts:
            ids = list(self._encode(text))
            if prepend_bos and bos is not None:
                ids = [bos] + ids
            if truncate:
                ids = ids[: self.cfg.n_ctx]
            seqs.append(ids)
        empty = [i for i, ids in enumerate(seqs) if not ids]
        if empty:
            which = f"the string {texts[0]!r}" if isinstance(input, str) else (
                f"input[{empty[0]}] ({texts[empty[0]]!r})" + (f" and {len(empty) - 1} more" if len(empty) > 1 else "")
            )
            raise ValueError(f"{which} tokenises to zero tokens; every prompt needs at least one token")
        width = max(len(s) for s in seqs)
        tokens = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, ids in enumerate(seqs):
            cols = slice(width - len(ids), width) if side == "left" else slice(0, len(ids))
            tokens[i, cols] = torch.tensor(ids, dtype=torch.long)
            mask[i, cols] = 1
        if move_to_device:
            tokens, mask = tokens.to(self.embed.weight.device), mask.to(self.embed.weight.device)
        return (tokens, mask) if return_attention_mask else tokens

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def to_string(self, tokens: Union[Tensor, list[int]]) -> Union[str, list[str]]:
        """Decode ``[pos]`` tokens to a string, or ``[batch, pos]`` to a list of strings."""
        if isinstance(tokens, Tensor) and tokens.ndim == 2:
            return [self.to_string(row) for row in tokens]
        if isinstance(tokens, Tensor):
            tokens = tokens.tolist()
        return self.tokenizer.decode(tokens)

    def to_str_tokens(
        self,
        input: Union[str, list[str], Tensor, list[int]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> Union[list[str], list[list[str]]]:
        """One string per token, as TransformerLens: a str or ``[pos]``/``[1, pos]`` tokens give
        ``list[str]``; a list of str or ``[batch, pos]`` tokens give one list per row (each
        string tokenised on its own, so without padding)."""
        if isinstance(input, list) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(text, prepend_bos=prepend_bos) for text in input]
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        if isinstance(input, Tensor):
            if input.ndim == 2 and input.shape[0] != 1:
                return [self.to_str_tokens(row) for row in input]
            input = input.reshape(-1).tolist()
        if not isinstance(input, list) or not all(isinstance(i, int) for i in input):
            raise TypeError(
                "to_str_tokens takes a str, a list of str, a list of int or an integer tensor, got "
                f"{type(input).__name__}"
            )
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.convert_ids_to_tokens(input)
        return [self.tokenizer.decode([i]) for i in input]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS); ``ValueError`` otherwise."""
        tokens = self.to_tokens(string, prepend_bos=False)[0]
        if tokens.numel() != 1:
            raise ValueError(f"{string!r} is {tokens.numel()} tokens, not a single token: use to_tokens")
        return int(tokens.item())

    def to_single_str_token(self, int_token: int) -> str:
        if isinstance(int_token, bool) or not isinstance(int_token, int):
            raise TypeError(f"int_token must be an int, got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(
        self,
        single_token: Union[str, int, Tensor],
        input: Union[str, Tensor],
        mode: str = "first",
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> int:
        """Position of ``single_token`` in ``input`` (a str or ``[pos]``/``[1, pos]`` tokens), as TL."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        if input.ndim == 2:
            if input.shape[0] != 1:
                raise ValueError(f"rank-2 tokens must have shape [1, pos], got {tuple(input.shape)}")
            input = input[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token.item())
        hits = (input == single_token).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"token {single_token} does not occur in the input")
        return int(hits[0] if mode == "first" else hits[-1])

    def generate(
        self,
        input: Union[str, list[str], Tensor] = "",
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
        """Sample (or, with ``do_sample=False`` or ``temperature=0``, greedily pick) up to
        ``max_new_tokens`` tokens; TransformerLens' arguments and defaults. See
        :func:`attnres_lens.generation.generate`."""
        from .generation import generate

        return generate(
            self, input, max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos,
            eos_token_id=eos_token_id, do_sample=do_sample, top_k=top_k, top_p=top_p,
            temperature=temperature, freq_penalty=freq_penalty, use_past_kv_cache=use_past_kv_cache,
            prepend_bos=prepend_bos, padding_side=padding_side, return_type=return_type,
            verbose=verbose, seed=seed,
        )

    # ---------------------------------------------------------------------- conveniences
    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"flavour={c.flavour!r}, routing_mode={c.routing_mode!r}, "
            f"n_layers={c.n_layers}, layers_per_block={c.layers_per_block}, d_model={c.d_model}, "
            f"schedule={self.schedule.kind!r}"
        )


def new_router(cfg: AttnResConfig) -> DepthRouter:
    """The router module of one routed read, of the class the layout asks for."""
    return cfg.scheme.router_class(cfg.d_model, cfg.eps, cfg.router_bias, cfg.recency_bias_init)


def _target_mask(attention_mask: Optional[Tensor], n_pos: int) -> Optional[Tensor]:
    """The mask the loss uses: target ``i`` counts when it and the token predicting it are real
    (with left padding the first real token has a pad before it)."""
    if attention_mask is None:
        return None
    mask = attention_mask[:, -n_pos:].clone()
    mask[:, 1:] = mask[:, 1:] * mask[:, :-1]
    return mask
