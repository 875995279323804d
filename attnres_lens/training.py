"""Train Block AttnRes models (and a standard-residual Qwen3 baseline) from scratch.

The study this library serves compares a vanilla model wrapped with a routing schedule against
an AttnRes model whose routing was trained. This module makes the second kind (and the first
kind's vanilla model) on a laptop::

    from attnres_lens.training import TrainConfig, train
    result = train(TrainConfig(arch="cumulative", steps=300, out_dir="runs/cum"))
    result.model, result.final_eval_loss, result.unigram_eval_loss

or from the shell: ``attnres-lens train --arch cumulative --steps 300 --out runs/cum``.

What is trained
    ``arch="kimi"`` or ``"cumulative"``: a :class:`~attnres_lens.HookedAttnResTransformer` of
    that flavour (``routing_mode`` block or full), every router query zero-initialised (so each
    router starts as a plain average of its sources) and, for cumulative, every recency bias
    starting at 0. ``arch="qwen3"``: a standard-residual ``transformers.Qwen3ForCausalLM`` of the
    same shape, saved in Hugging Face's Qwen3 format, so it can later be wrapped with
    ``HookedAttnResTransformer.from_pretrained(dir, flavour=..., schedule=...)``.

Optimisation
    AdamW (weight decay on matrices only; router queries, norm gains and biases are not decayed),
    linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient clipping by global norm,
    an evaluation loss on held-out text every ``eval_every`` steps. CPU and fp32 by default
    (bit-reproducible); with ``device="cuda"`` (or ``"auto"`` when a GPU is present) the
    forward runs under bf16 autocast (``precision="auto"``).

Data
    Local text files or directories (walked recursively for ``glob``; hidden entries and files
    that are not UTF-8 are skipped), tokenised with the built-in byte-level tokenizer
    (:class:`~attnres_lens.ByteTokenizer`, vocabulary 256) or a Hugging Face tokenizer directory.
    With no data given, the corpus is the **Python standard library's own source files**
    (``sysconfig.get_paths()["stdlib"]``, ``*.py``, without ``site-packages``): real text of
    about 30 MB that exists on every machine this library runs on, with no download, under the
    PSF license. Files are read in sorted order; the held-out split is chosen per file by a
    hash of its path relative to the corpus root (``zlib.crc32``), so it is the same on every
    machine and does not depend on which other files exist. The exact stdlib differs between
    Python versions: the run records a fingerprint of the tokens it trained on.

Reproducibility
    Batch ``t`` is drawn from a generator seeded by ``(seed, t)``, so the data order does not
    depend on anything that came before. A checkpoint (``out_dir/checkpoints/step-NNNNNN``) holds
    the model (written by :func:`save_model`) and ``trainer_state.pt`` (optimizer, scheduler,
    RNG states, history, config, data fingerprint); resuming from it reproduces, on the same
    device, exactly the loss trajectory of the uninterrupted run. ``threads`` sets torch's
    intra-op threads for the run (restored afterwards); on a busy machine ``threads=1`` can be
    much faster than oversubscribed cores. Bit-for-bit equality across different thread counts
    or machines is not promised (floating-point reductions may be ordered differently).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import random
import sysconfig
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import metrics
from .config import AttnResConfig
from .model import HookedAttnResTransformer
from .tokenizer import ByteTokenizer

ARCHS = ("kimi", "cumulative", "qwen3")
PRECISIONS = ("auto", "fp32", "bf16")
TRAINER_STATE = "trainer_state.pt"
TRAIN_CONFIG = "train_config.json"
TRAINING_LOG = "training_log.json"
CHECKPOINTS = "checkpoints"
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


# ============================================================================ data
def stdlib_root() -> Path:
    """The directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The default corpus: every ``*.py`` file of the standard library, sorted, without
    ``site-packages``/``dist-packages``/``__pycache__`` (installed third-party code)."""
    root = stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        out.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def collect_files(paths: Sequence[PathLike], glob: str = "*") -> list[tuple[Path, str]]:
    """``(file, key)`` pairs for the given files and directories (walked recursively, sorted,
    hidden entries skipped, file names matched against the comma-separated ``glob``). ``key``
    is the file's path relative to the directory it was found under (its name for a file
    given directly): the held-out split hashes it."""
    patterns = [g.strip() for g in glob.split(",") if g.strip()] or ["*"]
    out: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            out.append((path, path.name))
        elif path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in filenames:
                    if not f.startswith(".") and any(fnmatch.fnmatch(f, g) for g in patterns):
                        found.append(Path(dirpath) / f)
            if not found:
                raise TrainingError(f"no files matching {glob!r} under {path}")
            out.extend((p, p.relative_to(path).as_posix()) for p in sorted(found))
        else:
            raise TrainingError(f"data path {raw} does not exist")
    return out


def is_held_out(key: str, eval_fraction: float) -> bool:
    """The deterministic held-out rule: ``crc32(key) mod 10000 < eval_fraction * 10000``."""
    return zlib.crc32(key.encode("utf-8")) % 10000 < round(eval_fraction * 10000)


def load_tokenizer(tokenizer: Optional[str]) -> Any:
    """The built-in byte tokenizer (``None``) or a Hugging Face tokenizer from a local directory."""
    if tokenizer is None:
        return ByteTokenizer()
    path = Path(tokenizer).expanduser()
    if not path.is_dir():
        raise TrainingError(f"tokenizer must be a local directory holding a Hugging Face tokenizer, got {tokenizer}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise TrainingError(f"could not load a tokenizer from {path}: {exc}") from exc


def vocab_size(tokenizer: Any) -> int:
    return len(tokenizer)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class Corpus:
    """Tokenised training and held-out text (1-D token tensors) and where they came from."""

    train: Tensor
    eval: Tensor
    train_files: list[str]
    eval_files: list[str]
    skipped_files: list[str]
    source: str

    @property
    def fingerprint(self) -> str:
        """sha1 over both token streams: a resumed run must see the same data."""
        h = hashlib.sha1()
        for t in (self.train, self.eval):
            h.update(str(t.numel()).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()


def _tokens_of(files: list[tuple[Path, str]], tokenizer: Any, skipped: list[str]) -> Tensor:
    byte_level = isinstance(tokenizer, ByteTokenizer)
    sep = [] if byte_level else [t for t in [getattr(tokenizer, "eos_token_id", None)] if t is not None]
    chunks: list[np.ndarray] = []
    for path, key in files:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(key)
            continue
        if byte_level:
            chunks.append(np.frombuffer(raw, dtype=np.uint8))
        else:
            chunks.append(np.asarray(encode_text(tokenizer, text) + sep, dtype=np.int64))
    if not chunks:
        return torch.zeros(0, dtype=torch.uint8 if byte_level else torch.int32)
    arr = np.concatenate(chunks)
    if not byte_level:
        arr = arr.astype(np.int32)
    return torch.from_numpy(arr.copy())


def load_corpus(cfg: TrainConfig, tokenizer: Any = None) -> Corpus:
    """Read and tokenise the training data of ``cfg`` (the stdlib when ``cfg.data`` is empty)
    and split it into train / held-out as described in the module docstring."""
    tokenizer = load_tokenizer(cfg.tokenizer) if tokenizer is None else tokenizer
    if cfg.data:
        files = collect_files(cfg.data, cfg.glob)
        source = ", ".join(cfg.data)
    else:
        root = stdlib_root()
        files = [(p, p.relative_to(root).as_posix()) for p in stdlib_files()]
        source = f"python-stdlib:{root}"
        if not files:
            raise TrainingError(f"no *.py files found under the standard library {root}")
    skipped: list[str] = []
    if cfg.eval_data:
        train_files, eval_files = files, collect_files(cfg.eval_data, cfg.glob)
    elif len(files) >= 2:
        eval_files = [f for f in files if is_held_out(f[1], cfg.eval_fraction)]
        if not eval_files:  # tiny corpora: hold out the file with the smallest hash
            eval_files = [min(files, key=lambda f: zlib.crc32(f[1].encode("utf-8")))]
        if len(eval_files) == len(files):
            eval_files = eval_files[:1]
        held = {f[1] for f in eval_files}
        train_files = [f for f in files if f[1] not in held]
    else:
        train_files, eval_files = files, []
    train_tokens = _tokens_of(train_files, tokenizer, skipped)
    if eval_files:
        eval_tokens = _tokens_of(eval_files, tokenizer, skipped)
    else:  # one file: hold out its last eval_fraction of tokens
        cut = int(train_tokens.numel() * (1 - cfg.eval_fraction))
        train_tokens, eval_tokens = train_tokens[:cut], train_tokens[cut:]
    if cfg.max_tokens is not None:
        train_tokens = train_tokens[: cfg.max_tokens]
    for name, tokens in (("training", train_tokens), ("held-out", eval_tokens)):
        if tokens.numel() < cfg.seq_len:
            raise TrainingError(
                f"the {name} text has {tokens.numel()} tokens, fewer than seq_len={cfg.seq_len}; "
                "give more data (or a larger eval_fraction / explicit eval_data), or lower seq_len"
            )
    return Corpus(
        train=train_tokens,
        eval=eval_tokens,
        train_files=[k for _, k in train_files if k not in skipped],
        eval_files=[k for _, k in eval_files if k not in skipped],
        skipped_files=skipped,
        source=source,
    )


def batch_for_step(tokens: Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> Tensor:
    """Training batch ``step``: ``batch_size`` random windows of ``seq_len`` tokens, drawn from a
    generator seeded by ``(seed, step)`` only (so resuming needs no data-loader state)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    return tokens[idx].long()


def eval_windows(tokens: Tensor, n_windows: int, seq_len: int) -> Tensor:
    """``n_windows`` evenly spaced windows of the held-out text (fixed for the whole run)."""
    n_start = tokens.numel() - seq_len + 1
    starts = torch.linspace(0, n_start - 1, n_windows).round().long().unique()
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    return tokens[idx].long()


def unigram_loss(train: Tensor, held_out: Tensor, n_vocab: int) -> float:
    """Cross-entropy (nats/token) of the held-out next tokens under the add-one-smoothed unigram
    distribution of the training tokens: the loss a model with no context would reach."""
    counts = torch.bincount(train.long(), minlength=n_vocab).double() + 1.0
    log_p = torch.log(counts / counts.sum())
    return float(-log_p[held_out.long()[1:]].mean())


# ============================================================================ models
def build_model(cfg: TrainConfig, tokenizer: Any) -> nn.Module:
    """A freshly initialised model for ``cfg`` (seed the RNG first for a reproducible init)."""
    n_vocab = vocab_size(tokenizer)
    if cfg.arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        hf_cfg = Qwen3Config(
            vocab_size=n_vocab,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.resolved_d_mlp,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            num_key_value_heads=cfg.n_key_value_heads or cfg.n_heads,
            head_dim=cfg.resolved_d_head,
            max_position_embeddings=cfg.seq_len,
            rms_norm_eps=1e-6,
            rope_theta=cfg.rotary_base,
            tie_word_embeddings=cfg.tie_word_embeddings,
            initializer_range=cfg.initializer_range,
            attention_dropout=0.0,
            use_cache=False,
            pad_token_id=getattr(tokenizer, "pad_token_id", None),
            bos_token_id=getattr(tokenizer, "bos_token_id", None),
            eos_token_id=getattr(tokenizer, "eos_token_id", None),
        )
        hf_cfg._attn_implementation = "sdpa"
        return Qwen3ForCausalLM(hf_cfg)
    attn_cfg = AttnResConfig(
        d_model=cfg.d_model,
        d_head=cfg.resolved_d_head,
        n_heads=cfg.n_heads,
        n_key_value_heads=cfg.n_key_value_heads or cfg.n_heads,
        n_layers=cfg.n_layers,
        n_ctx=cfg.seq_len,
        d_mlp=cfg.resolved_d_mlp,
        d_vocab=n_vocab,
        rotary_base=cfg.rotary_base,
        initializer_range=cfg.initializer_range,
        flavour=cfg.arch,
        routing_mode=cfg.routing_mode,
        n_blocks=cfg.n_blocks,
        recency_bias_init=0.0,
        tie_word_embeddings=cfg.tie_word_embeddings,
        model_name=f"attnres-{cfg.arch}-{cfg.routing_mode}-trained",
    )
    model = HookedAttnResTransformer(attn_cfg, tokenizer=tokenizer)  # routers zero-initialised
    return model


def save_model(model: nn.Module, directory: PathLike, tokenizer: Any = None) -> None:
    """Write ``model`` to ``directory`` so that it loads back bit-exactly: the one place where
    training writes a model.

    AttnRes models go through :meth:`HookedAttnResTransformer.save_pretrained` (the
    ``qwen3_attnres`` layout of their flavour plus this library's metadata; it also writes a
    Hugging Face tokenizer); the Qwen3 baseline through Hugging Face's ``save_pretrained`` (Qwen3
    format, safetensors), with a Hugging Face tokenizer saved alongside. The byte tokenizer
    needs no files: loaders fall back to it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _quiet_hf():
        model.save_pretrained(directory)
    if (
        not isinstance(model, HookedAttnResTransformer)
        and tokenizer is not None
        and not isinstance(tokenizer, ByteTokenizer)
    ):
        tokenizer.save_pretrained(str(directory))


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Hide Hugging Face's own progress bars while it saves or loads one small model."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(directory: PathLike, arch: str, tokenizer: Any = None) -> nn.Module:
    """Load what :func:`save_model` wrote, in float32 on the CPU."""
    directory = Path(directory)
    if arch == "qwen3":
        from transformers import Qwen3ForCausalLM

        with _quiet_hf():
            model = Qwen3ForCausalLM.from_pretrained(str(directory), local_files_only=True)
        model.config._attn_implementation = "sdpa"
        return model.float()
    return HookedAttnResTransformer.from_pretrained(str(directory), tokenizer=tokenizer)


def next_token_loss(model: nn.Module, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy in fp32, for either kind of model."""
    if isinstance(model, HookedAttnResTransformer):
        logits = model(tokens)
    else:
        logits = model(input_ids=tokens).logits
    return metrics.next_token_loss(logits, tokens)


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, batch_size: int, autocast: Callable[[], Any]) -> float:
    """Mean next-token loss over ``windows`` ``[n, seq_len]``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, windows.shape[0], batch_size):
        chunk = windows[i : i + batch_size].to(device)
        with autocast():
            loss = next_token_loss(model, chunk)
        total += float(loss) * chunk.shape[0]
        count += chunk.shape[0]
    model.train(was_training)
    return total / count


# ============================================================================ optimisation
def _is_router_param(name: str) -> bool:
    return "_router." in name or name.startswith("final_router.")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not _is_router_param(name) else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps`` steps, then a cosine from 1 down to ``min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device={device!r} but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def _autocast_factory(device: torch.device, precision: str) -> Callable[[], Any]:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16 and device.type == "cpu":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    if use_bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return lambda: torch.autocast(device.type, enabled=False)


# ============================================================================ the run
@dataclass
class TrainResult:
    """What :func:`train` returns. ``history`` has one row per step (``step``, ``loss``, ``lr``,
    ``grad_norm``); ``evals`` one row per evaluation (``step``, ``eval_loss``)."""

    model: nn.Module
    config: TrainConfig
    out_dir: Path
    history: list[dict[str, Union[int, float]]]
    evals: list[dict[str, Union[int, float]]]
    final_eval_loss: float
    unigram_eval_loss: float
    n_params: int
    wall_s: float

    @property
    def losses(self) -> list[float]:
        return [row["loss"] for row in self.history]


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_dir(out_dir: PathLike, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The checkpoint with the highest step under ``out_dir/checkpoints`` (or ``None``)."""
    root = Path(out_dir) / CHECKPOINTS
    found = sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


def read_checkpoint_config(checkpoint: PathLike) -> TrainConfig:
    """The training config stored in a checkpoint directory (or in a finished run's directory)."""
    checkpoint = Path(checkpoint)
    state_file = checkpoint / TRAINER_STATE
    if not state_file.is_file():
        latest = latest_checkpoint(checkpoint)
        if latest is None:
            raise TrainingError(
                f"{checkpoint} is not a training checkpoint (no {TRAINER_STATE}) and holds no "
                f"{CHECKPOINTS}/step-* checkpoints"
            )
        state_file = latest / TRAINER_STATE
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    return TrainConfig.from_dict(state["config"])


def train(
    cfg: TrainConfig,
    *,
    resume: Optional[PathLike] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> TrainResult:
    """Train the model ``cfg`` describes and save it to ``cfg.out_dir``.

    Args:
        cfg: the run. When resuming, the checkpoint's own config is used, except for the fields
            in ``TrainConfig.RESUMABLE_OVERRIDES`` (``out_dir``, ``device``, ...), taken from ``cfg``.
        resume: a checkpoint directory (``.../checkpoints/step-NNNNNN``) or a run directory (its
            latest checkpoint is used). Training continues at the next step with the saved
            weights, optimizer, scheduler and RNG states.
        progress: show a tqdm bar with the running loss.
        log: where one-line messages go (default: ``print`` when ``progress``, else nowhere).

    Returns:
        a :class:`TrainResult`. ``cfg.out_dir`` then holds the final model (loadable with
        ``HookedAttnResTransformer.from_pretrained``, or Hugging Face's for ``arch="qwen3"``),
        ``train_config.json``, ``training_log.json`` and ``checkpoints/step-NNNNNN/`` (the final
        one always, others every ``save_every`` steps).
    """
    threads = cfg.threads
    if resume is None and threads is None:
        return _train(cfg, resume=resume, progress=progress, log=log)
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return _train(cfg, resume=resume, progress=progress, log=log)
    finally:
        torch.set_num_threads(previous)


def _train(
    cfg: TrainConfig,
    *,
    resume: Optional[PathLike],
    progress: bool,
    log: Optional[Callable[[str], None]],
) -> TrainResult:
    from tqdm.auto import tqdm

    say = log if log is not None else (print if progress else (lambda _msg: None))
    state: Optional[dict[str, Any]] = None
    if resume is not None:
        resume = Path(resume)
        if not (resume / TRAINER_STATE).is_file():
            latest = latest_checkpoint(resume)
            if latest is None:
                raise TrainingError(f"cannot resume from {resume}: no {TRAINER_STATE} and no checkpoints in it")
            resume = latest
        state = torch.load(resume / TRAINER_STATE, map_location="cpu", weights_only=True)
        saved = TrainConfig.from_dict(state["config"])
        overrides = {k: getattr(cfg, k) for k in TrainConfig.RESUMABLE_OVERRIDES}
        cfg = dataclasses.replace(saved, **overrides)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    autocast = _autocast_factory(device, cfg.precision)
    tokenizer = load_tokenizer(cfg.tokenizer)
    corpus = load_corpus(cfg, tokenizer)
    if state is not None and state["data_fingerprint"] != corpus.fingerprint:
        raise TrainingError(
            f"cannot resume from {resume}: the training data differs from the data the checkpoint "
            f"was trained on ({corpus.source}); resuming on other data would not continue the run"
        )
    n_vocab = vocab_size(tokenizer)
    unigram = unigram_loss(corpus.train, corpus.eval, n_vocab)
    windows = eval_windows(corpus.eval, cfg.eval_batches * cfg.batch_size, cfg.seq_len)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if state is None:
        model = build_model(cfg, tokenizer)
        start = 0
        history: list[dict[str, Union[int, float]]] = []
        evals: list[dict[str, Union[int, float]]] = []
    else:
        model = load_model(resume, cfg.arch, tokenizer)
        start = int(state["step"])
        history = [dict(r) for r in state["history"]]
        evals = [dict(r) for r in state["evals"]]
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], device)
    n_params = sum(p.numel() for p in model.parameters())
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say(
        f"training {cfg.arch} ({'' if cfg.arch == 'qwen3' else cfg.routing_mode + ', '}"
        f"{n_params:,} parameters) on {corpus.train.numel():,} tokens of {corpus.source} "
        f"({len(corpus.train_files)} files; {len(corpus.eval_files)} held out), device {device}"
        + (f"; resuming at step {start}" if start else "")
    )

    def snapshot(step: int) -> None:
        ckpt = checkpoint_dir(out_dir, step)
        save_model(model, ckpt, tokenizer)
        torch.save(
            {
                "step": step,
                "config": cfg.to_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(device),
                "history": history,
                "evals": evals,
                "data_fingerprint": corpus.fingerprint,
            },
            ckpt / TRAINER_STATE,
        )

    t0 = time.perf_counter()
    model.train()
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"train {cfg.arch}", unit="step")
    smooth: Optional[float] = None
    for step in range(start, cfg.steps):
        tokens = batch_for_step(corpus.train, step, cfg.batch_size, cfg.seq_len, cfg.seed).to(device)
        with autocast():
            loss = next_token_loss(model, tokens)
        if not torch.isfinite(loss):
            bar.close()
            raise TrainingError(
                f"the loss became {float(loss)} at step {step + 1}; lower the learning rate "
                f"(lr={cfg.lr}) or raise warmup_steps"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        value = loss.item()
        history.append({"step": step + 1, "loss": value, "lr": lr, "grad_norm": float(grad_norm)})
        smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
        done = step + 1
        postfix = {"loss": f"{smooth:.3f}"}
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
            evals.append({"step": done, "eval_loss": evaluate(model, windows, cfg.batch_size, autocast)})
            model.train()
        if evals:
            postfix["eval"] = f"{evals[-1]['eval_loss']:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            model.eval()
            snapshot(done)
            model.train()
    bar.close()
    model.eval()
    wall = time.perf_counter() - t0

    if not evals or evals[-1]["step"] != cfg.steps:
        evals.append({"step": cfg.steps, "eval_loss": evaluate(model, windows, cfg.batch_size, autocast)})
    final_eval = evals[-1]["eval_loss"]
    save_model(model, out_dir, tokenizer)
    (out_dir / TRAIN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    summary = {
        "config": cfg.to_dict(),
        "n_params": n_params,
        "data": {
            "source": corpus.source,
            "train_tokens": corpus.train.numel(),
            "eval_tokens": corpus.eval.numel(),
            "train_files": len(corpus.train_files),
            "eval_files": corpus.eval_files,
            "skipped_files": corpus.skipped_files,
            "fingerprint": corpus.fingerprint,
        },
        "final_eval_loss": final_eval,
        "unigram_eval_loss": unigram,
        "wall_s_this_run": wall,
        "resumed_from_step": start or None,
        "evals": evals,
        "history": history,
    }
    (out_dir / TRAINING_LOG).write_text(json.dumps(summary, indent=1) + "\n")
    say(
        f"done: eval loss {final_eval:.4f} nats/token (unigram baseline {unigram:.4f}) after "
        f"{cfg.steps} steps, {wall:.0f}s; saved to {out_dir}"
    )
    return TrainResult(
        model=model,
        config=cfg,
        out_dir=out_dir,
        history=history,
        evals=evals,
        final_eval_loss=final_eval,
        unigram_eval_loss=unigram,
        n_params=n_params,
        wall_s=wall,
    )
