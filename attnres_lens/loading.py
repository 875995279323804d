"""Reading and writing checkpoints (``docs/concepts.md``, "Checkpoint layout").

:func:`read_checkpoint` turns a source into a :class:`Checkpoint`: the config, the detected
format, the state dict (our parameter names) and the tokenizer. It never builds or imports the
model: :meth:`Checkpoint.into` hands the weights to whichever model class asks (the model's
``from_pretrained`` passes itself). Three kinds of weights can be read:

1. A vanilla Hugging Face ``qwen3`` checkpoint (a local directory, an in-memory
   ``Qwen3ForCausalLM`` or a hub id), wrapped with a routing schedule that reproduces the
   vanilla function: ``flavour="kimi", schedule="uniform"`` or
   ``flavour="cumulative", schedule="recency", recency_bias=b``.
2. A ``qwen3_attnres`` checkpoint. Both public codebases use that ``model_type``; the flavour is
   decided by the router keys, as ``docs/concepts.md`` says: ``*_res_bias`` keys mean cumulative (block or
   full mode), ``model.final_res_proj.weight`` means kimi (block or full mode). Settings of the
   public codebases that the library does not compute are refused by name (:mod:`.layouts`).
3. A checkpoint written by :func:`save_pretrained` (the ``qwen3_attnres`` layout of the
   model's flavour plus an ``attnres_lens`` entry in ``config.json``).

Everything is checked before any tensor is read: the config, the key set against the format
that was assumed, and every tensor's shape against the shape the config implies. Weights are
read one tensor at a time and the model is built on the ``meta`` device and given them, so the
peak memory is the model plus one tensor.
Pickles are only read through ``torch.load(weights_only=True)``; remote code is never run.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from torch import Tensor, nn

from . import layouts
from .checkpoint_config import COUNT_FIELDS, SUPPORTED_MODEL_TYPES, CheckpointError, check_config_types, read_json
from .config import AttnResConfig, RoutingSchedule
from .names import LIBRARY_KEY
from .outputs import honour_umask
from .paths import check_link, local_checkpoint
from .tokenizer import N_BYTES, ByteTokenizer

if TYPE_CHECKING:  # annotations only: loading never imports the model
    from .model import HookedAttnResTransformer

SUPPORTED_ATTNRES_MODES = ("block", "full")
SUPPORTED_GATE_TYPES = ("bias",)
WRAP_SCHEDULES = {"kimi": ("uniform",), "cumulative": ("recency",)}
DEFAULT_WRAP_BLOCKS = 8
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
# How much of a safetensors file may be mapped (and resident) at once while loading.
_MAP_BUDGET = 64 * 2**20
# Buffers some Hugging Face versions saved; they carry no weights of the model.
_IGNORED_KEYS_SUFFIXES = ("rotary_emb.inv_freq",)

# ------------------------------------------------------------------------- key mapping
_LAYER_KEYS = {
    "input_layernorm.weight": "ln1.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "post_attention_layernorm.weight": "ln2.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_ROUTER_KEYS = {
    "attn_res_proj.weight": "attn_router.proj.weight",
    "attn_res_norm.weight": "attn_router.norm.weight",
    "attn_res_bias": "attn_router.bias",
    "mlp_res_proj.weight": "mlp_router.proj.weight",
    "mlp_res_norm.weight": "mlp_router.norm.weight",
    "mlp_res_bias": "mlp_router.bias",
}


def key_map(cfg: AttnResConfig, *, with_routers: bool) -> dict[str, str]:
    """Checkpoint key -> our parameter name, for every weight a checkpoint of ``cfg`` holds.

    ``with_routers=False`` gives the keys of a vanilla ``qwen3`` checkpoint."""
    keys = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "ln_final.weight"}
    if not cfg.tie_word_embeddings:
        keys["lm_head.weight"] = "unembed.weight"
    for layer in range(cfg.n_layers):
        for hf, ours in _LAYER_KEYS.items():
            keys[f"model.layers.{layer}.{hf}"] = f"blocks.{layer}.{ours}"
        if with_routers:
            for hf, ours in _ROUTER_KEYS.items():
                if hf.endswith("_bias") and not cfg.router_bias:
                    continue
                keys[f"model.layers.{layer}.{hf}"] = f"blocks.{layer}.{ours}"
    if with_routers:
        keys.update(cfg.scheme.checkpoint_final_keys)
    return keys


def checkpoint_shapes(cfg: AttnResConfig, *, with_routers: bool) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> the tensor shape ``cfg`` implies (HF Qwen3 layout; routers as in
    ``qwen3_attnres``: query ``[1, d_model]``, key-norm gain ``[d_model]``, bias ``[]``)."""
    q_out, kv_out = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
    layer = {
        "input_layernorm.weight": (cfg.d_model,),
        "self_attn.q_proj.weight": (q_out, cfg.d_model),
        "self_attn.k_proj.weight": (kv_out, cfg.d_model),
        "self_attn.v_proj.weight": (kv_out, cfg.d_model),
        "self_attn.o_proj.weight": (cfg.d_model, q_out),
        "self_attn.q_norm.weight": (cfg.d_head,),
        "self_attn.k_norm.weight": (cfg.d_head,),
        "post_attention_layernorm.weight": (cfg.d_model,),
        "mlp.gate_proj.weight": (cfg.d_mlp, cfg.d_model),
        "mlp.up_proj.weight": (cfg.d_mlp, cfg.d_model),
        "mlp.down_proj.weight": (cfg.d_model, cfg.d_mlp),
    }
    router = {"res_proj.weight": (1, cfg.d_model), "res_norm.weight": (cfg.d_model,), "res_bias": ()}
    top = {"model.embed_tokens.weight": (cfg.d_vocab, cfg.d_model), "model.norm.weight": (cfg.d_model,),
           "lm_head.weight": (cfg.d_vocab, cfg.d_model)}
    shapes = {}
    for key in key_map(cfg, with_routers=with_routers):
        if key in top:
            shapes[key] = top[key]
        elif key.startswith("model.final_"):
            shapes[key] = router[key.removeprefix("model.final_")]
        else:  # model.layers.{l}.{name}
            name = key.split(".", 3)[3]
            shapes[key] = layer.get(name) or router[name.split("_", 1)[1]]
    return shapes


# ------------------------------------------------------------------------- weight files
@dataclass
class WeightFiles:
    """The weight files of a checkpoint directory, indexed by key without reading tensors."""

    directory: Path
    key_to_file: dict[str, Path] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: key -> (whether the stored dtype is a floating-point one, its name)
    dtypes: dict[str, tuple[bool, str]] = field(default_factory=dict)
    kind: str = "safetensors"

    @classmethod
    def find(cls, directory: Path) -> "WeightFiles":
        present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        for name in (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX):
            _checked_link(directory / name)
        files = cls(directory)
        if (directory / SAFE_INDEX).exists() and (directory / SAFE_WEIGHTS).exists():
            warnings.warn(
                f"{str(directory)!r} holds both {SAFE_WEIGHTS} and {SAFE_INDEX}: loading {SAFE_WEIGHTS}, as "
                "transformers does (the index and its shards are ignored); remove the one that is stale",
                UserWarning,
                stacklevel=4,
            )
            files._add_safetensors(directory / SAFE_WEIGHTS)
        elif (directory / SAFE_INDEX).exists():
            files._index_safetensors(directory / SAFE_INDEX)
        elif (directory / SAFE_WEIGHTS).exists():
            files._add_safetensors(directory / SAFE_WEIGHTS)
        elif (directory / TORCH_INDEX).exists() or (directory / TORCH_WEIGHTS).exists():
            files.kind = "torch"
            if (directory / TORCH_INDEX).exists():
                index = directory / TORCH_INDEX
                shards = [_shard_inside(index, name) for name in sorted(set(read_json(index)["weight_map"].values()))]
            else:
                shards = [directory / TORCH_WEIGHTS]
            for shard in shards:
                for key, tensor in _torch_load(shard).items():
                    files.key_to_file[key] = shard
                    files.shapes[key] = tuple(tensor.shape)
                    files.dtypes[key] = (tensor.is_floating_point(), str(tensor.dtype).removeprefix("torch."))
        else:
            raise FileNotFoundError(
                f"no weights in {str(directory)!r}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, "
                f"{TORCH_WEIGHTS} or {TORCH_INDEX}; the directory holds {present}"
            )
        return files

    def _index_safetensors(self, index_path: Path) -> None:
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{str(index_path)!r} has no 'weight_map'")
        for shard in sorted(set(weight_map.values()), key=str):
            shard_path = _shard_inside(index_path, shard)
            if not shard_path.exists():
                raise FileNotFoundError(f"{str(index_path)!r} names shard {shard!r}, which is missing")
            self._add_safetensors(shard_path)
        indexed, found = set(weight_map), set(self.key_to_file)
        if indexed != found:
            raise CheckpointError(
                f"{str(index_path)!r} disagrees with its shards: in the index only "
                f"{_preview(indexed - found)}, in the shards only {_preview(found - indexed)}"
            )

    def _add_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    self.key_to_file[key] = path
                    view = handle.get_slice(key)
                    self.shapes[key] = tuple(view.get_shape())
                    dtype = str(view.get_dtype())
                    self.dtypes[key] = (dtype.startswith(("F", "BF")), dtype)
        except Exception as err:  # safetensors raises its own error types for bad files
            raise CheckpointError(
                f"cannot read safetensors file {str(path)!r} (truncated or corrupted?): {err}"
            ) from err

    def keys(self) -> set[str]:
        return {k for k in self.key_to_file if not k.endswith(_IGNORED_KEYS_SUFFIXES)}

    def read(self, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(key, tensor)`` one at a time, grouped by file."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.key_to_file[key], []).append(key)
        for path, file_keys in by_file.items():
            if self.kind == "torch":
                state = _torch_load(path)
                for key in file_keys:
                    yield key, state[key]
                del state
                continue
            yield from self._read_safetensors(path, file_keys)

    def _read_safetensors(self, path: Path, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
        """Tensors of one file, reopening it every ``_MAP_BUDGET`` bytes.

        ``safe_open`` maps the whole file, and every page a tensor was read from stays resident
        (counted in the process's memory) until the file is closed. Reopening bounds that to
        the budget, so loading peaks at about the model plus the budget rather than twice the
        model."""
        from safetensors import safe_open

        pending = list(keys)
        try:
            while pending:
                mapped = 0
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    while pending and mapped < _MAP_BUDGET:
                        key = pending.pop(0)
                        tensor = handle.get_tensor(key)
                        mapped += tensor.numel() * tensor.element_size()
                        yield key, tensor
                        del tensor
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"cannot read tensors from {str(path)!r}: {err}") from err


def _torch_load(path: Path) -> dict[str, Tensor]:
    # weights_only=True: a pickle can only rebuild tensors and plain containers, never run code.
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # the legacy (pre-1.6, non-zip) format cannot be mapped: read it whole instead
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read {str(path)!r} with torch.load(weights_only=True): {err}; if it is a full pickle "
            "of a model rather than a state dict, load it in transformers and save it again as safetensors "
            "(model.save_pretrained(dir))"
        ) from err


def _shard_inside(index: Path, shard: Any) -> Path:
    """The path of a shard an index names, refused unless it resolves inside the checkpoint
    directory (an index naming ``../../x`` is never followed)."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{str(index)!r} names a shard {shard!r}, which is not a file name")
    directory = index.parent.resolve()
    path = index.parent / shard
    _checked_link(path)
    resolved = path.resolve()
    if directory not in resolved.parents:
        raise CheckpointError(
            f"{str(index)!r} names shard {shard!r}, which resolves to {str(resolved)!r}, outside the "
            f"checkpoint directory {str(directory)!r}; refusing to read it"
        )
    return path


def _checked_link(path: Path) -> None:
    """:func:`attnres_lens.paths.check_link` with a loop reported as a :class:`CheckpointError`."""
    try:
        check_link(path)
    except FileNotFoundError:
        raise
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def _preview(keys: Any, limit: int = 8) -> str:
    keys = sorted(keys)
    if not keys:
        return "nothing"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys) - limit} more)' if len(keys) > limit else ''}]"


# ------------------------------------------------------------------------- configs
def check_counts_against_weights(
    hf: dict[str, Any], keys: set[str], shapes: dict[str, tuple[int, ...]], where: str
) -> None:
    """The config's layer, width, head and vocabulary counts against the weights themselves,
    before anything is sized from the config (a 1 KB config.json claiming 10^9 layers would
    otherwise exhaust memory building per-layer key maps)."""
    missing = [name for name in COUNT_FIELDS if name not in hf]
    if missing:
        raise CheckpointError(f"{where}: the config lacks the Qwen3 field {missing[0]!r}")
    layers = {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    n_layers = hf["num_hidden_layers"]
    if len(layers) != n_layers or (layers and (min(layers), max(layers)) != (0, n_layers - 1)):
        held = f"layers 0-{max(layers)} ({len(layers)} distinct)" if layers else "no layers"
        raise CheckpointError(f"{where}: num_hidden_layers is {n_layers}, but the weights hold {held}")
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and tuple(embed) != (hf["vocab_size"], hf["hidden_size"]):
        raise CheckpointError(
            f"{where}: vocab_size {hf['vocab_size']} x hidden_size {hf['hidden_size']} contradicts "
            f"model.embed_tokens.weight, of shape {tuple(embed)}"
        )
    query = shapes.get("model.layers.0.self_attn.q_proj.weight")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if query is not None and query[0] != hf["num_attention_heads"] * head_dim:
        raise CheckpointError(
            f"{where}: num_attention_heads {hf['num_attention_heads']} x head_dim {head_dim} contradicts "
            f"model.layers.0.self_attn.q_proj.weight, of shape {tuple(query)}"
        )


def config_from_hf(
    hf: dict[str, Any],
    *,
    flavour: str,
    routing_mode: str,
    n_blocks: int,
    router_bias: Optional[bool] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[str] = None,
) -> AttnResConfig:
    """An :class:`AttnResConfig` from a Hugging Face Qwen3 config dict (``config.json``)."""
    if hf.get("attention_bias"):
        raise CheckpointError("attention_bias=True is not Qwen3 (Qwen3 has no attention biases)")
    if hf.get("use_sliding_window"):
        raise CheckpointError("sliding-window attention (use_sliding_window=True) is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act must be 'silu' for Qwen3, got {hf.get('hidden_act')!r}")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", scaling.get("rope_type", scaling.get("type", "default"))))
    if rope_type != "default":
        raise CheckpointError(f"rope type {rope_type!r} is not supported; only 'default' rotary is")
    rotary_base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n_blocks = _normalised_block_count(n_blocks, hf, warn=routing_mode != "full")
    try:
        n_heads = int(hf["num_attention_heads"])
        d_model = int(hf["hidden_size"])
        return AttnResConfig(
            d_model=d_model,
            d_head=int(hf.get("head_dim") or d_model // n_heads),
            n_heads=n_heads,
            n_key_value_heads=int(hf.get("num_key_value_heads") or n_heads),
            n_layers=int(hf["num_hidden_layers"]),
            d_mlp=int(hf["intermediate_size"]),
            d_vocab=int(hf["vocab_size"]),
            n_ctx=int(hf.get("max_position_embeddings", 2048)),
            eps=float(hf.get("rms_norm_eps", 1e-6)),
            rotary_base=float(rotary_base),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            model_name=str(hf.get("_name_or_path") or hf.get("name_or_path") or "custom"),
            flavour=flavour,
            routing_mode=routing_mode,
            n_blocks=n_blocks,
            router_bias=router_bias,
            recency_bias_init=float(hf.get("attnres_recency_bias_init") or 0.0),
            dtype=dtype,
            device=device,
        )
    except KeyError as err:
        raise CheckpointError(f"the config lacks the Qwen3 field {err.args[0]!r}") from err


def _normalised_block_count(n_blocks: int, hf: dict[str, Any], *, warn: bool = True) -> int:
    """``attnres_num_blocks > num_hidden_layers`` computes exactly what one block per layer
    computes (layers per block = max(1, ceil(L / N)) = 1): accept it as ``L``, with a note
    (none in full mode, which has no blocks: DELTA's full checkpoints keep the default 8)."""
    n_layers = hf.get("num_hidden_layers")
    if isinstance(n_layers, int) and n_layers >= 1 and n_blocks > n_layers:
        if not warn:
            return n_layers
        warnings.warn(
            f"the checkpoint asks for {n_blocks} blocks but has {n_layers} layers; more blocks than "
            f"layers computes one block per layer, so it is loaded with n_blocks={n_layers}",
            UserWarning,
            stacklevel=4,
        )
        return n_layers
    return n_blocks


@dataclass(frozen=True)
class CheckpointFormat:
    """What a checkpoint holds, decided from its config and key set."""

    name: str  # "qwen3", "qwen3_attnres/cumulative", "qwen3_attnres/kimi", "attnres_lens"
    flavour: str
    routing_mode: str
    n_blocks: int
    with_routers: bool
    schedule: RoutingSchedule


def detect_format(
    hf: dict[str, Any],
    keys: set[str],
    *,
    flavour: Optional[str] = None,
    schedule: Optional[str] = None,
    recency_bias: Optional[float] = None,
    n_blocks: Optional[int] = None,
) -> CheckpointFormat:
    """Decide the format per the spec, refusing anything it does not describe."""
    model_type = hf.get("model_type")
    foreign = layouts.foreign_model_refusal(hf)
    if foreign is not None:
        raise CheckpointError(foreign.message(f"attnres_lens loads the model types {SUPPORTED_MODEL_TYPES}"))
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = hf.get("architectures")
        raise ValueError(
            f"unsupported model_type {model_type!r} (architectures {arch}); attnres_lens loads "
            f"{SUPPORTED_MODEL_TYPES}: a vanilla Qwen3 (wrapped with a schedule) or a Qwen3 "
            "Block AttnRes checkpoint"
        )
    if model_type == "qwen3":
        return _vanilla_format(hf, flavour, schedule, recency_bias, n_blocks)

    mode = hf.get("attnres_mode", "block")
    refused = layouts.mode_refusal(mode)
    if refused is not None:
        raise CheckpointError(refused.message(f"supported modes are {SUPPORTED_ATTNRES_MODES}"))
    mode = layouts.MODE_ALIASES.get(mode, mode)
    gate = hf.get("attnres_gate_type", "bias")
    refused = layouts.gate_refusal(gate) or layouts.null_source_refusal(hf)
    if refused is not None:
        raise CheckpointError(refused.message(f"supported gate types are {SUPPORTED_GATE_TYPES}"))
    blocks = hf.get("attnres_num_blocks")
    if not isinstance(blocks, int) or isinstance(blocks, bool) or blocks < 1:
        raise CheckpointError(f"attnres_num_blocks must be a positive int, got {blocks!r}")
    if n_blocks is not None and n_blocks != blocks:
        raise ValueError(f"n_blocks={n_blocks} contradicts the checkpoint's attnres_num_blocks={blocks}")
    if schedule is not None or recency_bias is not None:
        raise ValueError(
            "schedule/recency_bias only apply when wrapping a vanilla qwen3 checkpoint; this is a "
            "qwen3_attnres checkpoint whose routing is stored in it"
        )

    detected = flavour_of_keys(keys)
    if flavour is not None and flavour != detected:
        raise ValueError(f"flavour={flavour!r} was asked for, but the checkpoint's keys say {detected!r}")
    if layouts.OPEN_FINAL_BIAS in keys and mode == "block":
        mode = "open_block"  # open-attention-residuals' block mode (attnres_lens.scheme.KimiOpenBlock)

    library = hf.get(LIBRARY_KEY) or {}
    saved_schedule = RoutingSchedule.from_dict(library.get("schedule"))
    name = LIBRARY_KEY if library else f"qwen3_attnres/{detected}" + ("-open" if mode == "open_block" else "")
    return CheckpointFormat(name, detected, mode, blocks, True, saved_schedule)


def flavour_of_keys(keys: set[str]) -> str:
    """``"cumulative"`` (``*_res_bias`` keys) or ``"kimi"`` (a final router) for the key set of
    a ``qwen3_attnres`` checkpoint; anything else is refused."""
    has_bias = any(k.endswith(("attn_res_bias", "mlp_res_bias")) for k in keys)
    has_final = "model.final_res_proj.weight" in keys or "model.final_res_norm.weight" in keys
    has_router = any("_res_proj.weight" in k for k in keys)
    if has_bias and has_final and layouts.OPEN_FINAL_BIAS in keys:
        return "kimi"  # open-attention-residuals' block mode: kimi-style sources with biases
    if has_bias and has_final:
        raise CheckpointError(
            "ambiguous qwen3_attnres checkpoint: it has recency-bias keys (*_res_bias, the "
            "cumulative flavour) and a final router (model.final_res_*, the kimi flavour). That is "
            "open-attention-residuals' block mode (kimi-style blocks whose first block includes the "
            "embedding, a recency bias on every router's last source and a biased final router) "
            "only with its model.final_res_bias key, which this checkpoint lacks"
        )
    if has_bias:
        return "cumulative"
    if has_final:
        return "kimi"
    if has_router:
        raise CheckpointError(
            "qwen3_attnres checkpoint with router keys but neither *_res_bias keys (cumulative "
            "flavour) nor model.final_res_proj.weight (kimi flavour): the flavour cannot be decided"
        )
    raise CheckpointError(
        "qwen3_attnres checkpoint without any router keys (model.layers.{l}.attn_res_proj."
        "weight ...); is it a vanilla qwen3 checkpoint with the wrong model_type?"
    )


def _vanilla_format(
    hf: dict, flavour: Optional[str], schedule: Optional[str], recency_bias: Optional[float], n_blocks: Optional[int]
) -> CheckpointFormat:
    if flavour is None:
        raise ValueError(
            "a vanilla qwen3 checkpoint must be wrapped: pass flavour='kimi' (schedule 'uniform') "
            "or flavour='cumulative' (schedule 'recency' with recency_bias=b)"
        )
    if flavour not in WRAP_SCHEDULES:
        raise ValueError(f"flavour must be one of {tuple(WRAP_SCHEDULES)}, got {flavour!r}")
    schedule = schedule or WRAP_SCHEDULES[flavour][0]
    if schedule not in WRAP_SCHEDULES[flavour]:
        raise ValueError(
            f"schedule {schedule!r} does not reproduce a vanilla Qwen3 in the {flavour!r} flavour; "
            f"valid: {WRAP_SCHEDULES[flavour]} (kimi: 'uniform'; cumulative: 'recency')"
        )
    if schedule == "recency":
        if recency_bias is None:
            raise ValueError("schedule 'recency' needs recency_bias=b (e.g. 3.0; larger b is closer to vanilla)")
        routing = RoutingSchedule("recency", float(recency_bias))
    else:
        if recency_bias is not None:
            raise ValueError(f"recency_bias only applies to schedule 'recency', not {schedule!r}")
        routing = RoutingSchedule("uniform")
    n_layers = int(hf["num_hidden_layers"])
    blocks = min(DEFAULT_WRAP_BLOCKS, n_layers) if n_blocks is None else n_blocks
    return CheckpointFormat("qwen3", flavour, "block", blocks, False, routing)


# ------------------------------------------------------------------------- loading
@dataclass
class Checkpoint:
    """A checkpoint read into memory: everything a model needs, and no model."""

    config: AttnResConfig
    format: CheckpointFormat
    #: our parameter name -> tensor (on the requested device and dtype); schedule routers included
    state: dict[str, Tensor]
    tokenizer: Any
    #: checkpoint keys of the tensors holding NaN or inf (read with ``check_finite=False``)
    non_finite: list[str] = field(default_factory=list)

    def into(self, model_class: type) -> Any:
        """A ``model_class(config, tokenizer, init_weights=False)`` built on the meta device and
        given this checkpoint's tensors (no second copy of the weights is made)."""
        with torch.device("meta"):
            model = model_class(self.config, tokenizer=self.tokenizer, init_weights=False)
        model.load_state_dict(self.state, strict=True, assign=True)
        if self.config.tie_word_embeddings:
            model.unembed.weight = model.embed.weight
        model.schedule = self.format.schedule
        model.checkpoint_format = self.format.name
        model.non_finite_keys = list(self.non_finite)
        return model


def read_checkpoint(
    source: Union[str, os.PathLike, nn.Module],
    *,
    flavour: Optional[str] = None,
    schedule: Optional[str] = None,
    recency_bias: Optional[float] = None,
    n_blocks: Optional[int] = None,
    dtype: Optional[Union[torch.dtype, str]] = None,
    device: Optional[Union[str, torch.device]] = None,
    tokenizer: Any = None,
    check_finite: bool = True,
) -> Checkpoint:
    """Read ``source`` (see :meth:`HookedAttnResTransformer.from_pretrained`), checking the
    config (types, and counts against the weights), keys, shapes and dtypes before any tensor
    is read. A tensor holding NaN or inf is refused unless ``check_finite=False`` (then
    :attr:`Checkpoint.non_finite` names them)."""
    dtype = _resolve_dtype(dtype)
    device = resolve_device(device)
    source_files = _open_source(source)
    where = str(source_files.directory / "config.json") if source_files.directory is not None else "the model's config"
    if source_files.hf.get("model_type") in SUPPORTED_MODEL_TYPES:
        check_config_types(source_files.hf, where)
        check_counts_against_weights(source_files.hf, source_files.keys, source_files.shapes, where)
    fmt = detect_format(
        source_files.hf, source_files.keys,
        flavour=flavour, schedule=schedule, recency_bias=recency_bias, n_blocks=n_blocks,
    )
    library = source_files.hf.get(LIBRARY_KEY) or {}
    cfg = config_from_hf(
        source_files.hf, flavour=fmt.flavour, routing_mode=fmt.routing_mode, n_blocks=fmt.n_blocks,
        router_bias=library.get("router_bias"), dtype=dtype, device=str(device),
    )
    expected = key_map(cfg, with_routers=fmt.with_routers)
    _check_keys(source_files.keys, expected, fmt, cfg)
    _check_shapes(source_files.shapes, checkpoint_shapes(cfg, with_routers=fmt.with_routers), fmt)
    _check_dtypes(source_files.dtypes, expected)
    state, non_finite = _read_state(source_files.read, expected, device, dtype)
    if non_finite and check_finite:
        raise CheckpointError(
            f"{len(non_finite)} tensor(s) hold NaN or inf: {_preview(non_finite)}; the checkpoint is corrupt "
            "(`attnres-lens inspect` lists them; from_pretrained(..., check_finite=False) loads it anyway)"
        )
    if not fmt.with_routers:
        state.update(_schedule_router_state(cfg, fmt.schedule, device, dtype))
    if cfg.tie_word_embeddings:
        state["unembed.weight"] = state["embed.weight"]
    if tokenizer is None:
        tokenizer = _find_tokenizer(source_files.directory, cfg, source_files.hf)
    return Checkpoint(cfg, fmt, state, tokenizer, non_finite)


@dataclass
class _SourceFiles:
    """What a source offers before any tensor is read."""

    hf: dict[str, Any]
    keys: set[str]
    shapes: dict[str, tuple[int, ...]]
    read: Any  # callable: list of keys -> iterator of (key, tensor)
    directory: Optional[Path]
    dtypes: dict[str, tuple[bool, str]] = field(default_factory=dict)  # key -> (floating point?, name)


def _open_source(source: Union[str, os.PathLike, nn.Module]) -> _SourceFiles:
    if isinstance(source, nn.Module):
        return _from_module(source)
    directory = _resolve_directory(source)
    if not (directory / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {str(directory)!r}")
    hf = read_json(directory / "config.json")
    if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        detect_format(hf, set())  # raises the unsupported-architecture error first
    files = WeightFiles.find(directory)
    return _SourceFiles(hf, files.keys(), files.shapes, files.read, directory, files.dtypes)


def _read_state(
    read: Any, expected: dict[str, str], device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Tensor], list[str]]:
    # Always copy: an in-memory model's tensors are the user's, and safetensors hands out
    # copy-on-write maps of the file, which would tie the model to the file staying unchanged.
    # Each tensor's map is released as soon as its copy is made, so the peak stays at about
    # the model plus one tensor.
    state: dict[str, Tensor] = {}
    non_finite: list[str] = []
    for key, tensor in read(sorted(expected)):
        state[expected[key]] = tensor.to(device=device, dtype=dtype, copy=True)
        if not bool(torch.isfinite(tensor).all()):
            non_finite.append(key)
        del tensor
    return state, non_finite


def _check_dtypes(dtypes: dict[str, tuple[bool, str]], expected: dict[str, str]) -> None:
    """Every weight is stored in a floating-point dtype (an int32 weight is not a weight)."""
    wrong = [f"{key}: {dtypes[key][1]}" for key in sorted(expected) if key in dtypes and not dtypes[key][0]]
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} tensor(s) are stored in a dtype that does not fit their parameter, which expects a "
            "floating-point dtype (float32, bfloat16 or float16): " + "; ".join(wrong[:8])
            + (f"; ... ({len(wrong) - 8} more)" if len(wrong) > 8 else "")
            + "; the checkpoint is corrupt or was converted wrongly"
        )


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: cpu; ``"auto"``: a CUDA GPU when present),
    refusing, with a clear message, a device this machine does not have."""
    if device is None:
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto', got {device!r}") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        build = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"device={str(device)!r} but {build} (torch {torch.__version__}); use device 'cpu' (--device cpu)")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(f"device={str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={str(device)!r} but MPS is not available here; use device 'cpu' (--device cpu)")
    return resolved


def _resolve_dtype(dtype: Optional[Union[torch.dtype, str]]) -> torch.dtype:
    allowed = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in allowed:
            raise ValueError(f"dtype must be one of {tuple(allowed)}, got {dtype!r}")
        return allowed[dtype]
    if dtype not in allowed.values():
        raise ValueError(f"dtype must be one of {tuple(allowed)}, got {dtype}")
    return dtype


def _resolve_directory(source: Union[str, os.PathLike]) -> Path:
    path = local_checkpoint(source)
    if path is not None:
        return path
    name = str(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.tiktoken"],
            )
        )
    except Exception as err:
        raise OSError(f"could not fetch {name!r} from the Hugging Face hub: {err}") from err


def _from_module(source: nn.Module) -> "_SourceFiles":
    config = getattr(source, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(
            f"an in-memory source must be a Hugging Face model (e.g. transformers.Qwen3ForCausalLM), "
            f"got {type(source).__name__}"
        )
    hf = config.to_dict()
    if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
        detect_format(hf, set())
    if callable(getattr(source, "checkpoint_state", None)):
        weights = source.checkpoint_state()  # attnres_lens.hf's model: its tensors by checkpoint key
    elif hasattr(source, "lm_head"):
        weights = source.state_dict()  # references only; copied tensor by tensor below
    else:
        raise TypeError(
            f"{type(source).__name__} has no language-model head; pass a Qwen3ForCausalLM or a "
            "Qwen3AttnResForCausalLM"
        )
    if hf.get("tie_word_embeddings"):
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}

    def read(keys: list[str]) -> Iterator[tuple[str, Tensor]]:
        for key in keys:
            yield key, weights[key].detach()

    keys = {k for k in weights if not k.endswith(_IGNORED_KEYS_SUFFIXES)}
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    dtypes = {k: (v.is_floating_point(), str(v.dtype).removeprefix("torch.")) for k, v in weights.items()}
    return _SourceFiles(hf, keys, shapes, read, None, dtypes)


def _check_keys(keys: set[str], expected: dict[str, str], fmt: CheckpointFormat, cfg: AttnResConfig) -> None:
    present = set(keys)
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exporters keep the tied copy
    missing, unexpected = set(expected) - present, present - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint keys do not match the assumed format {fmt.name!r} (flavour "
            f"{fmt.flavour!r}, mode {fmt.routing_mode!r}, {cfg.n_layers} layers): missing "
            f"{_preview(missing)}; unexpected {_preview(unexpected)}"
        )


def _check_shapes(
    shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], fmt: CheckpointFormat
) -> None:
    wrong = [
        f"{key}: {tuple(shapes[key])} (config says {shape})"
        for key, shape in expected.items()
        if tuple(shapes[key]) != shape
    ]
    if wrong:
        raise CheckpointError(
            f"tensor shapes contradict the config (format {fmt.name!r}): " + "; ".join(wrong[:8])
            + (f"; ... ({len(wrong) - 8} more)" if len(wrong) > 8 else "")
        )


def _schedule_router_state(
    cfg: AttnResConfig, schedule: RoutingSchedule, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Router weights of a wrap: zero queries, unit key gains, the schedule's bias."""
    vanilla = set(key_map(cfg, with_routers=False).values())
    values = {
        "proj.weight": lambda: torch.zeros(1, cfg.d_model, device=device, dtype=dtype),
        "norm.weight": lambda: torch.ones(cfg.d_model, device=device, dtype=dtype),
        "bias": lambda: torch.tensor(schedule.bias, device=device, dtype=dtype),
    }
    routers = [name for name in key_map(cfg, with_routers=True).values() if name not in vanilla]
    return {name: values[name.split("_router.")[-1]]() for name in routers}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
#: The byte tokenizer is assumed only for vocabularies this small: 256 byte ids, possibly padded
#: or with a few special ids. A larger vocabulary was made by a real tokenizer, which must be given.
BYTE_VOCAB_MAX = 512


class NoTokenizer:
    """Stands in for the tokenizer of a checkpoint that ships none and whose vocabulary is not
    byte-sized: token tensors work, and any text is refused with what to pass instead."""

    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    name_or_path = "none"

    def __init__(self, d_vocab: int):
        self.d_vocab = d_vocab

    def _refuse(self, *_args: Any, **_kwargs: Any) -> Any:
        raise ValueError(
            f"this model has no tokenizer: its checkpoint ships none, and its vocabulary of "
            f"{self.d_vocab:,} tokens is not the built-in byte tokenizer's ({N_BYTES}); pass the "
            "model's tokenizer with from_pretrained(..., tokenizer=...) (on the command line: "
            "--tokenizer DIR), or give token ids instead of text"
        )

    encode = decode = convert_ids_to_tokens = __call__ = _refuse

    def __repr__(self) -> str:
        return f"NoTokenizer(d_vocab={self.d_vocab})"


def byte_tokenizer_fits(d_vocab: int) -> bool:
    """Whether a model of this vocabulary can have been trained on the byte tokenizer."""
    return N_BYTES <= d_vocab <= BYTE_VOCAB_MAX


def tokenizer_name(tokenizer: Any) -> str:
    """How reports name a tokenizer: ``byte-level (built in)``, ``none``, or the HF name."""
    if isinstance(tokenizer, ByteTokenizer):
        return "byte-level (built in)"
    if isinstance(tokenizer, NoTokenizer):
        return "none (token ids only; pass tokenizer= / --tokenizer DIR for text)"
    return str(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)


def load_tokenizer_dir(directory: Union[str, os.PathLike]) -> Any:
    """A Hugging Face tokenizer from a local directory (never the hub)."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise ValueError(f"a tokenizer is a local directory holding a Hugging Face tokenizer, got {str(directory)!r}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many types; re-raised with context
        raise ValueError(f"could not load a tokenizer from {str(path)!r}: {err}") from err


def _find_tokenizer(directory: Optional[Path], cfg: AttnResConfig, hf: dict[str, Any]) -> Any:
    """The checkpoint's own tokenizer, else the byte tokenizer where it fits, else
    :class:`NoTokenizer` (which refuses text with what to pass)."""
    if directory is not None and any((directory / n).exists() for n in TOKENIZER_FILES):
        return load_tokenizer_dir(directory)
    saved = (hf.get(LIBRARY_KEY) or {}).get("tokenizer")
    if saved == "byte" or (saved is None and byte_tokenizer_fits(cfg.d_vocab)):
        return ByteTokenizer()
    return NoTokenizer(cfg.d_vocab)


# ------------------------------------------------------------------------- saving
def hf_config_dict(model: "HookedAttnResTransformer") -> dict[str, Any]:
    """The ``config.json`` of ``model`` in the ``qwen3_attnres`` layout of its flavour."""
    cfg = model.cfg
    scheme = cfg.scheme
    if cfg.router_bias != scheme.default_router_bias:
        raise ValueError(
            f"a {cfg.flavour}-flavour model {'with' if cfg.router_bias else 'without'} router biases has no "
            f"qwen3_attnres layout in routing mode {cfg.routing_mode!r} (its layout's routers "
            f"{'have' if scheme.default_router_bias else 'have no'} *_res_bias)"
        )
    out: dict[str, Any] = {
        "architectures": ["Qwen3AttnResForCausalLM"],
        "model_type": "qwen3_attnres",
        "vocab_size": cfg.d_vocab,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_mlp,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_key_value_heads,
        "head_dim": cfg.d_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.eps,
        "rope_theta": cfg.rotary_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "use_sliding_window": False,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": str(cfg.dtype).removeprefix("torch."),
        "attnres_num_blocks": cfg.n_blocks,
        "attnres_mode": scheme.checkpoint_mode or cfg.routing_mode,
        "attnres_gate_type": "bias",
    }
    if cfg.router_bias:
        out["attnres_recency_bias_init"] = cfg.recency_bias_init
    from . import __version__

    out[LIBRARY_KEY] = {
        "version": __version__,
        "flavour": cfg.flavour,
        "routing_mode": cfg.routing_mode,
        "layers_per_block": cfg.layers_per_block,
        "router_bias": cfg.router_bias,
        "schedule": model.schedule.to_dict(),
        "tokenizer": _saved_tokenizer_kind(model.tokenizer),
    }
    return out


def _saved_tokenizer_kind(tokenizer: Any) -> str:
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    return "none" if isinstance(tokenizer, NoTokenizer) else "hf"


def save_pretrained(
    model: "HookedAttnResTransformer",
    directory: Union[str, os.PathLike],
    *,
    max_shard_size: Union[int, str, None] = None,
) -> Path:
    """Write ``config.json`` and safetensors (sharded with an index when ``max_shard_size`` is
    given, e.g. ``"200MB"``) in the ``qwen3_attnres`` layout of the model's flavour, and the
    tokenizer when it is a Hugging Face one."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    config = hf_config_dict(model)  # validates before anything is written
    ours_to_hf = {ours: hf for hf, ours in key_map(model.cfg, with_routers=True).items()}
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted(set(ours_to_hf) - set(params))
    if missing:
        raise RuntimeError(
            f"the model's parameters are not under the library's names (missing {_preview(missing)}): "
            "its modules were wrapped, e.g. by a TransformerLens TransformerBridge; save "
            "attnres_lens.tl_bridge.attnres_model(bridge) instead"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {hf: params[ours].detach().contiguous() for ours, hf in ours_to_hf.items()}

    for stale in (SAFE_WEIGHTS, SAFE_INDEX):
        (directory / stale).unlink(missing_ok=True)
    if max_shard_size is None:
        save_file(tensors, str(directory / SAFE_WEIGHTS), metadata={"format": "pt"})
    else:
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
        for shard_file, shard_keys in split.filename_to_tensors.items():
            save_file({k: tensors[k] for k in shard_keys}, str(directory / shard_file), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": split.tensor_to_filename}
            (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    honour_umask(directory.glob("*.safetensors"))
    if not isinstance(model.tokenizer, ByteTokenizer) and hasattr(model.tokenizer, "save_pretrained"):
        model.tokenizer.save_pretrained(str(directory))
    return directory
