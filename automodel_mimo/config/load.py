"""Loading a run configuration: YAML (a --config file or the embedded default) + dotted `key=value`
overrides -> a typed RunConfig (config/schema.py), validated (config/checks.py).

Every check runs in the CLI process, before ranks are spawned or a process group exists, so a bad config fails
once, with one line naming the key and the fix, and never leaves a rank waiting.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from automodel_mimo.config.schema import CONFIG_DIR, RunConfig
from automodel_mimo.config.checks import validate
from automodel_mimo.errors import UserInputError


def default_config_path(algo: str) -> Path:
    return CONFIG_DIR / f"{algo}_tiny.yaml"


def load_config(algo: str, path: str | None = None, overrides: list[str] = (), world_size: int | None = None,
                notes: list[str] | None = None) -> RunConfig:
    """YAML (the embedded default when `path` is None) + overrides -> validated RunConfig. Adjustments that
    are not errors (a warm-up longer than the run, keys the dataset ignores) are appended to `notes`."""
    cfg_path = Path(path) if path else default_config_path(algo)
    if not cfg_path.is_file():
        raise UserInputError(f"--config {cfg_path}: file not found")
    try:
        raw = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserInputError(f"--config {cfg_path}: not valid YAML{_yaml_where(e)}: {_yaml_problem(e)}; fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"--config {cfg_path}: cannot be read ({e}); point --config at a YAML file") from None
    if not isinstance(raw, dict):
        raise UserInputError(f"--config {cfg_path}: the top level must be a mapping of keys")
    raw.setdefault("algo", algo)
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(RunConfig, raw, prefix="")
    if cfg.algo != algo:
        raise UserInputError(f"algo: the config says '{cfg.algo}' but the command is '{algo}'")
    validate(cfg, world_size, notes)
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserInputError(f"override '{item}': expected dotted.key=value, e.g. train.lr=1e-4")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError as e:
        raise UserInputError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)}); close its brackets "
                             f"or quotes (e.g. train.betas=[0.9,0.95]), or quote the whole value") from None


def _yaml_where(e: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error in a file, and where the construct it broke began (an unclosed
    bracket is noticed lines later)."""
    mark, context, start = (getattr(e, name, None) for name in ("problem_mark", "context", "context_mark"))
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    if context and start is not None and mark is not None and start.line != mark.line:
        where += f" ({context} that starts at line {start.line + 1})"
    return where


def _yaml_problem(e: yaml.YAMLError) -> str:
    return " ".join(str(getattr(e, "problem", None) or e).split())


def _build(cls, raw: dict, prefix: str):
    """Instantiate dataclass `cls` from a dict, checking key names and value types."""
    if not isinstance(raw, dict):
        raise UserInputError(f"{prefix.rstrip('.')}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise UserInputError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _convert(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is float and isinstance(value, str):
        value = _float_or_same(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        list: isinstance(value, list),
    }[hint]
    if not ok:
        raise UserInputError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if hint is float else value


def _float_or_same(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
