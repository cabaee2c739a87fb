"""Strict plain-data configs: a mapping whose keys must be a dataclass's fields, with 'did you mean'."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any


def strict_fields(cls: type, data: Any, where: str, error: type[Exception] = ValueError) -> dict[str, Any]:
    """`data` as a dict for `cls(**...)`; an unknown key raises `error` naming it and the closest field."""
    if not isinstance(data, Mapping):
        raise error(f"{where} must be a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise error(f"unknown key {where}.{key}{hint}; valid keys: {', '.join(names)}")
    return dict(data)
