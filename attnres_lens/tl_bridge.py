"""TransformerLens 4's ``TransformerBridge`` for ``qwen3_attnres`` checkpoints (see ``docs/tl4_bridge.md``).

TL 4 loads every model with ``TransformerBridge.boot_transformers(name_or_dir)``: it builds the
Hugging Face model (here :class:`attnres_lens.hf.Qwen3AttnResForCausalLM`, whose ``model`` child
*is* a :class:`~attnres_lens.model.HookedAttnResTransformer`) and wraps its submodules in
component bridges chosen by an architecture adapter. :class:`AttnResArchitectureAdapter` is that
adapter. Its bridges run this library's modules unchanged and expose the hook points those
modules already own, so the bridge and ``HookedAttnResTransformer`` fire the same hooks on the
same tensors:

- ``blocks.{l}.attn_router`` / ``blocks.{l}.mlp_router`` / ``final_router`` (kimi):
  ``hook_sources``, ``hook_logits``, ``hook_weights``, ``hook_out`` (``docs/concepts.md``);
- TL's sublayer hooks with TL's meanings: ``hook_embed``, ``blocks.{l}.hook_attn_in`` /
  ``hook_attn_out`` / ``hook_mlp_in`` / ``hook_mlp_out``, ``blocks.{l}.attn.hook_{q,k,v,z,
  pattern,attn_scores}``, ``blocks.{l}.mlp.hook_{pre,pre_linear,post}``, ``ln1``/``ln2``/
  ``ln_final`` ``hook_scale``/``hook_normalized``, every component's ``hook_in``/``hook_out``;
- cumulative only: ``blocks.{l}.hook_resid_pre/mid/post`` (the true residual stream; the block's
  ``hook_in``/``hook_out``). Kimi blocks have no single residual stream: they are marked
  ``hook_out_is_single_residual_stream = False`` and carry no resid hooks, as TL's DeepSeek-V4
  adapter does, so TL's stream tools (logit lens, ``accumulated_resid``) refuse them.

Registration. ``import attnres_lens`` registers the Hugging Face classes with ``transformers``'
Auto classes and makes the architecture name known to TL as soon as each is imported (see
:mod:`attnres_lens.autoregister`, which also hands TL this module's adapter when no entry point
is installed). The adapter itself is declared under
the entry-point group ``transformer_lens.architectures``, which TL reads when it picks an adapter;
where the package runs without installed metadata (a source checkout), the same class is
registered with ``ArchitectureAdapterFactory.register_adapter`` instead. Both steps are needed on
TL 3.9 and 4.3: ``boot_transformers`` reads the config through ``AutoConfig`` and checks the
architecture against ``SUPPORTED_ARCHITECTURES`` *before* it discovers entry points.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any, Optional

from .names import HF_ARCHITECTURE as ARCHITECTURE

#: Why the bridge is unavailable in this environment (``None`` when it is available).
UNAVAILABLE_REASON: Optional[str] = (
    None
    if importlib.util.find_spec("transformer_lens.model_bridge") is not None
    else "this TransformerLens has no transformer_lens.model_bridge (TransformerBridge needs TL >= 3.9)"
)

if UNAVAILABLE_REASON is None:
    import torch
    from torch import nn
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    from transformer_lens.model_bridge.exceptions import StopAtLayerException
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    from . import hf  # noqa: F401  (registers the classes with AutoConfig / AutoModelForCausalLM)
    from .model import DepthState, HookedAttnResTransformer
    from .names import router_alias

    class _OwnHooksBridge(GeneralizedComponent):
        """Runs the wrapped module of this library as it is and exposes its hook points.

        The module's own ``HookPoint`` children become the bridge's (the same objects), so a
        hook added through the bridge is a hook on the module. ``hook_in``/``hook_out`` keep TL's
        meaning (the component's input and output) and fire around the call."""

        def set_original_component(self, original_component: nn.Module) -> None:
            super().set_original_component(original_component)
            for name, child in original_component.named_children():
                if isinstance(child, HookPoint):
                    setattr(self, name, child)

    class EmbedBridge(_OwnHooksBridge):
        """The token embedding, with TL's ``W_E`` ``[d_vocab, d_model]``."""

        @property
        def W_E(self) -> torch.Tensor:  # noqa: N802 (TL's name)
            return self.original_component.weight

    class UnembedBridge(_OwnHooksBridge):
        """The LM head, with TL's ``W_U`` ``[d_model, d_vocab]`` and a zero ``b_U`` (the head
        has no bias; the module itself is left as it is)."""

        @property
        def W_U(self) -> torch.Tensor:  # noqa: N802 (TL's name)
            return self.original_component.weight.T

        @property
        def b_U(self) -> torch.Tensor:  # noqa: N802 (TL's name)
            weight = self.original_component.weight
            return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)

    class RouterBridge(_OwnHooksBridge):
        """A :class:`~attnres_lens.router.DepthRouter`: its input is a list of sources, so it
        has no ``hook_in``; ``hook_out`` is the router's own (the mixed input of the sublayer)."""

        def __init__(self, name: str, config: Any = None):
            super().__init__(name, config)
            _drop_hook(self, "hook_in")

        def forward(self, sources: list) -> Any:
            return self.original_component(sources)

    class AttnResBlockBridge(_OwnHooksBridge):
        """An :class:`~attnres_lens.model.AttnResBlock`, which maps a ``DepthState`` to a
        ``DepthState``. Cumulative blocks carry a true residual stream: ``hook_in``/``hook_out``
        are the block's ``hook_resid_pre``/``hook_resid_post``. Kimi blocks do not: they have no
        ``hook_in``/``hook_out``/``hook_resid_*`` and are not a single residual stream."""

        is_list_item = True
        hook_out_is_single_residual_stream = False
        #: The block-level router aliases HookedAttnResTransformer has, so that
        #: ``transformer_lens.patching`` (which names ``blocks.{l}.hook_{name}``) reaches them.
        hook_aliases: dict = {
            router_alias(0, sub, part).split(".", 2)[2]: f"{sub}_router.hook_{part}"
            for sub in ("attn", "mlp")
            for part in ("sources", "logits", "weights")
        }

        def set_original_component(self, original_component: nn.Module) -> None:
            super().set_original_component(original_component)
            self._layer = original_component.layer
            if original_component.cfg.flavour == "cumulative":
                self.hook_in = original_component.hook_resid_pre
                self.hook_out = original_component.hook_resid_post
                self.hook_out_is_single_residual_stream = True
            else:
                _drop_hook(self, "hook_in")
                _drop_hook(self, "hook_out")
                self.hook_out_is_single_residual_stream = False

        def forward(self, state: DepthState, *args: Any, **kwargs: Any) -> DepthState:
            self._refuse_layer_bounds(state)
            return self.original_component(state, *args, **kwargs)

        def _refuse_layer_bounds(self, state: DepthState) -> None:
            if getattr(self, "_start_at_layer_idx", None) is not None:
                raise NotImplementedError(
                    "start_at_layer is not supported on an AttnRes bridge: a residual tensor alone "
                    "cannot restart a routed model, whose routers also read earlier sources. Use "
                    "HookedAttnResTransformer's forward(state, start_at_layer=L) with the DepthState "
                    "from forward(tokens, stop_at_layer=L, return_type='state')."
                )
            stop = getattr(self, "_stop_at_layer_idx", None)
            if stop is None:
                return
            if not self.hook_out_is_single_residual_stream:
                raise NotImplementedError(
                    "stop_at_layer returns the residual stream, and a kimi-flavour AttnRes model has "
                    "none (its routers read a list of sources). Use HookedAttnResTransformer's "
                    "forward(tokens, stop_at_layer=L, return_type='state') for the sources."
                )
            if stop == self._layer:
                raise StopAtLayerException(self.hook_in(state.current))

    from transformer_lens.model_bridge import TransformerBridge

    from .cache import AttnResActivationCache
    from .refusals import missing_hook_error, no_bos_message
    from .tokenizer import BYTE_LEVEL_MARK

    #: TL's ``set_use_*`` switches the bridge forwards to this library's modules.
    HOOK_SWITCHES = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")

    class AttnResBridge(TransformerBridge):
        """The ``TransformerBridge`` that ``boot_transformers`` returns for this architecture
        (the adapter sets it as the bridge's class when the bridge is built). It keeps TL's
        bridge as it is and applies this library's contract (``docs/hooks.md``) where TL's
        generic code would be silently wrong or refuse with a bare ``KeyError``:

        - ``run_with_cache`` returns an :class:`~attnres_lens.cache.AttnResActivationCache`, so
          the bridge's cache is routing-aware (kimi) exactly as ``HookedAttnResTransformer``'s;
        - a hook name that does not exist on the flavour is refused with the message
          ``run_with_hooks``/``add_hook``/the cache give on ``HookedAttnResTransformer``;
        - ``set_use_attn_result``/``set_use_split_qkv_input``/``set_use_attn_in``/
          ``set_use_hook_mlp_in`` switch this library's hooks (TL's names and shapes);
        - ``process_weights``/``enable_compatibility_mode`` fold for real (``fold_ln``,
          ``center_unembed``), refuse what is not exact with ``ValueError``;
        - ``to_tokens(prepend_bos=True)`` is refused when the model has no BOS token."""

        # ---------------------------------------------------------------- our model
        @property
        def attnres(self) -> "HookedAttnResTransformer":
            """This library's model over the bridge's weights (:func:`attnres_model`)."""
            return self.adapter.attnres_model

        @property
        def _running_model(self) -> "HookedAttnResTransformer":
            """The model the bridge runs (the Hugging Face model's ``.model``)."""
            return self.original_model.model

        # ---------------------------------------------------------------- hooks
        def _refuse_unknown_hooks(self, names: Any) -> None:
            for name in names:
                if isinstance(name, str) and self.get_hook_point(name) is None and name not in self.hook_dict:
                    raise missing_hook_error(name, self.attnres.cfg.flavour, self.attnres.cfg.n_layers)

        def add_hook(self, name: Any, hook_fn: Any, dir: str = "fwd", is_permanent: bool = False) -> None:
            self._refuse_unknown_hooks([name])
            return super().add_hook(name, hook_fn, dir=dir, is_permanent=is_permanent)

        def run_with_hooks(self, input: Any, fwd_hooks: Any = (), bwd_hooks: Any = (), *args: Any, **kwargs: Any) -> Any:
            self._refuse_unknown_hooks([name for name, _ in list(fwd_hooks) + list(bwd_hooks)])
            return super().run_with_hooks(input, list(fwd_hooks), list(bwd_hooks), *args, **kwargs)

        def run_with_cache(self, *args: Any, return_cache_object: bool = True, **kwargs: Any) -> Any:
            names = kwargs.get("names_filter")
            self._refuse_unknown_hooks([names] if isinstance(names, str) else names if isinstance(names, (list, tuple)) else [])
            backward_hooks = any(hp.bwd_hooks for hp in self.hook_dict.values())
            out, cache = super().run_with_cache(*args, return_cache_object=return_cache_object, **kwargs)
            if not return_cache_object:
                return out, cache
            ours = AttnResActivationCache(cache.cache_dict, self.attnres, has_batch_dim=cache.has_batch_dim)
            ours.recorded_with_backward_hooks = backward_hooks
            return out, ours

        def _set_switch(self, flag: str, value: bool) -> None:
            getattr(self._running_model, f"set_{flag}")(value)  # validates first (e.g. GQA and attn_in)
            self.cfg._set_bridge_managed_hook_flag(flag, bool(value))
            getattr(self.attnres, f"set_{flag}")(value)

        def set_use_attn_result(self, use_attn_result: bool) -> None:
            """``blocks.{l}.attn.hook_result`` ``[batch, pos, head, d_model]``: each head's write,
            summing to ``hook_attn_out`` (see ``HookedAttnResTransformer.set_use_attn_result``)."""
            self._set_switch("use_attn_result", use_attn_result)

        def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
            """``blocks.{l}.hook_q_input``/``hook_k_input``/``hook_v_input`` per head."""
            self._set_switch("use_split_qkv_input", use_split_qkv_input)

        def set_use_attn_in(self, use_attn_in: bool) -> None:
            """``blocks.{l}.hook_attn_in`` per head, ``[batch, pos, head, d_model]``."""
            self._set_switch("use_attn_in", use_attn_in)

        def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
            """``blocks.{l}.hook_mlp_in``: the routed MLP input, before ``ln2``."""
            super().set_use_hook_mlp_in(use_hook_mlp_in)
            self._set_switch("use_hook_mlp_in", use_hook_mlp_in)

        # ---------------------------------------------------------------- weights
        def enable_compatibility_mode(
            self,
            disable_warnings: bool = False,
            no_processing: bool = False,
            fold_ln: bool = True,
            center_writing_weights: Optional[bool] = None,
            center_unembed: bool = True,
            fold_value_biases: bool = True,
            refactor_factored_attn_matrices: bool = False,
        ) -> None:
            """TL's ``enable_compatibility_mode`` with weight processing that is done for real
            (:meth:`process_weights`). ``center_writing_weights`` defaults to ``None``: TL's
            default, which TL itself skips for RMSNorm models; ``True`` is refused."""
            if not no_processing:
                HookedAttnResTransformer.check_weight_processing(
                    center_writing_weights=bool(center_writing_weights),
                    refactor_factored_attn_matrices=refactor_factored_attn_matrices,
                )
            self._processing = dict(fold_ln=fold_ln, center_unembed=center_unembed, fold_value_biases=fold_value_biases)
            return super().enable_compatibility_mode(
                disable_warnings=disable_warnings, no_processing=no_processing, fold_ln=fold_ln,
                center_writing_weights=bool(center_writing_weights), center_unembed=center_unembed,
                fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            )

        def process_weights(
            self,
            verbose: bool = False,
            fold_ln: bool = True,
            center_writing_weights: Optional[bool] = None,
            center_unembed: bool = True,
            fold_value_biases: bool = True,
            refactor_factored_attn_matrices: bool = False,
        ) -> None:
            """TL's weight processing, applied by ``HookedAttnResTransformer.process_weights_``
            to the weights the bridge runs: ``fold_ln`` folds the sublayer norms' and
            ``ln_final``'s gains (logits unchanged within float rounding), ``center_unembed``
            centres ``W_U`` (probabilities unchanged), ``fold_value_biases`` is a no-op (no
            value biases). Refused with ``ValueError``: ``center_writing_weights=True`` and
            ``refactor_factored_attn_matrices=True`` (not exact here). ``None`` for
            ``center_writing_weights`` is TL's default, which TL skips for RMSNorm models. Both
            steps are idempotent, so a second call changes nothing."""
            del verbose
            processing = dict(
                fold_ln=fold_ln, center_writing_weights=bool(center_writing_weights), center_unembed=center_unembed,
                fold_value_biases=fold_value_biases, refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            )
            HookedAttnResTransformer.check_weight_processing(**processing)
            twin, running = self.attnres, self._running_model
            twin.process_weights_(**processing)  # in place on the tensors the bridge runs
            if running.unembed.weight is not twin.unembed.weight:  # untied by the fold
                running.unembed.weight = twin.unembed.weight
                running.cfg.tie_word_embeddings = twin.cfg.tie_word_embeddings
            self._weights_processed = True

        # ---------------------------------------------------------------- tokens
        def to_tokens(self, input: Any, prepend_bos: Optional[bool] = None, *args: Any, **kwargs: Any) -> Any:
            """TL's ``to_tokens``; ``prepend_bos=True`` is refused when the model has no BOS
            token (TL would prepend the ``<|endoftext|>`` it added to the tokenizer)."""
            wants_bos = getattr(self.cfg, "default_prepend_bos", False) if prepend_bos is None else prepend_bos
            if wants_bos and not getattr(self.adapter, "model_has_bos", True):
                raise ValueError(no_bos_message(self.tokenizer.name_or_path or "hf_byte_tokenizer()"))
            return super().to_tokens(input, prepend_bos, *args, **kwargs)

    def _drop_hook(component: GeneralizedComponent, name: str) -> None:
        """Remove a hook point the base class created but this component cannot fire."""
        component._hook_registry.pop(name, None)
        component._modules.pop(name, None)

    class AttnResArchitectureAdapter(ArchitectureAdapter):
        """TL adapter for ``Qwen3AttnResForCausalLM`` (both flavours, block and full mode).

        Weight processing (``fold_ln``, centering) is not offered: folding a norm into the
        weights that read it changes what the routers read. ``enable_compatibility_mode``
        therefore leaves the weights as they are."""

        supports_fold_ln = False
        supports_center_writing_weights = False

        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg)
            self._set_rms_rotary_defaults()
            self.cfg.default_prepend_bos = False
            self.weight_processing_conversions = {}
            self.supports_fold_ln = False
            self.supports_center_writing_weights = False
            self.component_mapping = self._component_mapping("kimi")

        def _component_mapping(self, flavour: str) -> dict:
            cfg = self.cfg
            block = AttnResBlockBridge(
                name="model.blocks",
                config=cfg,
                submodules={
                    "attn_router": RouterBridge("attn_router", cfg),
                    "ln1": _OwnHooksBridge("ln1", cfg),
                    "attn": _OwnHooksBridge("attn", cfg),
                    "mlp_router": RouterBridge("mlp_router", cfg),
                    "ln2": _OwnHooksBridge("ln2", cfg),
                    "mlp": _OwnHooksBridge("mlp", cfg),
                },
            )
            # TL tools read the stream contract from the template as well as from each block.
            block.hook_out_is_single_residual_stream = flavour == "cumulative"
            mapping: dict = {"embed": EmbedBridge("model.embed", cfg), "blocks": block}
            if flavour == "kimi":
                mapping["final_router"] = RouterBridge("model.final_router", cfg)
            mapping["ln_final"] = _OwnHooksBridge("model.ln_final", cfg)
            mapping["unembed"] = UnembedBridge("model.unembed", cfg)
            return mapping

        def prepare_model(self, hf_model: Any) -> None:
            """Check the model is ours and add the kimi final router to the mapping."""
            inner = getattr(hf_model, "model", None)
            if not isinstance(inner, HookedAttnResTransformer):
                raise TypeError(
                    f"{type(self).__name__} bridges {ARCHITECTURE} models whose .model is a "
                    f"HookedAttnResTransformer; got {type(hf_model).__name__} with .model of type "
                    f"{type(inner).__name__}"
                )
            self.cfg.attnres_flavour = inner.cfg.flavour
            self.component_mapping = self._component_mapping(inner.cfg.flavour)
            # Taken before the bridge wraps the modules (which renames their parameters and
            # hook points): our tools get a model of their own over the same tensors.
            self.attnres_model = sharing_weights(inner)

    def _setup_hook_compatibility(self: Any, bridge: Any) -> None:
        """TL calls this on the adapter when it builds the bridge (and again in
        ``enable_compatibility_mode``): the bridge becomes an :class:`AttnResBridge`."""
        if not isinstance(bridge, AttnResBridge):
            bridge.__class__ = AttnResBridge
            # The byte tokenizer has no BOS, and TL then installs ``<|endoftext|>`` as one (an
            # id this model never saw); any other tokenizer keeps TL's BOS behaviour.
            self.model_has_bos = not getattr(bridge.tokenizer, BYTE_LEVEL_MARK, False)

    AttnResArchitectureAdapter.setup_hook_compatibility = _setup_hook_compatibility

    def sharing_weights(model: "HookedAttnResTransformer") -> "HookedAttnResTransformer":
        """A new :class:`HookedAttnResTransformer` over the same parameter tensors as ``model``:
        its own modules and hook points, no tensor copied (an edit of a weight shows in both)."""
        with torch.device("meta"):
            twin = HookedAttnResTransformer(
                dataclasses.replace(model.cfg), tokenizer=model.tokenizer, init_weights=False
            )
        twin.load_state_dict(model.state_dict(keep_vars=True), strict=True, assign=True)
        if model.cfg.tie_word_embeddings:
            twin.unembed.weight = twin.embed.weight
        twin.schedule, twin.checkpoint_format = model.schedule, model.checkpoint_format
        return twin.train(model.training)

    def attnres_model(bridge: Any) -> "HookedAttnResTransformer":
        """A :class:`HookedAttnResTransformer` over the bridge's weights, for this library's
        sweeps, attribution and reports: the same tensors (nothing is copied or reloaded), its
        own modules and hook points (a hook on the bridge does not fire here, nor the reverse).
        The bridge wraps the modules it runs in its component bridges, which renames their
        parameters; this model keeps the library's names and runs without the wrappers."""
        model = getattr(getattr(bridge, "adapter", None), "attnres_model", None)
        if not isinstance(model, HookedAttnResTransformer):
            raise TypeError(
                f"expected a TransformerBridge over {ARCHITECTURE}, got {type(bridge).__name__}"
            )
        return model

    def bridge_from_model(model: "HookedAttnResTransformer", tokenizer: Any, **boot_kwargs: Any) -> Any:
        """A ``TransformerBridge`` over the weights of an already loaded ``model`` (no second
        read from disk, no copy). ``tokenizer`` is a Hugging Face tokenizer (TL requires one).
        ``model`` itself is left as it is: the bridge wraps a twin of it over the same tensors
        (:func:`sharing_weights`)."""
        from transformer_lens.model_bridge import TransformerBridge

        if not isinstance(model, HookedAttnResTransformer):
            raise TypeError(f"model must be a HookedAttnResTransformer, got {type(model).__name__}")
        hf_model = hf.Qwen3AttnResForCausalLM.from_attnres_model(sharing_weights(model))
        return TransformerBridge.boot_transformers(
            ARCHITECTURE, hf_model=hf_model, tokenizer=tokenizer, **boot_kwargs
        )
