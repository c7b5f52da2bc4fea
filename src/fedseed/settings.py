"""How a setting is declared, read from a TOML table and checked.

Every configurable dataclass (the config sections, each method's config, the
robust and fault sections) declares its fields with :func:`setting`: a default,
a help text and, for words, the allowed values. :func:`build_section` reads a
table into such a class, and every error names the key and says what is allowed.
Components import this module, never ``fedseed.config``, which only assembles them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """The configuration is invalid; the text names the key."""


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its help text (and allowed values): what listings and errors show."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def check_choices(obj: Any, section: str) -> None:
    """Every word-valued field of ``obj`` is one of its allowed values (for objects built without a table)."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices and getattr(obj, f.name) not in choices:
            raise ConfigError(f"`{section}.{f.name}` must be one of {', '.join(choices)}; got {getattr(obj, f.name)!r}")


def require_positive(obj: Any, section: str, *names: str) -> None:
    """Each named field is a number > 0 (NaN fails too)."""
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"`{section}.{name}` must be > 0, got {value!r}")


def _coerce(key: str, value: Any, typ: type) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool) or typ is not bool and isinstance(value, bool):
        raise ConfigError(f"`{key}` must be {typ.__name__}, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(f"`{key}` must be {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def build_section(name: str, cls: type, table: dict[str, Any]) -> Any:
    """Instantiate a settings dataclass from a TOML table, naming any bad key."""
    if not isinstance(table, dict):
        raise ConfigError(f"`{name}` must be a table, got {table!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key `{name}.{unknown[0]}`; valid keys in [{name}]: {', '.join(sorted(fields))}")
    values = {key: _coerce(f"{name}.{key}", value, hints[key]) for key, value in table.items()}
    section = cls(**values)
    check_choices(section, name)
    return section
