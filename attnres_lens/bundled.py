"""The tiny models and the held-out evaluation text shipped inside the package.

Two byte-level models were trained from scratch by ``attnres-lens train`` with the same data
(the Python standard library's source) and the same budget (``docs/reproduce.md``):

- :data:`ATTNRES_MODEL` (``"attnres-cumulative-tiny"``): Block AttnRes, flavour ``cumulative``,
  routing trained from zero-initialised routers;
- :data:`BASELINE_MODEL` (``"qwen3-tiny"``): a standard-residual Qwen3 of the same shape, in
  Hugging Face's Qwen3 format, which :func:`load_wrapped_baseline` wraps with the recency
  schedule (bias :data:`DEMO_RECENCY_BIAS`).

Both have the same source layout once loaded (flavour cumulative, one block per layer), so every
routing slice of one has a counterpart in the other::

    from attnres_lens import bundled
    trained = bundled.load_attnres()
    wrapped = bundled.load_wrapped_baseline()
    tokens = bundled.eval_tokens(trained, n_prompts=16, seq_len=128)

The evaluation text (:func:`eval_text`) is three held-out CPython standard-library modules
(PSF License; ``attnres_lens/data/eval/LICENSE-PSF.txt``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

ATTNRES_MODEL = "attnres-cumulative-tiny"
BASELINE_MODEL = "qwen3-tiny"
#: The recency bias ``b`` the demo wraps the baseline with: the default
#: ``attnres_recency_bias_init`` of the cumulative ``qwen3_attnres`` format. Each router then
#: puts ``e^3 / (e^3 + n - 1)`` (0.95 with 2 sources, 0.83 with 5) on the current stream and
#: spreads the rest evenly over the embedding and the earlier snapshots.
DEMO_RECENCY_BIAS = 3.0
EVAL_FILES = ("asyncio_taskgroups.py.txt", "wsgiref_handlers.py.txt", "xml_sax_xmlreader.py.txt")
#: Where each evaluation file comes from (CPython 3.11.7 ``Lib/``).
EVAL_SOURCES = ("asyncio/taskgroups.py", "wsgiref/handlers.py", "xml/sax/xmlreader.py")
EVAL_LICENSE = "PSF License Agreement (Python Software Foundation License Version 2)"


def data_dir() -> Path:
    """``attnres_lens/data`` of the installed package."""
    return Path(str(resources.files("attnres_lens") / "data"))


def available_models() -> list[str]:
    root = data_dir() / "models"
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def model_path(name: str) -> Path:
    """The directory of bundled model ``name``."""
    path = data_dir() / "models" / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no bundled model {name!r} in {data_dir() / 'models'}; available: {available_models()} "
            "(reinstall the package if this list is empty)"
        )
    return path


def load_attnres(**kwargs: Any) -> Any:
    """The bundled Block AttnRes model with trained routing (``from_pretrained`` kwargs pass
    through, e.g. ``dtype``/``device``)."""
    from .model import HookedAttnResTransformer

    return HookedAttnResTransformer.from_pretrained(model_path(ATTNRES_MODEL), **kwargs)


def load_wrapped_baseline(recency_bias: float = DEMO_RECENCY_BIAS, **kwargs: Any) -> Any:
    """The bundled standard-residual Qwen3 wrapped as a cumulative AttnRes model with the recency
    schedule (``recency_bias``), with as many blocks as the bundled AttnRes model has, so the
    two have the same routers and sources."""
    import json

    from .model import HookedAttnResTransformer

    n_blocks = json.loads((model_path(ATTNRES_MODEL) / "config.json").read_text())["attnres_num_blocks"]
    return HookedAttnResTransformer.from_pretrained(
        model_path(BASELINE_MODEL),
        flavour="cumulative",
        schedule="recency",
        recency_bias=recency_bias,
        n_blocks=n_blocks,
        **kwargs,
    )


def load_baseline_hf() -> Any:
    """The bundled baseline as a plain ``transformers.Qwen3ForCausalLM`` (standard residual)."""
    from transformers import Qwen3ForCausalLM

    from .training import quiet_hf

    with quiet_hf():
        return Qwen3ForCausalLM.from_pretrained(str(model_path(BASELINE_MODEL)), local_files_only=True).eval()


def eval_paths() -> list[Path]:
    return [data_dir() / "eval" / name for name in EVAL_FILES]


def eval_text() -> str:
    """The bundled held-out text (three standard-library modules, joined)."""
    return "".join(p.read_text(encoding="utf-8") for p in eval_paths())


def text_windows(
    model: Any, texts: list[str], n_prompts: Optional[int] = 32, seq_len: int = 128
) -> Tensor:
    """Token windows ``[n, seq_len]`` from ``texts``: each text is tokenised with the model's
    tokenizer, the texts are joined, and ``n_prompts`` windows are taken evenly spaced (or every
    non-overlapping window when ``n_prompts`` is None)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a next-token target), got {seq_len}")
    if seq_len > model.cfg.n_ctx:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context n_ctx={model.cfg.n_ctx}")
    ids: list[int] = []
    for text in texts:
        if text:
            ids += model.to_tokens(text, prepend_bos=False, truncate=False)[0].tolist()
    if len(ids) < seq_len:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of seq_len={seq_len}")
    tokens = torch.tensor(ids, dtype=torch.long)
    n_fit = len(ids) // seq_len
    if n_prompts is None or n_prompts >= n_fit:
        starts = torch.arange(n_fit) * seq_len
    else:
        if n_prompts < 1:
            raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
        starts = torch.linspace(0, len(ids) - seq_len, n_prompts).round().long()
    return tokens[starts[:, None] + torch.arange(seq_len)[None, :]].to(model.embed.weight.device)


def eval_tokens(model: Any, n_prompts: Optional[int] = 32, seq_len: int = 128) -> Tensor:
    """``n_prompts`` windows of ``seq_len`` tokens from :func:`eval_text`."""
    return text_windows(model, [eval_text()], n_prompts=n_prompts, seq_len=seq_len)
