"""`AttnResConfig`: a TransformerLens config for a Qwen3 backbone with Block AttnRes routing.

Field names follow TransformerLens (``d_model``, ``n_layers``, ``n_heads``, ...). The routing
fields describe which of the two flavours in ``docs/concepts.md`` the model computes.
:class:`RoutingSchedule` is the pure value saying how a wrapped model's routing was set.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Optional, Union

import torch

from .compat import TransformerLensConfig
from .scheme import FLAVOURS, ROUTING_MODES, RoutingScheme, scheme_class

Flavour = Literal["kimi", "cumulative"]
RoutingMode = Literal["block", "full"]


@dataclass
class AttnResConfig(TransformerLensConfig):
    """Configuration of a :class:`~attnres_lens.HookedAttnResTransformer`.

    Backbone (Qwen3) fields keep their TransformerLens names and meaning. ``d_head`` may differ
    from ``d_model / n_heads`` (Qwen3 allows it: ``o_proj`` maps ``n_heads * d_head`` back to
    ``d_model``). ``n_heads`` is inferred as ``d_model // d_head`` only when left unset.

    Routing fields:

    - ``flavour``: ``"kimi"`` (Block AttnRes of the Kimi report, block summaries + partial sum,
      with a final router) or ``"cumulative"`` (snapshots of the cumulative stream, a recency bias,
      no final router).
    - ``routing_mode``: ``"block"`` (sources are blocks of layers) or ``"full"`` (every sublayer
      output is its own source in kimi; a snapshot after every sublayer in cumulative).
    - ``n_blocks`` / ``layers_per_block``: give either. ``layers_per_block`` is
      ``max(1, ceil(n_layers / n_blocks))`` (``docs/concepts.md``, "Blocks"); the last block may be
      shorter. ``n_blocks`` holds the count actually built, ``ceil(n_layers / layers_per_block)``:
      a request that builds fewer blocks (4 layers, 3 blocks -> 2 blocks of 2) is stored as the
      built count, with a warning.
    - ``router_bias``: whether every router has a scalar recency bias on its last source.
      Defaults to ``True`` for cumulative and ``False`` for kimi (the ``qwen3_attnres`` layouts).
    - ``recency_bias_init``: the bias value a freshly built model starts with.
    - ``tie_word_embeddings``: whether the unembedding shares the embedding matrix.
    """

    d_model: int = 64
    d_head: int = 16
    n_layers: int = 2
    n_ctx: int = 2048
    n_heads: int = -1
    d_mlp: Optional[int] = None
    d_vocab: int = 256
    n_key_value_heads: Optional[int] = None
    eps: float = 1e-6
    act_fn: str = "silu"
    normalization_type: Optional[str] = "RMS"
    uses_rms_norm: bool = True
    final_rms: bool = True
    gated_mlp: bool = True
    positional_embedding_type: str = "rotary"
    default_prepend_bos: bool = False
    rotary_base: float = 10000.0
    initializer_range: float = 0.02
    model_name: str = "custom"
    tokenizer_name: Optional[str] = None

    flavour: str = "kimi"
    routing_mode: str = "block"
    n_blocks: Optional[int] = None
    layers_per_block: Optional[int] = None
    router_bias: Optional[bool] = None
    recency_bias_init: float = 0.0
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "d_head", "n_layers", "n_ctx", "d_vocab"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_heads != -1 and (not isinstance(self.n_heads, int) or self.n_heads < 1):
            raise ValueError(f"n_heads must be a positive int (or -1 to infer), got {self.n_heads!r}")
        if self.n_heads == -1 and self.d_model % self.d_head != 0:
            raise ValueError(
                f"n_heads was not given, so it is inferred as d_model / d_head, but d_model="
                f"{self.d_model} is not a multiple of d_head={self.d_head}; pass n_heads explicitly "
                "(Qwen3 allows n_heads * d_head != d_model)"
            )
        super().__post_init__()
        if self.d_mlp is None or self.d_mlp < 1:
            raise ValueError(f"d_mlp must be a positive int, got {self.d_mlp!r}")
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.n_key_value_heads < 1 or self.n_heads % self.n_key_value_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} must be divisible by n_key_value_heads="
                f"{self.n_key_value_heads} (grouped-query attention shares each key/value head "
                f"between n_heads / n_key_value_heads query heads); valid n_key_value_heads: "
                f"{[d for d in range(1, self.n_heads + 1) if self.n_heads % d == 0]}"
            )
        if self.act_fn != "silu":
            raise ValueError(f"act_fn must be 'silu' (Qwen3's SwiGLU MLP), got {self.act_fn!r}")
        if not (self.eps > 0):
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if self.flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {self.flavour!r}")
        if self.routing_mode not in ROUTING_MODES:
            raise ValueError(f"routing_mode must be one of {ROUTING_MODES}, got {self.routing_mode!r}")
        layout = scheme_class(self.flavour, self.routing_mode)
        self._resolve_blocks()
        if self.router_bias is None:
            self.router_bias = layout.default_router_bias
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype)

    def _resolve_blocks(self) -> None:
        if self.n_blocks is None and self.layers_per_block is None:
            self.n_blocks = self.n_layers
        if self.n_blocks is not None:
            if not isinstance(self.n_blocks, int) or not 1 <= self.n_blocks <= self.n_layers:
                raise ValueError(
                    f"n_blocks must be an int in [1, n_layers={self.n_layers}], got {self.n_blocks!r}"
                )
            per_block = max(1, math.ceil(self.n_layers / self.n_blocks))
            if self.layers_per_block is not None and self.layers_per_block != per_block:
                raise ValueError(
                    f"layers_per_block={self.layers_per_block} contradicts n_blocks={self.n_blocks} "
                    f"(which gives ceil({self.n_layers} / {self.n_blocks}) = {per_block}); give one"
                )
            self.layers_per_block = per_block
            built = math.ceil(self.n_layers / per_block)
            if built != self.n_blocks:  # e.g. 4 layers, 3 blocks asked: blocks of 2 make only 2
                warnings.warn(
                    f"n_blocks={self.n_blocks} with n_layers={self.n_layers} builds {built} blocks of "
                    f"{per_block} layer(s) (layers per block = ceil({self.n_layers} / {self.n_blocks}) = "
                    f"{per_block}); n_blocks is set to {built}, the count actually built",
                    UserWarning,
                    stacklevel=4,
                )
                self.n_blocks = built
        else:
            if not isinstance(self.layers_per_block, int) or not (
                1 <= self.layers_per_block <= self.n_layers
            ):
                raise ValueError(
                    f"layers_per_block must be an int in [1, n_layers={self.n_layers}], got "
                    f"{self.layers_per_block!r}"
                )
            self.n_blocks = math.ceil(self.n_layers / self.layers_per_block)

    # ------------------------------------------------------------------ derived facts
    @property
    def n_sublayers(self) -> int:
        """Attention and MLP sublayers, in order attn_0, mlp_0, attn_1, ..."""
        return 2 * self.n_layers

    @property
    def scheme(self) -> RoutingScheme:
        """The routing layout of this config (:mod:`attnres_lens.scheme`)."""
        return scheme_class(self.flavour, self.routing_mode)(self.n_layers, self.layers_per_block)

    @property
    def has_final_router(self) -> bool:
        return self.scheme.has_final_router

    def block_of_layer(self, layer: int) -> int:
        return layer // self.layers_per_block

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> "AttnResConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config_dict.items() if k in known})


ScheduleKind = Literal["none", "uniform", "recency"]
SCHEDULE_KINDS = ("none", "uniform", "recency")


@dataclass(frozen=True)
class RoutingSchedule:
    """How a model's routing was set when it was wrapped.

    ``kind="none"`` means the routing is learned (or was edited): there is no prediction.
    ``bias`` is the recency bias every router carries under ``kind="recency"``.
    """

    kind: ScheduleKind = "none"
    bias: Optional[float] = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {self.kind!r}")
        if self.kind == "recency" and (self.bias is None or not math.isfinite(self.bias)):
            raise ValueError(f"a recency schedule needs a finite bias, got {self.bias!r}")
        if self.kind != "recency" and self.bias is not None:
            raise ValueError(f"only a recency schedule has a bias; got bias={self.bias!r} for {self.kind!r}")

    @property
    def is_scheduled(self) -> bool:
        return self.kind != "none"

    def expected_weights(self, n_sources: int, has_bias: bool) -> list[float]:
        """The analytic routing weights of a router with ``n_sources`` sources."""
        if self.kind == "none":
            raise ValueError("a model with learned routing (schedule 'none') has no analytic weights")
        if self.kind == "uniform" or not has_bias:
            return [1.0 / n_sources] * n_sources
        # Computed as a softmax of the logits [0, ..., 0, b] in float64: this is
        # e^b / (e^b + n - 1) without overflow for a huge b.
        logits = torch.zeros(n_sources, dtype=torch.float64)
        logits[-1] = self.bias
        return torch.softmax(logits, dim=0).tolist()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Union[dict, None]) -> "RoutingSchedule":
        if not data:
            return cls()
        return cls(kind=data.get("kind", "none"), bias=data.get("bias"))
