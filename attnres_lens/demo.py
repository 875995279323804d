"""``attnres-lens demo``: the paper's protocol on the bundled models, in a few CPU minutes.

1. Load the bundled standard-residual Qwen3 and wrap it as a cumulative Block AttnRes model with
   the recency schedule (bias :data:`~attnres_lens.bundled.DEMO_RECENCY_BIAS` = 3, the
   ``qwen3_attnres`` default initial bias): its routing is a fixed function of the sources.
2. Load the bundled Block AttnRes model (flavour cumulative, same shape, same data, same
   budget), whose routing was trained.
3. On the bundled held-out text: ``verify_schedule`` (wrapped), content dependence of the
   routing (both), and ``mass_vs_effect`` per slice and per family x sublayer x depth band
   (both), via :func:`attnres_lens.protocol.run_protocol`.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch

from . import bundled
from .metrics import next_token_loss
from .outputs import check_output_dir
from .protocol import DEFAULT_GROUPS, ProtocolResult, Subject, run_protocol

INTRO = (
    "The comparison of \"When Does Routing Become Interpretable?\": a vanilla model wrapped "
    "with a routing schedule against a Block AttnRes model whose routing was trained, under "
    "identical interventions. Both models are the tiny byte-level models bundled with "
    "attnres_lens (4 layers, d_model 128), trained by `attnres-lens train` on the Python "
    "standard library with the same data and budget (docs/reproduce.md). After wrapping, both "
    "are cumulative-flavour AttnRes models with one block per layer, so they have the same "
    "routers and sources and every table row has a counterpart in the other model."
)


def _training_log(name: str) -> dict:
    path = bundled.model_path(name) / "training_log.json"
    return json.loads(path.read_text()) if path.is_file() else {}


@torch.no_grad()
def _vanilla_loss(tokens: torch.Tensor) -> float:
    """The unwrapped baseline's loss, computed by Hugging Face's own Qwen3 (standard residual)."""
    hf = bundled.load_baseline_hf()
    return float(next_token_loss(hf(input_ids=tokens).logits, tokens))


def _wrapped_subject(recency_bias: float, tokens: torch.Tensor) -> Subject:
    """The bundled vanilla Qwen3, wrapped with the recency schedule."""
    log = _training_log(bundled.BASELINE_MODEL)
    return Subject(
        "wrapped",
        bundled.load_wrapped_baseline(recency_bias=recency_bias),
        description=f"vanilla Qwen3 wrapped with the recency schedule (b = {recency_bias:g})",
        source=f"bundled:{bundled.BASELINE_MODEL}",
        extra={
            "recency_bias": recency_bias,
            "vanilla_loss": _vanilla_loss(tokens),
            "training_eval_loss": log.get("final_eval_loss"),
            "training_unigram_loss": log.get("unigram_eval_loss"),
        },
    )


def _trained_subject(trained: Any) -> Subject:
    """The bundled Block AttnRes model, whose routing was trained."""
    log = _training_log(bundled.ATTNRES_MODEL)
    return Subject(
        "trained",
        trained,
        description="Block AttnRes (cumulative) with routing trained from scratch",
        source=f"bundled:{bundled.ATTNRES_MODEL}",
        extra={
            "training_eval_loss": log.get("final_eval_loss"),
            "training_unigram_loss": log.get("unigram_eval_loss"),
        },
    )


def run_demo(
    out_dir: Union[str, Path] = "attnres-report",
    *,
    n_prompts: int = 32,
    seq_len: int = 128,
    mode: str = "zero",
    metric: str = "loss",
    groups: Sequence[str] = DEFAULT_GROUPS,
    batch_size: Optional[int] = None,
    n_boot: int = 200,
    seed: int = 0,
    bands: Any = None,
    progress: bool = True,
    recency_bias: float = bundled.DEMO_RECENCY_BIAS,
    overwrite: bool = False,
) -> ProtocolResult:
    """Run the demo and write ``report.md``, ``summary.json`` and ``figures/`` into ``out_dir``
    (which must not hold files unless ``overwrite=True``; see :func:`run_protocol`)."""
    check_output_dir(out_dir, overwrite=overwrite)  # before the models are loaded
    trained = bundled.load_attnres()
    tokens = bundled.eval_tokens(trained, n_prompts=n_prompts, seq_len=seq_len)
    subjects = [_wrapped_subject(recency_bias, tokens), _trained_subject(trained)]
    return run_protocol(
        subjects,
        tokens,
        out_dir,
        mode=mode,
        metric=metric,
        groups=groups,
        batch_size=batch_size,
        n_boot=n_boot,
        seed=seed,
        bands=bands,
        progress=progress,
        command="attnres-lens demo",
        data={
            "source": "bundled held-out text (CPython standard library: "
            + ", ".join(bundled.EVAL_SOURCES)
            + "; PSF License)",
        },
        title="Wrapped vs trained routing: the bundled-model demo",
        intro=INTRO,
        overwrite=overwrite,
    )
