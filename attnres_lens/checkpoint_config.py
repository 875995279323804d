"""A checkpoint's ``config.json``, read and type-checked without torch.

The loader checks a config here before it sizes anything from it, and the command line runs the
same checks before its seconds-long torch import, so that ``"num_hidden_layers": 4.7`` is
refused in a fraction of a second, naming the field and the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

#: The ``model_type`` values the loader reads: a vanilla Qwen3 (wrapped) or a Qwen3 with routers.
SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_attnres")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as what it claims to be."""


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read JSON file {str(path)!r}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{str(path)!r} holds a JSON {type(data).__name__}, not an object: a Hugging Face "
            f"{path.name} is one JSON object of named fields (e.g. {{\"model_type\": \"qwen3\", ...}})"
        )
    return data


COUNT_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
OPTIONAL_COUNT_FIELDS = ("head_dim", "num_key_value_heads", "max_position_embeddings", "attnres_num_blocks")
FLOAT_FIELDS = ("rope_theta", "rms_norm_eps", "initializer_range", "attnres_recency_bias_init")


def check_config_types(hf: dict[str, Any], where: str) -> None:
    """Refuse a count that is not a positive int (4.7, true, "four") or a float field that is
    not a finite number, naming the field and ``where`` (the config file)."""
    for name in COUNT_FIELDS + OPTIONAL_COUNT_FIELDS:
        if name not in hf or (name in OPTIONAL_COUNT_FIELDS and hf[name] is None):
            continue
        value = hf[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{where}: {name} must be an integer, got {value!r}")
        if value < 1:
            raise CheckpointError(f"{where}: {name} must be a positive integer, got {value!r}")
    rope = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    floats = [(n, hf.get(n)) for n in FLOAT_FIELDS] + [("rope_parameters.rope_theta", rope.get("rope_theta"))]
    for name, value in floats:
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{where}: {name} must be a finite number, got {value!r}")


def checked_config(directory: Path) -> dict[str, Any]:
    """``directory``'s ``config.json``, refused (:class:`CheckpointError`) when it is not one
    JSON object or a Qwen3 field has the wrong type."""
    path = directory / "config.json"
    hf = read_json(path)
    if hf.get("model_type") in SUPPORTED_MODEL_TYPES:
        check_config_types(hf, str(path))
    return hf


__all__ = ["COUNT_FIELDS", "SUPPORTED_MODEL_TYPES", "CheckpointError", "check_config_types", "checked_config", "read_json"]
