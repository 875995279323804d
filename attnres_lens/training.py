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
import shutil
import sysconfig
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import loading, metrics
from .outputs import (
    OWNER_MARK,
    atomic_write_text,
    check_output_dir,
    clear_contents,
    contents,
    drop_set_aside,
    end_staging,
    fsync_dir,
    fsync_tree,
    honour_umask,
    new_staging,
    output_lock,
    pause_point,
    remove_stale,
    restore_set_aside,
)
from .resources import available_memory_on, gib
from .config import AttnResConfig
from .model import HookedAttnResTransformer
from .router import router_parameters
from .tokenizer import ByteTokenizer

# The run's configuration is a pure value, importable without torch (the CLI reads it).
from .train_config import (
    ARCHS,
    CHECKPOINTS,
    PRECISIONS,
    TRAIN_CONFIG,
    TRAINER_STATE,
    TRAINING_LOG,
    CHECKPOINT_COMPLETE,
    PathLike,
    TrainConfig,
    TrainingError,
)


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
    try:
        return loading.load_tokenizer_dir(tokenizer)
    except ValueError as err:
        raise TrainingError(str(err)) from None


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
    with quiet_hf():
        model.save_pretrained(directory)
    honour_umask(directory.glob("*.safetensors"))  # Hugging Face's writer leaves them 0600
    if (
        not isinstance(model, HookedAttnResTransformer)
        and tokenizer is not None
        and not isinstance(tokenizer, ByteTokenizer)
    ):
        tokenizer.save_pretrained(str(directory))


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
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

        with quiet_hf():
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
def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    routers = {id(p) for p in router_parameters(model)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in routers else no_decay).append(p)
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
    """See :func:`attnres_lens.loading.resolve_device`; errors are :class:`TrainingError`."""
    try:
        return loading.resolve_device(device)
    except ValueError as err:
        raise TrainingError(str(err)) from None


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


def checkpoint_problem(checkpoint: Path) -> Optional[str]:
    """Why ``checkpoint`` is not a complete checkpoint (``None`` when it is): its completion
    marker (:data:`CHECKPOINT_COMPLETE`, written last) is missing or unreadable, or a file it
    lists is missing or has another size than when it was written."""
    marker = checkpoint / CHECKPOINT_COMPLETE
    if not marker.is_file():
        return f"no {CHECKPOINT_COMPLETE} (its writing was cut short)"
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {CHECKPOINT_COMPLETE} cannot be read ({err})"
    for name, size in sizes.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was written"
    return None


def scan_checkpoints(out_dir: PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The complete checkpoints under ``out_dir/checkpoints``, newest first, and the
    incomplete ones with why each is not complete."""
    root = Path(out_dir) / CHECKPOINTS
    steps = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
    complete, skipped = [], []
    for path in steps:
        problem = checkpoint_problem(path)
        if problem is None:
            complete.append(path)
        else:
            skipped.append((path, problem))
    return complete, skipped


def latest_checkpoint(out_dir: PathLike) -> Optional[Path]:
    """The complete checkpoint with the highest step under ``out_dir/checkpoints`` (or ``None``)."""
    complete, _ = scan_checkpoints(out_dir)
    return complete[0] if complete else None


def read_checkpoint_config(checkpoint: PathLike) -> TrainConfig:
    """The training config stored in a checkpoint directory (or in a run directory's newest
    complete checkpoint)."""
    resumed = _find_resume(checkpoint)
    return TrainConfig.from_dict(resumed.state["config"])


def train(
    cfg: TrainConfig,
    *,
    resume: Optional[PathLike] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    overwrite: bool = False,
    check_memory: bool = True,
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
        overwrite: replace ``cfg.out_dir`` when it already holds files (default: refuse, so runs
            never mix). A resumed run may continue in its own directory without it.
        check_memory: refuse, before any data is read, a run whose estimated activation memory
            (:func:`activation_memory_bytes`) exceeds the memory available; ``False`` tries anyway.

    Returns:
        a :class:`TrainResult`. ``cfg.out_dir`` then holds the final model (loadable with
        ``HookedAttnResTransformer.from_pretrained``, or Hugging Face's for ``arch="qwen3"``),
        ``train_config.json``, ``training_log.json`` and ``checkpoints/step-NNNNNN/`` (the final
        one always, others every ``save_every`` steps).
    """
    threads = cfg.threads
    if resume is None and threads is None:
        return _train(cfg, resume=resume, progress=progress, log=log, overwrite=overwrite, check_memory=check_memory)
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return _train(cfg, resume=resume, progress=progress, log=log, overwrite=overwrite, check_memory=check_memory)
    finally:
        torch.set_num_threads(previous)


@dataclass
class _Resumed:
    """A saved run to continue: the checkpoint directory and its trainer state."""

    checkpoint: Path
    state: dict[str, Any]


@dataclass
class _Run:
    """The mutable parts of a run, advanced step by step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start: int
    history: list[dict[str, Union[int, float]]]
    evals: list[dict[str, Union[int, float]]]


def _train(
    cfg: TrainConfig,
    *,
    resume: Optional[PathLike],
    progress: bool,
    log: Optional[Callable[[str], None]],
    overwrite: bool,
    check_memory: bool,
) -> TrainResult:
    say = log if log is not None else (print if progress else (lambda _msg: None))
    out_dir = Path(cfg.out_dir).expanduser()
    with output_lock(out_dir):  # one writer per output directory
        remove_stale(out_dir)
        remove_stale(out_dir / CHECKPOINTS)
        return _train_locked(cfg, resume=resume, progress=progress, say=say, overwrite=overwrite,
                             check_memory=check_memory)


def _train_locked(
    cfg: TrainConfig,
    *,
    resume: Optional[PathLike],
    progress: bool,
    say: Callable[[str], None],
    overwrite: bool,
    check_memory: bool,
) -> TrainResult:
    resumed = _find_resume(resume)
    if resumed is not None:
        cfg = _resumed_config(cfg, resumed)
    replace_out_dir = _check_out_dir(cfg, resumed, overwrite)
    device = resolve_device(cfg.device)
    autocast = _autocast_factory(device, cfg.precision)
    tokenizer = load_tokenizer(cfg.tokenizer)
    if check_memory:
        _check_activation_memory(cfg, vocab_size(tokenizer), device)
    corpus = load_corpus(cfg, tokenizer)
    _check_same_data(resumed, corpus)
    unigram = unigram_loss(corpus.train, corpus.eval, vocab_size(tokenizer))
    windows = eval_windows(corpus.eval, cfg.eval_batches * cfg.batch_size, cfg.seq_len)

    run = _start_run(cfg, tokenizer, resumed, device)
    n_params = sum(p.numel() for p in run.model.parameters())
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # only now: a run refused above leaves the old one in place; and the old results are only
    # set aside (inside out_dir, which may be a mount point) until the new ones are complete
    aside = clear_contents(out_dir) if replace_out_dir else None
    say(_start_message(cfg, n_params, corpus, device, run.start))

    t0 = time.perf_counter()
    try:
        _run_steps(run, cfg, corpus, tokenizer, windows, autocast, device, progress)
        wall = time.perf_counter() - t0
        if not run.evals or run.evals[-1]["step"] != cfg.steps:
            run.evals.append({"step": cfg.steps, "eval_loss": evaluate(run.model, windows, cfg.batch_size, autocast)})
        final_eval = run.evals[-1]["eval_loss"]
        summary = _training_log(cfg, run, corpus, n_params, final_eval, unigram, wall)
        _write_final(run.model, out_dir, tokenizer, cfg, summary)
    except Exception as err:
        failure = _failed(err, out_dir, aside)
        if failure is err:
            raise
        raise failure from err
    drop_set_aside(out_dir)  # the new results are complete: the old ones may go
    say(
        f"done: eval loss {final_eval:.4f} nats/token (unigram baseline {unigram:.4f}) after "
        f"{cfg.steps} steps, {wall:.0f}s; saved to {out_dir}"
    )
    return TrainResult(
        model=run.model,
        config=cfg,
        out_dir=out_dir,
        history=run.history,
        evals=run.evals,
        final_eval_loss=final_eval,
        unigram_eval_loss=unigram,
        n_params=n_params,
        wall_s=wall,
    )


def _failed(err: Exception, out_dir: Path, aside: Optional[Path]) -> Exception:
    """The error of a run that failed while it wrote: where the run can be resumed from, and
    what became of the old results it was replacing."""
    complete = latest_checkpoint(out_dir)
    if aside is not None and complete is None:
        restore_set_aside(out_dir, aside)  # nothing of the new run is worth keeping
        aside = None
    if not isinstance(err, OSError) and complete is None and aside is None:
        return err
    what = f"{err.strerror or err} ({err.filename})" if isinstance(err, OSError) and err.filename else str(err)
    message = f"training failed: {what}"
    if complete is not None:
        message += (f"; the last complete checkpoint is {complete}: once the cause is fixed, resume "
                    f"with `attnres-lens train --resume {out_dir}` (train(cfg, resume=...))")
    if aside is not None:
        message += f"; the results this run replaces are kept in {aside} until it completes"
    return TrainingError(message)


def _check_out_dir(cfg: TrainConfig, resumed: Optional[_Resumed], overwrite: bool) -> bool:
    """Whether ``cfg.out_dir`` must be cleared before the run writes; refuses a directory that
    holds another run's files unless ``overwrite``."""
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    if resumed is not None and out_dir in (resumed.checkpoint.resolve(), *resumed.checkpoint.resolve().parents):
        if overwrite:
            raise TrainingError(
                f"overwrite would delete {out_dir}, which holds the checkpoint being resumed "
                f"({resumed.checkpoint}); resume without --overwrite to continue that run"
            )
        return False  # continuing a run in its own directory
    try:
        check_output_dir(out_dir, overwrite=overwrite, flag="--overwrite (overwrite=True)")
    except (FileExistsError, NotADirectoryError) as err:
        raise TrainingError(str(err)) from None
    return overwrite and out_dir.is_dir() and bool(contents(out_dir))


def activation_memory_bytes(cfg: TrainConfig, n_vocab: int) -> int:
    """A rough upper estimate of the memory one training step keeps for the backward pass
    (float32): per token and layer the attention and MLP activations and the routers' stacked
    sources, plus the logits, and the weights with their gradients and AdamW state."""
    d_model, d_mlp, layers = cfg.d_model, cfg.resolved_d_mlp, cfg.n_layers
    max_sources = 2 * layers + 1 if cfg.routing_mode == "full" else (cfg.n_blocks or layers) + 2
    per_token = layers * (12 * d_model + 4 * d_mlp + 2 * (max_sources + 2) * d_model) + 3 * n_vocab
    approx_params = layers * (4 * d_model * d_model + 3 * d_model * d_mlp) + 2 * n_vocab * d_model
    return 4 * (cfg.batch_size * cfg.seq_len * per_token + 4 * approx_params)


def _check_activation_memory(cfg: TrainConfig, n_vocab: int, device: torch.device) -> None:
    needed = activation_memory_bytes(cfg, n_vocab)
    available = available_memory_on(device)
    if available is not None and needed > available.n_bytes:
        raise TrainingError(
            f"a training step needs about {gib(needed)} (batch {cfg.batch_size} x {cfg.seq_len} tokens, "
            f"{cfg.n_layers} layers, d_model {cfg.d_model}), more than the {available} this run may "
            "allocate; lower --seq-len or --batch-size, or pass --skip-memory-check (check_memory=False) "
            "to try anyway"
        )


class ResumeWarning(UserWarning):
    """Resuming skipped a checkpoint that is not complete, or uses one not marked complete."""


def _find_resume(resume: Optional[PathLike]) -> Optional[_Resumed]:
    """The checkpoint to continue: ``resume`` itself when it is one, else the newest complete
    checkpoint of the run directory ``resume`` whose trainer state loads (saying which newer
    ones were skipped and why)."""
    if resume is None:
        return None
    given = Path(resume)
    if (given / TRAINER_STATE).is_file():
        problem = checkpoint_problem(given)
        if problem is not None:
            warnings.warn(f"resume: {given} is not marked complete ({problem}); resuming from it as asked",
                          ResumeWarning, stacklevel=4)
        try:
            return _Resumed(given, _load_trainer_state(given))
        except TrainingError as err:
            raise TrainingError(f"cannot resume from {given}: {err}; resume from the run directory "
                                "to use its newest complete checkpoint") from None
    complete, skipped = scan_checkpoints(given)
    for checkpoint in complete:
        try:
            state = _load_trainer_state(checkpoint)
        except TrainingError as err:
            skipped.append((checkpoint, str(err)))
            continue
        newer = [(p, why) for p, why in sorted(skipped, reverse=True) if p.name > checkpoint.name]
        if newer:
            reasons = "; ".join(f"skipped {path.name}: {why}" for path, why in newer)
            warnings.warn(f"resume: {reasons}; continuing from {checkpoint.name}, the newest complete "
                          "checkpoint", ResumeWarning, stacklevel=4)
        return _Resumed(checkpoint, state)
    reasons = "; ".join(f"{p.name}: {why}" for p, why in sorted(skipped, reverse=True)[:5])
    raise TrainingError(
        f"cannot resume from {given}: it is not a training checkpoint (no {TRAINER_STATE}) and holds "
        f"no complete {CHECKPOINTS}/step-* checkpoint"
        + (f" (skipped {reasons})" if reasons else "")
    )


def _load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises EOFError, RuntimeError, pickle errors...
        raise TrainingError(f"its {TRAINER_STATE} cannot be read ({type(err).__name__}: {err})") from None


def _resumed_config(cfg: TrainConfig, resumed: _Resumed) -> TrainConfig:
    """The saved run's config, with the fields a resume may change taken from ``cfg``."""
    saved = TrainConfig.from_dict(resumed.state["config"])
    overrides = {k: getattr(cfg, k) for k in TrainConfig.RESUMABLE_OVERRIDES}
    cfg = dataclasses.replace(saved, **overrides)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    return cfg


def _check_same_data(resumed: Optional[_Resumed], corpus: Corpus) -> None:
    if resumed is not None and resumed.state["data_fingerprint"] != corpus.fingerprint:
        raise TrainingError(
            f"cannot resume from {resumed.checkpoint}: the training data differs from the data the "
            f"checkpoint was trained on ({corpus.source}); resuming on other data would not "
            "continue the run"
        )


def _start_run(cfg: TrainConfig, tokenizer: Any, resumed: Optional[_Resumed], device: torch.device) -> _Run:
    """A fresh model and optimizer, or the saved ones with their RNG states restored."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if resumed is None:
        model, start, history, evals = build_model(cfg, tokenizer), 0, [], []
    else:
        state = resumed.state
        model = load_model(resumed.checkpoint, cfg.arch, tokenizer)
        start = int(state["step"])
        history = [dict(r) for r in state["history"]]
        evals = [dict(r) for r in state["evals"]]
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if resumed is not None:
        optimizer.load_state_dict(resumed.state["optimizer"])
        scheduler.load_state_dict(resumed.state["scheduler"])
        _set_rng_state(resumed.state["rng"], device)
    return _Run(model, optimizer, scheduler, start, history, evals)


def _start_message(cfg: TrainConfig, n_params: int, corpus: Corpus, device: torch.device, start: int) -> str:
    return (
        f"training {cfg.arch} ({'' if cfg.arch == 'qwen3' else cfg.routing_mode + ', '}"
        f"{n_params:,} parameters) on {corpus.train.numel():,} tokens of {corpus.source} "
        f"({len(corpus.train_files)} files; {len(corpus.eval_files)} held out), device {device}"
        + (f"; resuming at step {start}" if start else "")
    )


def _save_checkpoint(run: _Run, cfg: TrainConfig, corpus: Corpus, tokenizer: Any, device: torch.device, step: int) -> None:
    """The model and everything needed to continue exactly: ``checkpoints/step-NNNNNN``.

    Written into a staging directory beside it, fsynced, marked complete
    (:data:`CHECKPOINT_COMPLETE`, last) and only then renamed into place: a kill, a torn write
    or a full disk leaves the previous checkpoints as they were."""
    checkpoint = checkpoint_dir(cfg.out_dir, step)
    staging = new_staging(checkpoint.parent, f"{checkpoint.name}-")
    try:
        save_model(run.model, staging, tokenizer)
        pause_point("checkpoint-model-saved", step)
        trainer_state = {
            "step": step,
            "config": cfg.to_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": _rng_state(device),
            "history": run.history,
            "evals": run.evals,
            "data_fingerprint": corpus.fingerprint,
        }
        _torch_save(trainer_state, staging / TRAINER_STATE)
        fsync_tree(staging)
        pause_point("checkpoint-before-marker", step)
        sizes = {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file() and p.name != OWNER_MARK}
        atomic_write_text(staging / CHECKPOINT_COMPLETE, json.dumps({"step": step, "files": sizes}, indent=1) + "\n")
        if checkpoint.exists():  # the same step again (a resumed run that finished it): replace it
            shutil.rmtree(checkpoint)
        os.rename(staging, checkpoint)
        (checkpoint / OWNER_MARK).unlink()
        fsync_dir(checkpoint)
        fsync_dir(checkpoint.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        end_staging(staging)
    pause_point("checkpoint-committed", step)


class _WriteErrors:
    """A file that remembers the ``OSError`` of a failed write: ``torch.save`` reports a full
    disk as an opaque ``RuntimeError`` ("unexpected pos ...")."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, a failed write raised as its ``OSError`` (naming the file)."""
    with open(path, "wb") as handle:
        recorder = _WriteErrors(handle)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise OSError(recorder.error.errno, recorder.error.strerror, str(path)) from None
            raise


def _write_final(model: nn.Module, out_dir: Path, tokenizer: Any, cfg: TrainConfig, summary: dict[str, Any]) -> None:
    """The final model, ``train_config.json`` and ``training_log.json`` in ``out_dir``: staged
    inside it, fsynced, then each file renamed into place (never half-written)."""
    staging = new_staging(out_dir, "final-")
    try:
        save_model(model, staging, tokenizer)
        (staging / TRAIN_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (staging / TRAINING_LOG).write_text(json.dumps(summary, indent=1) + "\n")
        fsync_tree(staging)
        pause_point("final-staged")
        for path in sorted(staging.iterdir()):
            if path.name != OWNER_MARK:
                os.replace(path, out_dir / path.name)
        fsync_dir(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        end_staging(staging)


def _optimizer_step(run: _Run, cfg: TrainConfig, tokens: Tensor, autocast: Callable[[], Any], step: int) -> float:
    """One forward, backward and update; appends the step's row to ``run.history``."""
    with autocast():
        loss = next_token_loss(run.model, tokens)
    if not torch.isfinite(loss):
        raise TrainingError(
            f"the loss became {float(loss)} at step {step + 1}; lower the learning rate "
            f"(lr={cfg.lr}) or raise warmup_steps"
        )
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    lr = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    value = loss.item()
    run.history.append({"step": step + 1, "loss": value, "lr": lr, "grad_norm": float(grad_norm)})
    return value


def _run_steps(
    run: _Run,
    cfg: TrainConfig,
    corpus: Corpus,
    tokenizer: Any,
    windows: Tensor,
    autocast: Callable[[], Any],
    device: torch.device,
    progress: bool,
) -> None:
    """Steps ``run.start`` to ``cfg.steps``: evaluating every ``eval_every`` and saving a
    checkpoint every ``save_every`` steps (and at the last), with a progress bar."""
    from tqdm.auto import tqdm

    run.model.train()
    smooth: Optional[float] = None  # exponentially smoothed loss, for the bar
    with tqdm(total=cfg.steps, initial=run.start, disable=not progress, desc=f"train {cfg.arch}", unit="step") as bar:
        for step in range(run.start, cfg.steps):
            tokens = batch_for_step(corpus.train, step, cfg.batch_size, cfg.seq_len, cfg.seed).to(device)
            value = _optimizer_step(run, cfg, tokens, autocast, step)
            smooth = value if smooth is None else 0.9 * smooth + 0.1 * value
            done = step + 1
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                run.evals.append({"step": done, "eval_loss": evaluate(run.model, windows, cfg.batch_size, autocast)})
                run.model.train()
            postfix = {"loss": f"{smooth:.3f}"}
            if run.evals:
                postfix["eval"] = f"{run.evals[-1]['eval_loss']:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            pause_point("step", done)
            if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
                run.model.eval()
                _save_checkpoint(run, cfg, corpus, tokenizer, device, done)
                run.model.train()
    run.model.eval()


def _training_log(
    cfg: TrainConfig, run: _Run, corpus: Corpus, n_params: int, final_eval: float, unigram: float, wall: float
) -> dict[str, Any]:
    """The contents of ``training_log.json``."""
    return {
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
        "resumed_from_step": run.start or None,
        "evals": run.evals,
        "history": run.history,
    }
