"""Hugging Face-native classes for ``qwen3_attnres`` checkpoints, with no remote code.

``Qwen3AttnResForCausalLM`` is a ``transformers.PreTrainedModel`` whose one child, ``model``, is a
:class:`~attnres_lens.model.HookedAttnResTransformer`: the same modules, the same forward and the
same hook points, so there is one implementation of the router, the sources and the backbone
(see ``docs/concepts.md``). Loading goes through :func:`attnres_lens.loading.read_checkpoint`, so
every layout that loader accepts (both flavours, the library's own metadata, sharded files) loads
here, and ``save_pretrained`` writes the flavour's checkpoint layout, tensor for tensor.

Importing ``attnres_lens`` registers both classes with ``AutoConfig`` and
``AutoModelForCausalLM`` (as soon as ``transformers`` is imported), so
``AutoModelForCausalLM.from_pretrained(directory)`` needs no ``trust_remote_code``.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union, no_type_check

import torch
from huggingface_hub.dataclasses import strict
from jaxtyping import Float, Int
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel, Qwen3Config
from transformers.modeling_outputs import CausalLMOutputWithPast

from .names import LIBRARY_KEY

# Only transformers and torch at import: ``attnres_lens`` imports this module from a hook that runs
# as soon as ``transformers`` is imported, which may happen while transformer_lens or one of our
# own modules is still being imported; the library's modules are imported on first use below.

MODEL_TYPE = "qwen3_attnres"
FLAVOURS = ("kimi", "cumulative")
#: ``from_pretrained`` arguments that only matter when downloading; a local directory ignores them.
_DOWNLOAD_ARGUMENTS = frozenset(
    {"cache_dir", "force_download", "local_files_only", "proxies", "token", "_commit_hash", "_from_auto", "_from_pipeline"}
)
#: Attention kernels ``transformers`` may ask for: this model has one exact implementation, which
#: computes what each of them computes (patterns are built on request).
_ATTENTION_IMPLEMENTATIONS = (None, "eager", "sdpa")


@no_type_check  # transformers' strict dataclass checks its fields; jaxtyping's hook would refuse its extra keys
@strict
class Qwen3AttnResConfig(Qwen3Config):
    """A Qwen3 config plus the ``attnres_*`` fields of the ``qwen3_attnres`` layout.

    ``attnres_flavour`` (``"kimi"`` or ``"cumulative"``) is not part of the public layout: both
    codebases write ``attnres_mode="block"``, and the flavour is decided by the checkpoint's
    router keys. ``from_pretrained`` fills it from the keys; set it yourself to build a fresh
    model from a config."""

    model_type = MODEL_TYPE

    attnres_num_blocks: int = 8
    attnres_mode: str = "block"
    attnres_gate_type: str = "bias"
    attnres_recency_bias_init: Optional[float] = None
    attnres_flavour: Optional[str] = None

    def flavour(self) -> str:
        """The flavour this config builds, or a ``ValueError`` saying how to set it."""
        library = getattr(self, LIBRARY_KEY, None) or {}
        flavour = self.attnres_flavour or library.get("flavour")
        if flavour not in FLAVOURS:
            raise ValueError(
                f"attnres_flavour is {flavour!r}; a qwen3_attnres config does not say its flavour "
                f"(the checkpoint's keys do): set attnres_flavour to one of {FLAVOURS}, or load "
                "weights with from_pretrained, which reads it from the keys"
            )
        return flavour

    def to_attnres_config(self) -> Any:
        """The :class:`~attnres_lens.config.AttnResConfig` of the model this config builds."""
        from .loading import config_from_hf

        library = getattr(self, LIBRARY_KEY, None) or {}
        return config_from_hf(
            self.to_dict(),
            flavour=self.flavour(),
            routing_mode=library.get("routing_mode", self.attnres_mode),
            n_blocks=self.attnres_num_blocks,
            router_bias=library.get("router_bias"),
        )

    @classmethod
    def from_attnres_model(cls, model: torch.nn.Module) -> "Qwen3AttnResConfig":
        """The config ``model.save_pretrained`` writes, as a config object (flavour included)."""
        from .loading import hf_config_dict

        fields = hf_config_dict(model)
        fields.pop("torch_dtype", None)
        fields.pop("model_type", None)
        return cls(**fields, attnres_flavour=model.cfg.flavour, dtype=model.cfg.dtype)


class Qwen3AttnResForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``qwen3_attnres`` causal LM for ``transformers``; ``self.model`` is the
    :class:`~attnres_lens.model.HookedAttnResTransformer` that computes it.

    Build it with ``from_pretrained(directory)`` (any layout ``attnres_lens`` loads),
    ``Qwen3AttnResForCausalLM(config)`` (fresh weights; ``config.attnres_flavour`` set) or
    :meth:`from_attnres_model` (wraps a model you already have, sharing its weights)."""

    config_class = Qwen3AttnResConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["AttnResBlock"]
    _supports_cache_class = False

    def __init__(self, config: Qwen3AttnResConfig, model: Optional[torch.nn.Module] = None):
        from .model import HookedAttnResTransformer

        super().__init__(config)
        if model is not None and not isinstance(model, HookedAttnResTransformer):
            raise TypeError(f"model must be a HookedAttnResTransformer, got {type(model).__name__}")
        self.model = model if model is not None else HookedAttnResTransformer(config.to_attnres_config())
        self.post_init()
        # The wrapper takes the mode of the model it wraps (HookedAttnResTransformer is built in
        # eval mode), as transformers' from_pretrained returns eval models; TL's bridge and its
        # patching refuse a module left in training mode.
        self.train(self.model.training)

    @classmethod
    def from_attnres_model(cls, model: torch.nn.Module) -> "Qwen3AttnResForCausalLM":
        """Wrap ``model``, a :class:`~attnres_lens.model.HookedAttnResTransformer` (no copy: the
        two share every module and tensor)."""
        from .model import HookedAttnResTransformer

        if not isinstance(model, HookedAttnResTransformer):
            raise TypeError(f"model must be a HookedAttnResTransformer, got {type(model).__name__}")
        return cls(Qwen3AttnResConfig.from_attnres_model(model), model=model)

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing to do: :class:`HookedAttnResTransformer` initialises its own weights (the
        routers' zero queries and recency biases included) when it is built."""

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.unembed

    # ---------------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        *model_args: Any,
        config: Optional[Qwen3AttnResConfig] = None,
        dtype: Optional[Union[torch.dtype, str]] = None,
        torch_dtype: Optional[Union[torch.dtype, str]] = None,
        device_map: Optional[Union[str, torch.device, dict[str, Any]]] = None,
        attn_implementation: Optional[str] = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> "Qwen3AttnResForCausalLM":
        """Load ``pretrained_model_name_or_path`` (a directory or a hub id) through
        :func:`attnres_lens.loading.read_checkpoint`. ``dtype`` (or ``torch_dtype``): float32
        (default), bfloat16, float16 or ``"auto"`` (the checkpoint's); ``device_map``: one device
        (``"cpu"``, ``"cuda:0"``, ``"auto"`` or ``{"": device}``)."""
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no extra positional arguments, got {model_args!r}")
        _check_loading_arguments(pretrained_model_name_or_path, kwargs, attn_implementation, device_map)
        from .loading import read_checkpoint
        from .model import HookedAttnResTransformer

        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one")
        checkpoint = read_checkpoint(
            pretrained_model_name_or_path,
            flavour=config.attnres_flavour if config is not None else None,
            dtype=_checkpoint_dtype(pretrained_model_name_or_path, dtype if dtype is not None else torch_dtype),
            device=device_map[""] if isinstance(device_map, dict) else device_map,
            tokenizer=tokenizer,
        )
        model = checkpoint.into(HookedAttnResTransformer)
        loaded = Qwen3AttnResConfig.from_attnres_model(model)
        loaded._name_or_path = str(pretrained_model_name_or_path)
        return cls(loaded if config is None else _checked_config(config, loaded, model), model=model)

    def save_pretrained(
        self, save_directory: Union[str, os.PathLike], *, max_shard_size: Union[int, str, None] = None, **kwargs: Any
    ) -> None:
        """Write the ``qwen3_attnres`` layout of this model's flavour (see
        :meth:`HookedAttnResTransformer.save_pretrained`): the tensors as they are, bit for bit."""
        unsupported = set(kwargs) - {"safe_serialization", "is_main_process"}
        if unsupported or kwargs.get("safe_serialization") is False:
            raise TypeError(
                f"save_pretrained writes safetensors with max_shard_size=...; unsupported arguments: "
                f"{sorted(unsupported) or ['safe_serialization=False']}"
            )
        if kwargs.get("is_main_process", True):
            self.model.save_pretrained(save_directory, max_shard_size=max_shard_size)

    def checkpoint_state(self) -> dict[str, Tensor]:
        """Checkpoint key -> tensor (no copies): the names ``save_pretrained`` writes, which
        :meth:`HookedAttnResTransformer.from_pretrained` reads from this model in memory."""
        from .loading import key_map

        params = dict(self.model.named_parameters(remove_duplicate=False))
        keys = key_map(self.model.cfg, with_routers=True)
        if not set(keys.values()) <= set(params):
            raise RuntimeError(
                "this model's modules are wrapped by a TransformerLens TransformerBridge, which "
                "renames their parameters; take attnres_lens.tl_bridge.attnres_model(bridge) (the "
                "same tensors under the library's names) and save or copy that"
            )
        return {key: params[ours] for key, ours in keys.items()}

    # ---------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Optional[Int[Tensor, "batch pos"]] = None,
        attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
        labels: Optional[Int[Tensor, "batch pos"]] = None,
        inputs_embeds: Optional[Tensor] = None,
        past_key_values: Any = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, Tensor] = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and the Hugging Face causal-LM loss when ``labels`` are given) of
        ``self.model``. This model keeps no cache between calls (``past_key_values`` is always
        ``None``); ``generate`` re-reads the whole sequence each step, which is exact.
        ``output_hidden_states`` is refused: the kimi flavour has no single residual stream,
        and the routed sources are read through ``self.model``'s hook points
        (``self.model.run_with_cache``)."""
        _check_forward_arguments(input_ids, attention_mask, inputs_embeds, past_key_values, output_hidden_states, kwargs)
        attentions = None
        if output_attentions if output_attentions is not None else self.config.output_attentions:
            logits, attentions = self._logits_and_patterns(input_ids, attention_mask)
        else:
            logits = self.model(input_ids, attention_mask=attention_mask)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.model.cfg.d_vocab)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = logits[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, Tensor):
            logits = logits[:, logits_to_keep]
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=None, attentions=attentions)

    def _logits_and_patterns(
        self, input_ids: Tensor, attention_mask: Optional[Tensor]
    ) -> tuple[Float[Tensor, "batch pos d_vocab"], tuple[Tensor, ...]]:
        names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(self.model.cfg.n_layers)]
        logits, cache = self.model.run_with_cache(input_ids, attention_mask=attention_mask, names_filter=names)
        return logits, tuple(cache[name] for name in names)

    def routing_mass(
        self, input_ids: Int[Tensor, "batch pos"], attention_mask: Optional[Tensor] = None
    ) -> dict[str, Float[Tensor, "batch pos n_sources"]]:
        """Router name (``"blocks.0.attn_router"`` ..., ``"final_router"``) -> its mass over
        its sources (``hook_weights``), from one forward."""
        names = [f"{spec.name}.hook_weights" for spec in self.model.router_specs]
        _, cache = self.model.run_with_cache(input_ids, attention_mask=attention_mask, names_filter=names)
        return {name.removesuffix(".hook_weights"): cache[name] for name in names}

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The whole sequence every step (no cache is kept)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}


#: The fields of an AttnResConfig that decide what a checkpoint computes.
_ARCHITECTURE_FIELDS = (
    "d_model", "d_head", "n_heads", "n_key_value_heads", "n_layers", "d_mlp", "d_vocab", "eps",
    "rotary_base", "tie_word_embeddings", "flavour", "routing_mode", "n_blocks",
)


def _checked_config(
    config: Qwen3AttnResConfig, loaded: Qwen3AttnResConfig, model: torch.nn.Module
) -> Qwen3AttnResConfig:
    """``config`` (a caller's, e.g. with ``output_attentions`` set) made the model's config, once
    it is known to describe the checkpoint: same architecture, flavour and metadata filled in."""
    config = copy.deepcopy(config)
    config.attnres_flavour = model.cfg.flavour
    if getattr(loaded, LIBRARY_KEY, None) is not None:
        setattr(config, LIBRARY_KEY, getattr(loaded, LIBRARY_KEY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the block-count note was given when the checkpoint was read
        described = config.to_attnres_config()
    differ = {
        name: (getattr(described, name), getattr(model.cfg, name))
        for name in _ARCHITECTURE_FIELDS
        if getattr(described, name) != getattr(model.cfg, name)
    }
    if differ:
        raise ValueError(
            "config= describes another model than the checkpoint (field: config value, checkpoint "
            f"value): {differ}; leave config out to use the checkpoint's"
        )
    config._name_or_path = loaded._name_or_path
    config.dtype = loaded.dtype
    return config


def _check_loading_arguments(
    source: Any, kwargs: dict[str, Any], attn_implementation: Optional[str], device_map: Any
) -> None:
    if attn_implementation not in _ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r}: this model has one exact attention "
            f"implementation; valid values are {_ATTENTION_IMPLEMENTATIONS}"
        )
    if isinstance(device_map, dict) and set(device_map) != {""}:
        raise ValueError(
            f"device_map={device_map!r}: a qwen3_attnres model loads onto one device; pass a "
            "device such as 'cpu', 'cuda:0' or 'auto'"
        )
    if (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path"):
        raise ValueError(f"{str(source)!r} holds a PEFT adapter; load the base model and apply the adapter with peft")
    unknown = sorted(set(kwargs) - _DOWNLOAD_ARGUMENTS - {"adapter_kwargs", "revision", "trust_remote_code", "low_cpu_mem_usage"})
    revision = kwargs.get("revision")
    if revision not in (None, "main") and not Path(source).is_dir():
        unknown.append(f"revision={revision!r}")
    if unknown:
        raise TypeError(
            f"Qwen3AttnResForCausalLM.from_pretrained does not take {unknown}; it takes config, "
            "dtype/torch_dtype, device_map (one device), attn_implementation, tokenizer and the "
            "hub's download arguments (for another revision, download it with "
            "huggingface_hub.snapshot_download and pass the directory)"
        )


def _checkpoint_dtype(source: Any, dtype: Optional[Union[torch.dtype, str]]) -> Optional[Union[torch.dtype, str]]:
    """``"auto"``: the dtype the checkpoint's ``config.json`` records (float32 if none)."""
    if dtype != "auto":
        return dtype
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    fields = json.loads(config.read_text())
    recorded = fields.get("torch_dtype") or fields.get("dtype")
    return recorded if recorded in ("float32", "bfloat16", "float16") else None


def _check_forward_arguments(
    input_ids: Optional[Tensor], attention_mask: Optional[Tensor], inputs_embeds: Any, past_key_values: Any, output_hidden_states: Optional[bool],
    kwargs: dict[str, Any],
) -> None:
    if input_ids is None or inputs_embeds is not None:
        raise ValueError(
            "Qwen3AttnResForCausalLM.forward needs input_ids (inputs_embeds is not supported: the "
            "embedding is a routed source; edit it at model.hook_embed)"
        )
    if past_key_values is not None and not _is_empty_cache(past_key_values):
        raise ValueError("Qwen3AttnResForCausalLM keeps no cache; pass past_key_values=None (the default)")
    if output_hidden_states:
        raise ValueError(
            "output_hidden_states is not offered: a kimi-flavour model has no single residual "
            "stream. Read the routed sources with self.model.run_with_cache (hook names in "
            "docs/hooks.md) or the routing with routing_mass(input_ids)"
        )
    ignored = set(kwargs) - {"cache_position", "position_ids", "return_dict", "use_cache"}
    if ignored:
        raise TypeError(f"Qwen3AttnResForCausalLM.forward got unexpected arguments {sorted(ignored)}")
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and not _standard_positions(position_ids, input_ids, attention_mask):
        raise ValueError(
            "position_ids other than the token positions (0, 1, ... counted over the attention "
            "mask's real tokens) are not supported; leave position_ids out"
        )


def _standard_positions(position_ids: Tensor, input_ids: Tensor, attention_mask: Optional[Tensor]) -> bool:
    """Whether ``position_ids`` count each real token's position, as this model does itself."""
    if attention_mask is None:
        expected = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        return torch.equal(position_ids.expand_as(input_ids), expected)
    real = attention_mask.bool()
    expected = attention_mask.long().cumsum(-1) - 1
    return torch.equal(position_ids.expand_as(input_ids)[real], expected[real])


def _is_empty_cache(cache: Any) -> bool:
    length = getattr(cache, "get_seq_length", None)
    return callable(length) and length() == 0


def register_auto_classes() -> None:
    """Register both classes with ``AutoConfig`` / ``AutoModelForCausalLM`` (idempotent)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, Qwen3AttnResConfig)
    try:
        AutoModelForCausalLM.register(Qwen3AttnResConfig, Qwen3AttnResForCausalLM)
    except ValueError:  # already registered (a re-import of this module)
        pass


register_auto_classes()
