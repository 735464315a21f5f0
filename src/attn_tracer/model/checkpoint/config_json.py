"""A checkpoint's config.json: read (small, UTF-8, a JSON object) and its fields checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attn_tracer.model.checkpoint.source import _read_small
from attn_tracer.model.memory import human
from attn_tracer.model.safetensors_io import (
    CheckpointError,
    json_problem,
)

_MAX_CONFIG = 1_000_000
_MAX_DIM = 2**31 - 1


def read_config(directory: Path) -> tuple[Path, dict[str, Any]]:
    """(the path of config.json, its object)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{directory} is not a model directory: config.json is missing "
            "(pass a .safetensors/.bin file directly, or a save_pretrained folder)"
        )
    data = _read_small(config_path, _MAX_CONFIG, f"{config_path} is over {human(_MAX_CONFIG)}: "
                       "not a model config (a GPT-2 config.json is about 1 KB)")
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"cannot read {config_path}: it is not UTF-8 text ({e.reason} at "
                              f"byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {config_path}: {json_problem(e)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    return config_path, config


def model_type(config_path: Path, config: dict[str, Any]) -> str:
    model_type = config.get("model_type", "gpt2")
    if not isinstance(model_type, str):
        raise CheckpointError(f"{config_path}: 'model_type' must be a string, got a JSON "
                              f"{_json_type(model_type)}")
    return model_type


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def _json_type(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), "number")




def _config_int(config_path: Path, config: dict[str, Any], name: str) -> int:
    if name not in config:
        raise CheckpointError(f"{config_path} has no {name!r} field (is it a GPT-2 config?)")
    value = config[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MAX_DIM:
        shown = (f"a JSON {_json_type(value)}" if not isinstance(value, int) or
                 isinstance(value, bool) else "a larger one" if value > 0 else repr(value))
        raise CheckpointError(f"{config_path}: {name!r} must be a positive integer up to "
                              f"{_MAX_DIM}, got {shown}")
    return value


def _config_eps(config_path: Path, config: dict[str, Any], name: str = "layer_norm_epsilon",
                default: float = 1e-5) -> float:
    eps = config.get(name, default)
    valid = isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1
    if not valid:
        shown = repr(eps) if isinstance(eps, float) else f"a JSON {_json_type(eps)}"
        raise CheckpointError(
            f"{config_path}: {name!r} must be a small positive number, got {shown}"
        )
    return float(eps)


def _check_heads(where: str, d_model: int, heads: int) -> None:
    if heads <= 0 or d_model % heads:
        raise CheckpointError(
            f"{where}: heads={heads} does not divide d_model={d_model}; "
            "pick a head count that divides it"
        )

