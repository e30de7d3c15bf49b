"""Load a recipe: YAML file -> `extends:` chain -> `--set key.path=value` overrides -> validated Recipe.

Every failure raises RecipeError with one message that names the file, the key path and
what was expected, so the CLI can print it without a traceback.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from filipctl.errors import RecipeError
from filipctl.schema import Recipe, TrainConfig, apply_overrides


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last one would silently win)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen.setdefault(key, key_node.start_mark.line)
        return super().construct_mapping(node, deep)


MAX_EXTENDS = 16  # a longer extends: chain is a mistake, not a design


def _exists(path: Path, what: str) -> bool:
    """path.is_file(), with unreadable or impossible paths (too long, no permission) as one clear error."""
    try:
        if path.is_dir():
            raise RecipeError(f"{path}: is a folder, not a {what} file")
        return path.is_file()
    except OSError as exc:
        raise RecipeError(f"{str(path)[:200]}: cannot read the {what}: {exc.strerror or exc}") from None


def _read_yaml(path: Path, what: str = "recipe") -> dict[str, Any]:
    if not _exists(path, what):
        hint = ""
        try:
            candidates = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        except OSError:
            candidates = []
        if candidates:
            more = f", ... ({len(candidates)} in all)" if len(candidates) > 10 else ""
            hint = f" ({what}s in {path.parent}: {', '.join(candidates[:10])}{more})"
        raise RecipeError(f"{path}: {what} file not found{hint}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                          f"save the {what} as UTF-8 YAML") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}:{where}: not valid YAML: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{path}: the YAML nests too deeply to be a {what}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} is a YAML mapping of keys, got a {type(data).__name__}")
    return data


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve() if _exists(path, "recipe") else path
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise RecipeError(f"{seen[-1]}: extends: cycle {chain}")
    if len(seen) >= MAX_EXTENDS:
        raise RecipeError(f"{seen[0]}: extends: chain longer than {MAX_EXTENDS} recipes")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a recipe path (string), got {parent!r}")
    parent_path = Path(parent)
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    if not _exists(parent_path, "recipe"):
        raise RecipeError(f"{path}: extends: recipe file not found: {parent_path}")
    return _deep_merge(_load_chain(parent_path, (*seen, path)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.steps=20` -> (['train', 'steps'], 20). Values are YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {text!r}: expected KEY.PATH=VALUE, e.g. --set train.steps=20")
    parts = key.split(".")
    if any(not p for p in parts):
        raise RecipeError(f"--set {text!r}: empty component in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _describe_error(err: dict[str, Any]) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        return "unknown key" + _known_keys_hint(loc)
    if kind == "missing":
        return "required key is missing"
    msg = err["msg"]
    if "input" in err and kind not in ("value_error",):
        msg += f", got {err['input']!r}"
    return msg


def _known_keys_hint(loc: tuple[Any, ...]) -> str:
    model: Any = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return ""
        ann = field.annotation
        # Unwrap Optional[Section].
        for arg in getattr(ann, "__args__", ()) or ():
            if hasattr(arg, "model_fields"):
                ann = arg
        model = ann
    if not hasattr(model, "model_fields"):
        return ""
    import difflib

    keys = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys here: {', '.join(keys)}"


BACKEND_NAMES = ("local", "slurm", "ray")


def profile_dirs() -> list[Path]:
    """Where `--cluster NAME` looks for NAME.yaml: ./clusters, then the clusters/ shipped with filipctl."""
    from filipctl.tracking.provenance import SOURCE_ROOT

    dirs = [Path.cwd() / "clusters", SOURCE_ROOT / "clusters"]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def find_cluster_profile(name: str) -> Path | None:
    if name.endswith((".yaml", ".yml")):
        p = Path(name)
        if not _exists(p, "cluster profile"):
            raise RecipeError(f"--cluster {name}: profile file not found")
        return p
    if "/" in name or name.startswith("."):
        raise RecipeError(f"--cluster {name}: a profile name is a file name in clusters/ (or a path ending in .yaml)")
    for d in profile_dirs():
        if _exists(d / f"{name}.yaml", "cluster profile"):
            return d / f"{name}.yaml"
    return None


def _cluster_section(name: str) -> tuple[dict[str, Any], Path | None]:
    profile = find_cluster_profile(name)
    if profile is None:
        if name in BACKEND_NAMES:
            return {"backend": name, "name": name}, None
        known = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})
        raise RecipeError(f"--cluster {name}: no profile {name}.yaml in {', '.join(str(d) for d in profile_dirs())}; "
                          f"profiles: {', '.join(known) or 'none'}; backends: {', '.join(BACKEND_NAMES)}")
    data = _read_yaml(profile, "cluster profile")
    data.setdefault("name", profile.stem)
    return data, profile


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), cluster: str | None = None) -> Recipe:
    """Read, merge, override and validate a recipe. Raises RecipeError with a readable message.

    Order: the recipe's extends: chain, then the cluster profile (into `cluster:`), then --set.
    """
    path = Path(path)
    data = _load_chain(path)
    # The global batch as the recipe implies it, before --set or a profile changes the number of workers.
    data["train"] = TrainConfig.with_global_batch(data.get("train") or {})
    profile: Path | None = None
    if cluster:
        section, profile = _cluster_section(cluster)
        data["cluster"] = _deep_merge(data.get("cluster") or {}, section)
    override_of: dict[tuple[str, ...], str] = {}
    for text in overrides:
        parts, value = parse_override(text)
        try:
            data = apply_overrides(data, {".".join(parts): value})
        except ValueError as exc:  # a key path through a value
            raise RecipeError(f"{path}: --set {text}: {exc}") from None
        override_of[tuple(parts)] = text
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(str(p) for p in err["loc"])
            key = ".".join(loc) or "(top level)"
            origin = ""
            for n in range(len(loc), 0, -1):
                if loc[:n] in override_of:
                    origin = f" (from --set {override_of[loc[:n]]})"
                    break
            else:
                if profile is not None and loc[:1] == ("cluster",):
                    origin = f" (from cluster profile {profile})"
            lines.append(f"  {key}: {_describe_error(err)}{origin}")
        count = "" if len(lines) == 1 else f" ({len(lines)} problems)"
        raise RecipeError(f"{path}: invalid recipe{count}:\n" + "\n".join(lines)) from None


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return recipe.model_dump(mode="json")


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def recipe_fingerprint(recipe: Recipe) -> str:
    """Hash of what determines the trained weights, tagged on every pipeline run (filipctl.fingerprint).

    The recipe values the stages up to pretraining read (`READS` in filipctl/orchestration/stage_keys.py,
    which also decides what is reused): a key that enters those stages' keys enters the fingerprint.
    """
    # Imported here: stage_keys imports this module.
    from filipctl.orchestration.stage_keys import recipe_reads, upstream

    blob = json.dumps(recipe_reads(recipe, upstream(recipe, "pretrain")), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]
