"""What of a recipe may reach MLflow: credentials never do; nested sections become flat parameter names."""

from __future__ import annotations

import json
from typing import Any

# Keys whose values never reach MLflow: anything under env_vars, and keys named like credentials
# (matched on the end of the name, so model.token_keep stays a parameter).
SECRET_SECTIONS = ("env_vars",)
SECRET_SUFFIXES = ("secret", "password", "token", "credentials", "access_key", "secret_key", "api_key")
REDACTED = "<redacted>"


def _is_secret(key: str) -> bool:
    key = key.lower()
    return key in SECRET_SECTIONS or key.endswith(SECRET_SUFFIXES)


def redact(d: Any) -> Any:
    """A copy with every value under a secret-looking key replaced, for params, tags and artifacts."""
    if isinstance(d, dict):
        return {k: REDACTED if _is_secret(str(k)) else redact(v) for k, v in d.items()}
    return d


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) or v is None else str(v)
    return out
