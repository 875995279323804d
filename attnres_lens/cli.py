"""The ``attnres-lens`` command line.

Subcommands::

    attnres-lens demo                      # the paper's protocol on the bundled models
    attnres-lens train [options]           # train an AttnRes model or a Qwen3 baseline
    attnres-lens inspect SOURCE            # format, flavour, schedule, routers, source table
    attnres-lens probe SOURCE --text FILE  # mass vs effect on any checkpoint

Every subcommand has ``--help``. Errors are reported as one line on stderr with a non-zero exit
code (2 for bad arguments, 1 for anything that fails while running); set the environment
variable ``ATTNRES_LENS_DEBUG=1`` to see the full traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import warnings
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

from .bootstrap_limits import min_prompts_for_bootstrap, min_resamples_for_bootstrap

PROG = "attnres-lens"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


class UsageError(Exception):
    """A bad command line: printed as one line with the subcommand's usage hint, exit code 2."""


# ============================================================================ helpers
def _number(
    convert: Callable[[str], Any],
    lowest: Optional[Union[int, float]] = None,
    *,
    strict: bool = False,
    highest: Optional[Union[int, float]] = None,
    what: str,
):
    """An argparse ``type=``: ``convert`` the text and, with ``lowest``, require
    ``value >= lowest`` (``> lowest`` when ``strict``), with ``highest`` ``value <= highest``;
    errors name ``what`` was expected."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        too_low = lowest is not None and (value <= lowest if strict else value < lowest)
        if too_low or (highest is not None and value > highest):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _number(int, 1, what="a positive integer")
_nonneg_int = _number(int, 0, what="an integer >= 0")
_positive_float = _number(float, 0.0, strict=True, what="a number > 0")
_float = _number(float, what="a number")
#: More bootstrap resamples do not sharpen a 95% interval, and every resample costs memory
#: (one float per slice): 100,000 is far beyond what any interval needs.
MAX_BOOT = 100_000
#: The CLI's intervals are 95% CIs: the fewest resamples and prompts they can rest on.
MIN_BOOT = min_resamples_for_bootstrap(0.95)
MIN_PROMPTS = min_prompts_for_bootstrap(0.95)
_boot_count = _number(
    int, MIN_BOOT, highest=MAX_BOOT,
    what=f"a number of resamples from {MIN_BOOT} (each tail of a 95% CI needs one) to {MAX_BOOT:,}",
)
_prompt_count = _number(
    int, MIN_PROMPTS, what=f"at least {MIN_PROMPTS} prompts (with fewer, a 95% bootstrap CI is just the data range)"
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG CMD: error: MESSAGE (see PROG CMD --help)``."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default when it has a meaningful one and its help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and default is not None
            and default is not False
            and default is not argparse.SUPPRESS
            and action.option_strings
        ):
            shown = " ".join(default) if isinstance(default, list) else default
            text += f" (default: {shown})"
        return text


def _add_wrap_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "wrapping a vanilla Qwen3 (ignored for AttnRes checkpoints, whose routing is stored)"
    )
    g.add_argument("--flavour", choices=("kimi", "cumulative"), help="flavour to wrap a vanilla qwen3 checkpoint in")
    g.add_argument(
        "--schedule",
        choices=("uniform", "recency"),
        help="wrap schedule (kimi: uniform; cumulative: recency); default: the flavour's own",
    )
    g.add_argument("--recency-bias", type=_float, metavar="B", help="recency bias b of the 'recency' schedule")
    g.add_argument("--n-blocks", type=_positive_int, metavar="N", help="AttnRes blocks of the wrap (default: min(8, layers))")
    p.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="a local Hugging Face tokenizer directory (default: the checkpoint's own; the built-in "
        "byte tokenizer only for byte-sized vocabularies)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weights dtype")
    p.add_argument("--device", default="cpu", help="torch device to load the model on")


def _load_source(args: argparse.Namespace, *, check_finite: bool = True) -> Any:
    from .loading import WRAP_SCHEDULES, load_tokenizer_dir
    from .model import HookedAttnResTransformer

    source = args.source
    wrap = {
        "flavour": args.flavour,
        "schedule": args.schedule,
        "recency_bias": args.recency_bias,
        "n_blocks": args.n_blocks,
    }
    if args.flavour is None and _is_vanilla_qwen3(source):
        raise CLIError(
            f"{source} is a vanilla qwen3 checkpoint: it must be wrapped to have routers; pass "
            "--flavour kimi (uniform schedule) or --flavour cumulative --recency-bias B"
        )
    wrap_schedule = WRAP_SCHEDULES.get(args.flavour, (None,))[0]  # the flavour's own wrap
    if (
        wrap_schedule == "recency"
        and args.recency_bias is None
        and _is_vanilla_qwen3(source)
    ):
        raise CLIError(
            "--flavour cumulative wraps a vanilla qwen3 with the recency schedule: give "
            "--recency-bias B (e.g. 3; the larger B, the closer to the vanilla function)"
        )
    tokenizer = load_tokenizer_dir(args.tokenizer) if args.tokenizer else None
    return HookedAttnResTransformer.from_pretrained(
        source, **{k: v for k, v in wrap.items() if v is not None}, dtype=args.dtype, device=args.device,
        tokenizer=tokenizer, check_finite=check_finite,
    )


# ============================================================================ train
_TRAIN_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    # (flag, TrainConfig field, argparse kwargs)
    ("--arch", "arch", {"choices": ("kimi", "cumulative", "qwen3"), "help": "what to train: an AttnRes flavour, or the standard-residual Qwen3 baseline"}),
    ("--routing-mode", "routing_mode", {"choices": ("block", "full"), "help": "AttnRes routing mode"}),
    ("--n-layers", "n_layers", {"type": _positive_int, "help": "layers"}),
    ("--d-model", "d_model", {"type": _positive_int, "help": "width"}),
    ("--n-heads", "n_heads", {"type": _positive_int, "help": "attention heads"}),
    ("--n-kv-heads", "n_key_value_heads", {"type": _positive_int, "help": "key/value heads (default: n-heads)"}),
    ("--d-head", "d_head", {"type": _positive_int, "help": "head dimension (default: d-model / n-heads)"}),
    ("--d-mlp", "d_mlp", {"type": _positive_int, "help": "MLP width (default: 3 * d-model)"}),
    ("--n-blocks", "n_blocks", {"type": _positive_int, "help": "AttnRes blocks (default: one per layer)"}),
    ("--tie-embeddings", "tie_word_embeddings", {"action": "store_const", "const": True, "help": "tie the unembedding to the embedding"}),
    ("--rotary-base", "rotary_base", {"type": _positive_float, "help": "rotary base (theta)"}),
    ("--data", "data", {"nargs": "+", "metavar": "PATH", "help": "text files or directories (default: the Python standard library's *.py files)"}),
    ("--eval-data", "eval_data", {"nargs": "+", "metavar": "PATH", "help": "held-out files or directories (default: a deterministic per-file split of --data)"}),
    ("--glob", "glob", {"help": "comma-separated file-name patterns for directories"}),
    ("--tokenizer", "tokenizer", {"metavar": "DIR", "help": "a local Hugging Face tokenizer directory (default: built-in byte-level)"}),
    ("--eval-fraction", "eval_fraction", {"type": _positive_float, "help": "fraction of files held out"}),
    ("--max-tokens", "max_tokens", {"type": _positive_int, "help": "use only the first N training tokens"}),
    ("--seq-len", "seq_len", {"type": _positive_int, "help": "tokens per training sequence (= the model's context)"}),
    ("--steps", "steps", {"type": _positive_int, "help": "optimizer steps"}),
    ("--batch-size", "batch_size", {"type": _positive_int, "help": "sequences per step"}),
    ("--lr", "lr", {"type": _positive_float, "help": "peak learning rate"}),
    ("--min-lr-ratio", "min_lr_ratio", {"type": _float, "help": "final learning rate / peak"}),
    ("--warmup-steps", "warmup_steps", {"type": _nonneg_int, "help": "linear warmup steps"}),
    ("--weight-decay", "weight_decay", {"type": _float, "help": "AdamW weight decay (matrices only)"}),
    ("--grad-clip", "grad_clip", {"type": _positive_float, "help": "max global gradient norm"}),
    ("--eval-every", "eval_every", {"type": _nonneg_int, "help": "steps between held-out evaluations (0: only at the end)"}),
    ("--eval-batches", "eval_batches", {"type": _positive_int, "help": "held-out batches per evaluation"}),
    ("--save-every", "save_every", {"type": _nonneg_int, "help": "steps between checkpoints (0: only the final one)"}),
    ("--seed", "seed", {"type": _nonneg_int, "help": "random seed (init and data order)"}),
    ("--device", "device", {"help": "cpu, cuda[:N], mps or auto (a GPU when present)"}),
    ("--threads", "threads", {"type": _positive_int, "help": "torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)"}),
    ("--precision", "precision", {"choices": ("auto", "fp32", "bf16"), "help": "auto: bf16 autocast on GPU, fp32 on CPU"}),
    ("--out", "out_dir", {"metavar": "DIR", "help": "output directory"}),
]


def _add_train(sub: Any) -> None:
    from .train_config import TrainConfig

    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train an AttnRes model (kimi or cumulative) or a standard-residual Qwen3 baseline",
        description=(
            "Train a model from scratch and save it with save_pretrained (AttnRes models in the "
            "qwen3_attnres layout, the qwen3 baseline in Hugging Face's Qwen3 format).\n\n"
            "Default corpus: the Python standard library's own *.py files (present on every "
            "machine, PSF license), split per file into train / held-out by a hash of the path.\n"
            "Resume an interrupted run with --resume DIR (a checkpoint, or a run directory for "
            "its latest checkpoint): it continues the saved run exactly."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, name, kwargs in _TRAIN_FLAGS:
        default = getattr(defaults, name)
        help_text = kwargs.get("help", "")
        if "default" not in help_text and default is not None and default is not False and default != []:
            help_text += f" (default: {default})"
        extra: dict[str, Any] = {}
        if "metavar" not in kwargs and kwargs.get("type") in (_positive_int, _nonneg_int):
            extra["metavar"] = "N"
        elif "metavar" not in kwargs and kwargs.get("type") in (_positive_float, _float):
            extra["metavar"] = "X"
        p.add_argument(flag, dest=name, default=None, **{**kwargs, **extra, "help": help_text})
    p.add_argument("--resume", metavar="DIR", help="continue a saved run from a checkpoint or run directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files (default: refuse)")
    p.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="start even when the estimated activation memory exceeds the memory available",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, TrainingError, read_checkpoint_config, train

    given = {name: getattr(args, name) for _, name, _ in _TRAIN_FLAGS if getattr(args, name) is not None}
    if args.resume is not None:
        saved = read_checkpoint_config(args.resume)
        fixed = sorted(
            flag
            for flag, name, _ in _TRAIN_FLAGS
            if name in given and name not in TrainConfig.RESUMABLE_OVERRIDES and given[name] != getattr(saved, name)
        )
        if fixed:
            raise TrainingError(
                f"--resume continues the saved run, whose settings cannot change: {', '.join(fixed)} "
                f"(only {', '.join(_flag_of(n) for n in TrainConfig.RESUMABLE_OVERRIDES)} may be given)"
            )
        cfg = dataclasses.replace(saved, **{k: v for k, v in given.items() if k in TrainConfig.RESUMABLE_OVERRIDES})
    else:
        cfg = TrainConfig(**given)
    result = train(
        cfg, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite,
        check_memory=not args.skip_memory_check,
    )
    if args.quiet:
        print(f"{result.out_dir}\teval_loss={result.final_eval_loss:.4f}\tunigram={result.unigram_eval_loss:.4f}")
    return 0


def _flag_of(name: str) -> str:
    return next(flag for flag, field, _ in _TRAIN_FLAGS if field == name)


# ============================================================================ inspect
def _add_inspect(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="print a checkpoint's format, flavour, schedule, routers and source table",
        description=(
            "Load SOURCE (a directory written by this library, a qwen3_attnres checkpoint, or a "
            "vanilla qwen3 checkpoint wrapped with --flavour) and describe its routing."
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("source", metavar="SOURCE", help="a local checkpoint directory or a hub id")
    _add_wrap_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_inspect)


def describe(model: Any) -> dict[str, Any]:
    """What ``attnres-lens inspect`` prints, as a dict (JSON-serialisable)."""
    import torch

    cfg = model.cfg
    routers = []
    for spec, router in model.routers():
        routers.append(
            {
                "router": spec.name,
                "sublayer": spec.sublayer,
                "layer": spec.layer,
                "n_sources": spec.n_sources,
                "query_norm": float(router.proj.weight.detach().float().norm()),
                "key_gain_mean": float(router.norm.weight.detach().float().mean()),
                "bias": None if router.bias is None else float(router.bias.detach()),
                "families": list(spec.families()),
            }
        )
    from .layouts import layout_name
    from .loading import tokenizer_name
    from .router import router_parameters

    n_router = sum(p.numel() for p in router_parameters(model))

    return {
        "format": getattr(model, "checkpoint_format", "unknown"),
        "layout": layout_name(cfg.flavour, cfg.routing_mode),
        "flavour": cfg.flavour,
        "routing_mode": cfg.routing_mode,
        "n_blocks": cfg.n_blocks,
        "layers_per_block": cfg.layers_per_block,
        "final_router": cfg.has_final_router,
        "schedule": model.schedule.to_dict() if hasattr(model.schedule, "to_dict") else dict(model.schedule),
        "backbone": {
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "n_heads": cfg.n_heads,
            "n_key_value_heads": cfg.n_key_value_heads,
            "d_head": cfg.d_head,
            "d_mlp": cfg.d_mlp,
            "d_vocab": cfg.d_vocab,
            "n_ctx": cfg.n_ctx,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        },
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_router_params": n_router,
        "tokenizer": tokenizer_name(model.tokenizer),
        "non_finite": list(getattr(model, "non_finite_keys", [])),
        "routing_note": _routing_note(routers),
        "routers": routers,
        "source_table": json.loads(model.source_table().to_json(orient="records")),
        "torch": torch.__version__,
    }


def _routing_note(routers: list[dict[str, Any]]) -> Optional[str]:
    """What every router's query being zero means (``None`` when some query is not)."""
    if any(r["query_norm"] != 0 for r in routers):
        return None
    if all(not r["bias"] for r in routers):
        return "routing is uniform: untrained or wrapped (every query and bias is zero)"
    return "routing is content-independent: every query is zero, only recency biases route (untrained or wrapped)"


def _schedule_text(schedule: dict[str, Any]) -> str:
    kind = schedule.get("kind", "none")
    if kind == "none":
        return "none (routing is learned or edited, not a wrap schedule)"
    if kind == "recency":
        return f"recency, bias b = {schedule['bias']:g} on the current stream (wrapped vanilla Qwen3)"
    return "uniform: every router averages its sources (wrapped vanilla Qwen3)"


def _cmd_inspect(args: argparse.Namespace) -> int:
    if args.flavour is None and _is_vanilla_qwen3(args.source):
        return _inspect_vanilla(args)
    model = _load_source(args, check_finite=False)  # inspect names what is not finite
    info = describe(model)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    b = info["backbone"]
    lines = [
        f"source      {args.source}",
        f"format      {info['format']}",
        f"layout      {info['layout']}",
        f"flavour     {info['flavour']} (routing mode {info['routing_mode']}, {info['n_blocks']} blocks of "
        f"{info['layers_per_block']} layer(s), {'with' if info['final_router'] else 'no'} final router)",
        f"schedule    {_schedule_text(info['schedule'])}",
        f"backbone    Qwen3: {b['n_layers']} layers, d_model {b['d_model']}, {b['n_heads']} heads x {b['d_head']} "
        f"(kv {b['n_key_value_heads']}), d_mlp {b['d_mlp']}, vocab {b['d_vocab']}, n_ctx {b['n_ctx']}, "
        f"{'tied' if b['tie_word_embeddings'] else 'untied'} embeddings, {b['dtype']}",
        f"parameters  {info['n_params']:,} ({info['n_router_params']:,} in routers)",
        f"tokenizer   {info['tokenizer']}",
        *([f"routing     {info['routing_note']}"] if info["routing_note"] else []),
        *([f"NOT FINITE  {len(info['non_finite'])} tensor(s) hold NaN or inf: {', '.join(info['non_finite'])}"]
          if info["non_finite"] else []),
        "",
        f"routers ({len(info['routers'])}):",
    ]
    width = max(len(r["router"]) for r in info["routers"])
    lines.append(f"  {'router':<{width}}  sources  |query|   gain   bias     families")
    for r in info["routers"]:
        bias = "-" if r["bias"] is None else f"{r['bias']:+.3f}"
        lines.append(
            f"  {r['router']:<{width}}  {r['n_sources']:>7}  {r['query_norm']:7.3f}  {r['key_gain_mean']:5.2f}  "
            f"{bias:>7}  {','.join(r['families'])}"
        )
    lines += ["", "source table:", model.source_table().to_string(index=False)]
    print("\n".join(lines))
    return 0


def _inspect_vanilla(args: argparse.Namespace) -> int:
    hf = json.loads((Path(args.source).expanduser() / "config.json").read_text())
    info = {
        "format": "qwen3",
        "flavour": None,
        "schedule": None,
        "backbone": {
            "n_layers": hf.get("num_hidden_layers"),
            "d_model": hf.get("hidden_size"),
            "n_heads": hf.get("num_attention_heads"),
            "n_key_value_heads": hf.get("num_key_value_heads"),
            "d_head": hf.get("head_dim"),
            "d_mlp": hf.get("intermediate_size"),
            "d_vocab": hf.get("vocab_size"),
            "n_ctx": hf.get("max_position_embeddings"),
            "tie_word_embeddings": hf.get("tie_word_embeddings"),
        },
        "routers": [],
        "note": "a vanilla (standard-residual) Qwen3: no routers until it is wrapped",
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    b = info["backbone"]
    print(
        "\n".join(
            [
                f"source      {args.source}",
                "format      qwen3 (vanilla, standard residual stream)",
                "flavour     none: no routers until wrapped",
                "schedule    none",
                f"backbone    Qwen3: {b['n_layers']} layers, d_model {b['d_model']}, {b['n_heads']} heads x "
                f"{b['d_head']} (kv {b['n_key_value_heads']}), d_mlp {b['d_mlp']}, vocab {b['d_vocab']}, "
                f"n_ctx {b['n_ctx']}, {'tied' if b['tie_word_embeddings'] else 'untied'} embeddings",
                "",
                "To see it as a Block AttnRes model, wrap it:",
                f"  {PROG} inspect {args.source} --flavour kimi                       "
                "# uniform schedule (every router averages)",
                f"  {PROG} inspect {args.source} --flavour cumulative --recency-bias 3  "
                "# recency schedule",
            ]
        )
    )
    return 0


def _is_vanilla_qwen3(source: str) -> bool:
    config = Path(source).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False  # loading says what is wrong with it
    return isinstance(data, dict) and data.get("model_type") == "qwen3"


# ============================================================================ probe
_MODES = ("zero", "mask", "mean", "resample")
_GROUPS = ("slice", "family", "family_band")


def _bands(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=LAYERS`` with LAYERS like ``0-3`` or ``0,2,4`` or ``0-3,6``."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"a band is NAME=LAYERS (e.g. early=0-13), got {text!r}")
    layers: list[int] = []
    try:
        for part in spec.split(","):
            lo, dash, hi = part.partition("-")
            layers += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"band layers must be integers or ranges like 0-13, got {spec!r}") from None
    return name, tuple(layers)


def _add_protocol_options(p: argparse.ArgumentParser, *, out_default: str, threads_default: Optional[int] = None) -> None:
    p.add_argument("--out", metavar="DIR", default=out_default, help="where report.md, summary.json and figures/ go")
    p.add_argument("--mode", choices=_MODES, default="zero", help="how each slice is ablated")
    p.add_argument("--metric", choices=("loss", "kl"), default="loss", help="loss: mean next-token loss; kl: KL(clean || ablated) of the next-token distributions")
    p.add_argument("--groups", nargs="+", choices=_GROUPS, default=["slice", "family_band"], help="groupings to report")
    p.add_argument("--bands", nargs="+", type=_bands, metavar="NAME=LAYERS", help="depth bands (default: early/late halves)")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="prompts per forward pass (default: all at once)")
    p.add_argument("--prompts", type=_prompt_count, metavar="N", default=32, help="number of prompts (evenly spaced windows of the text)")
    p.add_argument("--seq-len", type=_positive_int, metavar="N", default=128, help="tokens per prompt (at most the model's context)")
    p.add_argument("--n-boot", type=_boot_count, metavar="N", default=200, help=f"bootstrap resamples ({MIN_BOOT} to {MAX_BOOT:,})")
    p.add_argument("--seed", type=_nonneg_int, metavar="N", default=0, help="bootstrap seed")
    p.add_argument(
        "--threads",
        type=_positive_int,
        metavar="N",
        default=threads_default,
        help="torch CPU threads"
        + (
            " (default: 1: the bundled models are tiny, and one thread is as fast as several and "
            "immune to oversubscribed cores)"
            if threads_default == 1
            else " (default: torch's choice; 1 is often faster on a busy machine)"
        ),
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files (default: refuse)")
    p.add_argument("--quiet", action="store_true", help="no progress bar; print only the summary table")


def _set_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _add_probe(sub: Any) -> None:
    p = sub.add_parser(
        "probe",
        help="mass vs effect (and the schedule check) on any checkpoint and text",
        description=(
            "Run the paper's protocol on one checkpoint: verify_schedule (wrapped models), "
            "routing content dependence, and mass_vs_effect per slice and per family x sublayer "
            "x depth band, on windows of the given text files. Writes report.md, summary.json "
            "and PNG figures into --out, once every unit is measured. Until then, finished units "
            "are recorded in DIR.checkpoints/ next to it: rerunning the same command resumes. "
            "Runs sharded under torchrun (docs/scale.md)."
        ),
        formatter_class=_Formatter,
    )
    p.add_argument("source", metavar="SOURCE", help="a local checkpoint directory or a hub id")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text files to probe on")
    p.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="start even when the estimated memory of the sweeps exceeds the memory this run may allocate",
    )
    _add_protocol_options(p, out_default="attnres-probe")
    _add_wrap_options(p)
    p.set_defaults(func=_cmd_probe)


def _read_texts(paths: Sequence[str]) -> list[str]:
    texts = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise CLIError(f"--text: {raw} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CLIError(f"--text: {raw} is not UTF-8 text") from None
        if not text.strip():
            raise CLIError(f"--text: {raw} is empty{' (only whitespace)' if text else ''}; give text to probe on")
        texts.append(text)
    return texts


def _protocol_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "mode": args.mode,
        "metric": args.metric,
        "groups": list(dict.fromkeys(args.groups)),
        "batch_size": args.batch_size,
        "n_boot": args.n_boot,
        "seed": args.seed,
        "bands": dict(args.bands) if args.bands else None,
        "progress": not args.quiet,
        "overwrite": args.overwrite,
    }


def _check_protocol_args(args: argparse.Namespace, n_layers: Optional[int]) -> None:
    """The bands' one rule (:func:`attnres_lens.bands.resolve_bands`), against the model's
    ``n_layers`` when the config says it (else only that no layer is in two bands); checked
    before torch is imported."""
    if not args.bands:
        return
    names = [name for name, _ in args.bands]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CLIError(f"--bands: each band name once, got {', '.join(repeated)} more than once")
    from .bands import layers_text, resolve_bands

    layers_named = max(layer for _, layers in args.bands for layer in layers) + 1
    try:  # the one rule of bands (no layer in two, every layer in the model), said as a CLI error
        resolve_bands(dict(args.bands), n_layers if n_layers is not None else layers_named)
    except (ValueError, TypeError) as err:
        raise CLIError(f"--bands {' '.join(f'{name}={layers_text(layers)}' for name, layers in args.bands)}: {err}") from None


def _layer_count(source: Union[str, Path]) -> Optional[int]:
    """``num_hidden_layers`` from a local checkpoint's config.json, type-checked as the loader
    checks it (:func:`attnres_lens.checkpoint_config.checked_config`), without torch; ``None``
    for a hub id or a directory without a config (loading says what is missing)."""
    from .checkpoint_config import checked_config
    from .paths import local_checkpoint

    directory = local_checkpoint(source)
    if directory is None or not (directory / "config.json").is_file():
        return None
    value = checked_config(directory).get("num_hidden_layers")
    return value if isinstance(value, int) else None


def _size_note(asked_prompts: int, asked_seq_len: int, prompts: int, seq_len: int, why: str) -> None:
    """One console line when a run is smaller than asked (report.md says it too)."""
    if (prompts, seq_len) != (asked_prompts, asked_seq_len):
        print(
            f"{PROG}: note: running {prompts} prompts x {seq_len} tokens, not the {asked_prompts} x "
            f"{asked_seq_len} asked: {why}",
            file=sys.stderr,
        )


def _finish(result: Any, args: argparse.Namespace, wall: float) -> None:
    print(result.table())
    if not args.quiet:
        html = "report.html, " if (result.out_dir / "report.html").is_file() else ""
        print(f"\nreport: {result.out_dir / 'report.md'}  ({html}summary.json and figures/ alongside); {wall:.0f}s")


def _cmd_probe(args: argparse.Namespace) -> int:
    from . import distributed

    started_group = not distributed.is_active() and distributed.init_from_env()
    try:
        if distributed.is_active():
            _as_rank(args, distributed)
        return _probe(args, distributed)
    finally:
        if started_group:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _as_rank(args: argparse.Namespace, distributed: Any) -> None:
    """Under ``torchrun``: each rank on its own GPU (``--device cuda`` or ``auto``); ranks other
    than 0 print nothing but errors."""
    if args.device == "auto" or args.device.startswith("cuda"):
        args.device = str(distributed.rank_device())
    if not distributed.is_writer():
        args.quiet = True
        warnings.simplefilter("ignore")


def _check_probe_memory(model: Any, batch: int, seq_len: int) -> None:
    """Refuse, with the estimate and the limit it meets, a probe whose sweeps cannot fit in the
    memory this process may allocate (the machine, its cgroup, ``ulimit -v``)."""
    from .resources import available_memory_on, gib
    from .sweep_engine import sweep_memory_bytes

    needed = sweep_memory_bytes(model, batch * seq_len)
    available = available_memory_on(model.embed.weight.device)
    if available is not None and needed > available.n_bytes:
        raise CLIError(
            f"the probe's sweeps need about {gib(needed)} (the weights, {batch} prompts x {seq_len} tokens "
            f"per pass and one stack of reruns), more than the {available} this run may allocate; lower "
            "--batch-size or --seq-len, or pass --skip-memory-check to try anyway"
        )


def _checkpoint_dir(out: str) -> Path:
    """Where ``probe --out DIR`` records finished units until the report is written."""
    path = Path(out)
    return path.with_name(path.name + ".checkpoints")


def _probe(args: argparse.Namespace, distributed: Any) -> int:
    import time

    from .bundled import text_windows
    from .loading import NoTokenizer
    from .protocol import Subject, run_protocol

    t0 = time.perf_counter()
    _set_threads(args)
    texts = args.texts if hasattr(args, "texts") else _read_texts(args.text)
    model = _load_source(args)
    if isinstance(model.tokenizer, NoTokenizer):
        raise CLIError(
            f"{args.source} ships no tokenizer and its vocabulary ({model.cfg.d_vocab:,} tokens) is "
            "not the built-in byte tokenizer's; pass the model's tokenizer with --tokenizer DIR"
        )
    seq_len = min(args.seq_len, model.cfg.n_ctx)
    tokens = text_windows(model, texts, n_prompts=args.prompts, seq_len=seq_len)
    reasons = [f"the model's context is {model.cfg.n_ctx} tokens"] if seq_len < args.seq_len else []
    if tokens.shape[0] < args.prompts:
        reasons.append(f"the text holds only {tokens.shape[0]} windows of {seq_len} tokens")
    _size_note(args.prompts, args.seq_len, tokens.shape[0], tokens.shape[1], "; ".join(reasons))
    if not args.skip_memory_check:
        _check_probe_memory(model, tokens.shape[0] if args.batch_size is None else min(args.batch_size, tokens.shape[0]),
                            tokens.shape[1])
    description = (
        f"{model.cfg.flavour} AttnRes, "
        + ("learned routing" if not model.schedule.is_scheduled else f"wrapped ({model.schedule.kind} schedule)")
    )
    checkpoints = _checkpoint_dir(args.out)
    try:
        result = run_protocol(
            [Subject("model", model, description=description, source=str(args.source))],
            tokens,
            args.out,
            command="attnres-lens probe",
            data={"source": ", ".join(args.text)},
            title=f"Routing probe: {args.source}",
            checkpoint_dir=checkpoints,
            discard_checkpoints=True,
            **_protocol_kwargs(args),
        )
    except distributed.RankStalledError as err:  # resumable too: the finished units stay
        raise CLIError(str(err.with_resume(
            f"the finished units are kept in {checkpoints}: rerun the same command to resume from them"
            if checkpoints.is_dir() else "nothing was finished yet: rerun the same command"))) from err
    except KeyboardInterrupt:  # a failure a rerun resumes: the finished units stay
        if distributed.is_writer() and checkpoints.is_dir():
            print(
                f"{PROG} probe: the finished units are kept in {checkpoints}: rerun the same command "
                "to resume from them (delete that directory to start over)",
                file=sys.stderr,
            )
        raise
    if distributed.is_writer():  # the report is complete: run_protocol removed the unit records
        _finish(result, args, time.perf_counter() - t0)
    return 0


# ============================================================================ demo
def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the paper's protocol on the bundled models: wrapped vanilla vs trained AttnRes",
        description=(
            "Load the two bundled tiny models (a standard-residual Qwen3, wrapped with the recency "
            "schedule, bias 3, and a Block AttnRes model whose routing was trained), check the "
            "schedule, measure how content-dependent each model's routing is, and compare "
            "routing mass with causal effect per slice and per family x sublayer x depth band on "
            "held-out text. Every option has a default: with none it writes ./attnres-report/."
        ),
        formatter_class=_Formatter,
    )
    _add_protocol_options(p, out_default="attnres-report", threads_default=1)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import time

    from . import bundled
    from .demo import run_demo

    t0 = time.perf_counter()
    _set_threads(args)
    _check_protocol_args(args, _layer_count(bundled.model_path(bundled.ATTNRES_MODEL)))
    if not args.quiet:
        print(
            f"{PROG} demo: wrapped vanilla Qwen3 (recency schedule, b = {bundled.DEMO_RECENCY_BIAS:g}) vs "
            f"Block AttnRes with trained routing, on {args.prompts} x {args.seq_len} held-out tokens"
        )
    result = run_demo(
        args.out, n_prompts=args.prompts, seq_len=args.seq_len, **_protocol_kwargs(args)
    )
    data = result.summary["data"]
    _size_note(args.prompts, args.seq_len, data["n_prompts"], data["seq_len"],
               "the bundled held-out text holds only that many windows")
    _finish(result, args, time.perf_counter() - t0)
    return 0


# ============================================================================ checks before torch
# Everything a command line can be refused for without torch is checked here, before any heavy
# import (seconds) and before a model is loaded: a wrong path fails in a fraction of a second.
def _check_source(source: str) -> None:
    from .paths import local_checkpoint

    local_checkpoint(source)


def _check_tokenizer_dir(args: argparse.Namespace) -> None:
    directory = getattr(args, "tokenizer", None)
    if directory is not None and not Path(directory).expanduser().is_dir():
        raise CLIError(f"--tokenizer: a tokenizer is a local directory holding a Hugging Face tokenizer, got {directory!r}")


def _check_output(out: str, *, overwrite: bool, flag: str = "--overwrite") -> None:
    from .outputs import check_output_dir
    from .paths import check_creatable

    check_output_dir(out, overwrite=overwrite, flag=flag)
    check_creatable(out, what="--out")


def _precheck_probe(args: argparse.Namespace) -> None:
    _check_source(args.source)
    _check_protocol_args(args, _layer_count(args.source))
    _check_tokenizer_dir(args)
    args.texts = _read_texts(args.text)
    _check_output(args.out, overwrite=args.overwrite)
    checkpoints = _checkpoint_dir(args.out)
    if checkpoints.exists() and not checkpoints.is_dir():
        raise CLIError(f"{checkpoints} (where probe records finished units) is a file; move it away")


def _precheck_demo(args: argparse.Namespace) -> None:
    _check_protocol_args(args, None)  # against the bundled models' layers once they are found
    _check_output(args.out, overwrite=args.overwrite)


def _precheck_inspect(args: argparse.Namespace) -> None:
    _check_source(args.source)
    _layer_count(args.source)  # the config's field types
    _check_tokenizer_dir(args)


def _precheck_train(args: argparse.Namespace) -> None:
    for flag, paths in (("--data", args.data), ("--eval-data", args.eval_data)):
        for raw in paths or ():
            if not Path(raw).expanduser().exists():
                raise CLIError(f"{flag}: {raw} does not exist")
    _check_tokenizer_dir(args)
    if args.resume is not None:
        if not Path(args.resume).expanduser().exists():
            raise CLIError(f"--resume: {args.resume} does not exist")
        return  # the run directory is the saved run's
    from .train_config import TrainConfig

    _check_output(args.out_dir or TrainConfig().out_dir, overwrite=args.overwrite)


_PRECHECKS = {"probe": _precheck_probe, "demo": _precheck_demo, "inspect": _precheck_inspect, "train": _precheck_train}


# ============================================================================ main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description=(
            "Interpretability for Block Attention Residuals (AttnRes) transformers.\n"
            "Start with `attnres-lens demo`: the wrapped-vs-trained routing protocol on the "
            "bundled tiny models, in a few minutes on a laptop CPU."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS = [_add_demo, _add_probe, _add_inspect, _add_train]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        print(_swallowed_source(argv, str(err)) or err, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help and --version
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command is None:
        commands = ", ".join(add.__name__.removeprefix("_add_") for add in _SUBCOMMANDS)
        print(f"{PROG}: error: give a command ({commands}; see {PROG} --help)", file=sys.stderr)
        return 2
    if os.environ.get("ATTNRES_LENS_DEBUG"):
        _PRECHECKS[args.command](args)
        return int(args.func(args) or 0)
    try:
        _PRECHECKS[args.command](args)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return code
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        message = str(exc) or type(exc).__name__
        if isinstance(exc, (FileNotFoundError, NotADirectoryError)) and exc.filename:
            message = f"{exc.strerror or 'not found'}: {exc.filename}"
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1


def _swallowed_source(argv: Sequence[str], error: str) -> Optional[str]:
    """``probe --text notes.txt my-ckpt``: ``--text`` takes every file after it, the checkpoint
    too. The message says so (the one argparse gives is "required: SOURCE")."""
    if not argv or argv[0] != "probe" or "--text" not in argv or "required: SOURCE" not in error:
        return None
    after = list(itertools.takewhile(lambda a: not a.startswith("-"), argv[argv.index("--text") + 1 :]))
    taken = [a for a in after if Path(a).expanduser().is_dir()]
    if not taken:
        return None
    source = taken[-1]
    files = " ".join(a for a in after if a != source)
    return (
        f"{PROG} probe: error: --text took the checkpoint {source!r} as a text file (it takes every "
        f"path after it): put SOURCE first, `{PROG} probe {source} --text {files}` (see {PROG} probe --help)"
    )


def _quiet_broken_pipe() -> int:
    """The reader of stdout went away (``... | head``): stop quietly, as Unix tools do.

    stdout is pointed at /dev/null so that the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, the status a Unix tool killed by a closed pipe reports


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
