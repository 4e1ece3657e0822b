"""``ebrflow config show``: the effective settings as TOML or JSON, secrets masked."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ebrflow.config import Settings

MASK = "**********"
_SECRET_NAME = re.compile(r"password|secret|token|credential|proxy", re.IGNORECASE)  # proxy URLs hold logins
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain data; ``SecretStr`` values and any set value under a secret-looking key (e.g. in a
    pass-through dict) become ``**********``; an unset secret stays empty, so the output shows whether it is set."""
    return _mask(settings.model_dump(mode="json"))


def _mask(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _mask(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, key) for v in value]
    if _SECRET_NAME.search(key) and value not in ("", None):
        return MASK
    return value


def render(settings: Settings, fmt: str = "toml") -> str:
    """The masked settings as ``toml`` (a file ``--config`` accepts; unset optional keys as comments) or ``json``."""
    data = masked(settings)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt != "toml":
        raise ValueError(f"unknown format {fmt!r}; expected toml or json")
    return to_toml(data)


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """Sections of scalar, list and inline-table values as TOML; ``None`` (TOML has no null) becomes a comment."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{_key(section)}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {_key(key)} = (unset)")
            else:
                lines.append(f"{_key(key)} = {_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = [f"{_key(str(k))} = {_value(v)}" for k, v in value.items() if v is not None]
        return "{" + (" " + ", ".join(items) + " " if items else "") + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
