"""Recipe loading: schema validation, extends:, --set overrides and the error messages users see."""

from __future__ import annotations

from pathlib import Path

import pytest

from filipctl.errors import RecipeError
from filipctl.recipes import load_recipe, recipe_fingerprint, recipe_to_dict
from filipctl.schema_doc import schema_rows

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path: Path) -> None:
    r = load_recipe(path)
    assert r.name == path.stem


def test_paper_architecture_and_hyperparameters() -> None:
    base = load_recipe(ROOT / "recipes/filip_base.yaml")
    large = load_recipe(ROOT / "recipes/filip_large.yaml")
    assert base.model.embed_dim == large.model.embed_dim == 256
    assert (base.model.image.patch_size, base.model.image.layers, base.model.image.width, base.model.image.heads) == (32, 12, 768, 12)
    assert (base.model.text.layers, base.model.text.width, base.model.text.heads) == (12, 512, 8)
    assert (large.model.image.patch_size, large.model.image.layers, large.model.image.width, large.model.image.heads) == (14, 24, 1024, 16)
    assert (large.model.text.layers, large.model.text.width, large.model.text.heads) == (12, 768, 12)
    assert base.train.global_batch == 8192 and (base.optim.base_lr, base.optim.weight_decay) == (6e-3, 3e-2)
    assert large.train.global_batch == 30720 and (large.optim.base_lr, large.optim.weight_decay) == (8e-4, 3e-3)
    for r in (base, large):
        assert r.optim.name == "lamb" and r.optim.betas == (0.9, 0.999) and r.optim.eps == 1e-4
        assert r.optim.warmup_steps == 3000 and r.model.init_temperature == 0.07
        assert r.model.text.vocab_size == 49408 and r.model.text.context_length == 77


def test_extends_merges_and_child_wins(tmp_path: Path) -> None:
    (tmp_path / "parent.yaml").write_text("name: parent\ntrain: {steps: 7, seed: 3}\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\nname: child\ntrain: {steps: 9}\n")
    r = load_recipe(tmp_path / "child.yaml")
    assert (r.name, r.train.steps, r.train.seed) == ("child", 9, 3)


def test_set_overrides_parse_yaml_values() -> None:
    r = load_recipe(ROOT / "recipes/smoke.yaml",
                    ["train.steps=5", "model.interaction=global", "data.augment=true", "eval.recall_at=[1, 2]"])
    assert (r.train.steps, r.model.interaction, r.data.augment, r.eval.recall_at) == (5, "global", True, [1, 2])


def _error(path: Path, sets: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, sets or [])
    return str(info.value)


def test_unknown_key_names_file_key_and_suggests(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("name: r\ntrain: {stepz: 3}\n")
    msg = _error(p)
    assert str(p) in msg and "train.stepz" in msg and "unknown key" in msg and "'steps'" in msg


def test_wrong_type_names_key_and_expected(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("name: r\ntrain: {steps: many}\n")
    msg = _error(p)
    assert "train.steps" in msg and "integer" in msg and "'many'" in msg


def test_bad_enum_lists_choices(tmp_path: Path) -> None:
    msg = _error(ROOT / "recipes/smoke.yaml", ["model.interaction=sideways"])
    assert "model.interaction" in msg and "'late'" in msg and "'global'" in msg
    assert "--set model.interaction=sideways" in msg


def test_missing_file_and_missing_parent(tmp_path: Path) -> None:
    assert "recipe file not found" in _error(tmp_path / "nope.yaml")
    p = tmp_path / "child.yaml"
    p.write_text("extends: gone.yaml\nname: c\n")
    msg = _error(p)
    assert "extends" in msg and "gone.yaml" in msg


def test_extends_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    assert "cycle" in _error(tmp_path / "a.yaml")


@pytest.mark.parametrize("bad", ["train.steps", "=3", "train..steps=3"])
def test_malformed_set(bad: str) -> None:
    assert "--set" in _error(ROOT / "recipes/smoke.yaml", [bad])


def test_set_through_a_value_is_refused() -> None:
    msg = _error(ROOT / "recipes/smoke.yaml", ["train.steps.x=3"])
    assert "train.steps is a value" in msg


def test_ablation_override_through_a_value_names_the_component(tmp_path: Path) -> None:
    """--set and an ablation's components set key paths with the same function (schema.apply_overrides)."""
    p = tmp_path / "r.yaml"
    p.write_text("name: r\nablation: {components: {deep: {train.steps.x: 3}}}\n")
    msg = _error(p)
    assert "ablation.components.deep: train.steps is a value, not a section" in msg


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("name: r\ntrain: {steps: 3\n")
    assert "not valid YAML" in _error(p)


def test_cross_field_checks(tmp_path: Path) -> None:
    assert "multiple of patch_size" in _error(ROOT / "recipes/smoke.yaml", ["model.image.patch_size=7"])
    assert "does not divide width" in _error(ROOT / "recipes/smoke.yaml", ["model.text.heads=5"])


def test_fingerprint_ignores_tracking_but_not_training() -> None:
    a = load_recipe(ROOT / "recipes/smoke.yaml")
    b = load_recipe(ROOT / "recipes/smoke.yaml", ["tracking.uri=http://x:5000", "eval.batch_size=7"])
    c = load_recipe(ROOT / "recipes/smoke.yaml", ["train.seed=1"])
    assert recipe_fingerprint(a) == recipe_fingerprint(b) != recipe_fingerprint(c)


def test_schema_documents_every_key() -> None:
    rows = schema_rows()
    keys = {r["key"] for r in rows}
    assert {"train.zero_stage", "model.interaction", "data.train.url", "data.eval", "tracking.uri", "eval.prefixes"} <= keys
    undocumented = [r["key"] for r in rows if not r["doc"].strip()]
    assert undocumented == []


def test_redact_hides_credentials_but_keeps_model_switches() -> None:
    from filipctl.tracking import REDACTED, flatten, redact

    recipe = load_recipe(ROOT / "recipes" / "smoke.yaml", [
        "cluster.ray.runtime_env={env_vars: {AWS_SECRET_ACCESS_KEY: s3cr3t, HF_TOKEN: t0k}, pip: [timm]}"])
    params = flatten(redact(recipe_to_dict(recipe)))
    assert params["cluster.ray.runtime_env.env_vars"] == REDACTED
    assert params["cluster.ray.runtime_env.pip"] == '["timm"]'
    assert params["model.token_keep"] == str(recipe.model.token_keep)
    assert not any("s3cr3t" in v or "t0k" in v for v in params.values())
    assert redact({"s3": {"api_key": "k", "endpoint": "http://x"}}) == {"s3": {"api_key": REDACTED, "endpoint": "http://x"}}
