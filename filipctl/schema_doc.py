"""The recipe schema as a flat table of documented keys, for `filipctl recipe keys`."""

from __future__ import annotations

import json
from typing import Any, get_args

from pydantic import BaseModel

from filipctl.schema import Recipe


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return text.removeprefix("<class '").removesuffix("'>")


def schema_rows(model: type[BaseModel] = Recipe, prefix: str = "") -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section_type(field.annotation)
        if section is not None:
            rows.append({"key": key, "type": "section", "default": "", "doc": field.description or section.__doc__ or ""})
            rows.extend(schema_rows(section, key + "."))
            continue
        if field.is_required():
            default = "(required)"
        else:
            value = field.get_default(call_default_factory=True)
            default = json.dumps(value) if not isinstance(value, str) else value
        rows.append({"key": key, "type": _type_name(field.annotation), "default": default,
                     "doc": field.description or ""})
    return rows
