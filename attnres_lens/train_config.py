"""`TrainConfig`: everything that determines a training run, as a pure value.

Kept apart from :mod:`attnres_lens.training` (which needs torch and the model) so that the
command line can describe ``train``'s options without importing either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

ARCHS = ("kimi", "cumulative", "qwen3")
PRECISIONS = ("auto", "fp32", "bf16")
TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"
TRAINING_LOG = "training_log.json"
CHECKPOINTS = "checkpoints"
#: Written last into a checkpoint directory: the step is complete (with its files' sizes).
CHECKPOINT_COMPLETE = "checkpoint_complete.json"
PathLike = Union[str, Path]


class TrainingError(ValueError):
    """A training run that cannot start or continue (bad config, data, or checkpoint)."""


# ============================================================================ configuration
@dataclass
class TrainConfig:
    """Everything that determines a training run. Saved with every checkpoint.

    Model shape: ``n_layers``, ``d_model``, ``n_heads``, ``n_key_value_heads`` (default
    ``n_heads``), ``d_head`` (default ``d_model // n_heads``), ``d_mlp`` (default
    ``3 * d_model``), ``n_blocks`` (AttnRes only; default one block per layer),
    ``tie_word_embeddings``, ``rotary_base``. The context length is ``seq_len``.
    """

    # model
    arch: str = "kimi"
    routing_mode: str = "block"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_key_value_heads: Optional[int] = None
    d_head: Optional[int] = None
    d_mlp: Optional[int] = None
    n_blocks: Optional[int] = None
    tie_word_embeddings: bool = False
    rotary_base: float = 10000.0
    initializer_range: float = 0.02
    # data
    data: list[Union[str, Path]] = field(default_factory=list)
    eval_data: list[Union[str, Path]] = field(default_factory=list)
    glob: str = "*"
    tokenizer: Optional[Union[str, Path]] = None
    eval_fraction: float = 0.02
    max_tokens: Optional[int] = None
    seq_len: int = 256
    # optimisation
    steps: int = 1000
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bookkeeping
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 0
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"
    threads: Optional[int] = None
    out_dir: Union[str, Path] = "attnres-run"

    def __post_init__(self) -> None:
        self.data = [str(p) for p in self.data]
        self.eval_data = [str(p) for p in self.eval_data]
        self.out_dir = str(self.out_dir)
        if self.tokenizer is not None:
            self.tokenizer = str(self.tokenizer)
        self.validate()

    # which fields may differ when a run is resumed (they do not change the trajectory)
    RESUMABLE_OVERRIDES = ("out_dir", "device", "precision", "threads", "save_every", "eval_every")

    def validate(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and (
                value >= 0 if allow_zero else value >= 1
            )
            if not ok:
                bound = ">= 0" if allow_zero else ">= 1"
                raise TrainingError(f"{name} must be an int {bound}, got {value!r}")

        if self.arch not in ARCHS:
            raise TrainingError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.routing_mode not in ("block", "full"):
            raise TrainingError(f"routing_mode must be 'block' or 'full', got {self.routing_mode!r}")
        for name in ("n_layers", "d_model", "n_heads", "seq_len", "steps", "batch_size", "eval_batches"):
            positive(name)
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            positive(name, allow_zero=True)
        if self.seq_len < 2:
            raise TrainingError(f"seq_len must be >= 2 (one next-token target), got {self.seq_len}")
        for name in ("n_key_value_heads", "d_head", "d_mlp", "n_blocks", "max_tokens", "threads"):
            if getattr(self, name) is not None:
                positive(name)
        if self.d_head is None and self.d_model % self.n_heads != 0:
            raise TrainingError(
                f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}; give d_head"
            )
        kv = self.n_key_value_heads or self.n_heads
        if self.n_heads % kv != 0:
            raise TrainingError(f"n_heads={self.n_heads} must be divisible by n_key_value_heads={kv}")
        if self.n_blocks is not None and not 1 <= self.n_blocks <= self.n_layers:
            raise TrainingError(f"n_blocks must be in [1, n_layers={self.n_layers}], got {self.n_blocks}")
        if self.arch == "qwen3" and (self.n_blocks is not None or self.routing_mode != "block"):
            raise TrainingError("n_blocks / routing_mode apply to AttnRes archs only, not arch='qwen3'")
        for name in ("lr", "grad_clip"):
            if not (isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0):
                raise TrainingError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise TrainingError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise TrainingError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise TrainingError(f"beta1, beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0 < self.eval_fraction < 1:
            raise TrainingError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith(("cuda", "mps")):
            raise TrainingError(f"device must be 'cpu', 'auto', 'cuda[:N]' or 'mps', got {self.device!r}")

    # ------------------------------------------------------------------ derived
    @property
    def resolved_d_head(self) -> int:
        return self.d_head if self.d_head is not None else self.d_model // self.n_heads

    @property
    def resolved_d_mlp(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 3 * self.d_model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainingError(f"unknown training options {unknown}; valid: {sorted(known)}")
        return cls(**d)
