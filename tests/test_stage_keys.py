"""Stage keys cover the code a worker runs and the recipe values a stage reads, and nothing else.

The code tests edit a copy of the repository's source (filipctl/, jobs/, models/) under tmp_path
and compute the keys against that copy, so the real tree is never touched. Each copy is a new
root, so the per-process caches of stage_keys.py never answer for an edited file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from filipctl.errors import FilipctlError
from filipctl.orchestration.stage_keys import (JOB_MODULES, READS, UNREAD, code_digest, stage_key, worker_modules,
                                               WORKER_RUNNERS)
from filipctl.orchestration.stages import plan
from filipctl.recipes import load_recipe, recipe_fingerprint
from filipctl.schema import Recipe
from filipctl.schema_doc import schema_rows

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ("filipctl", "jobs", "models")


def copy_source(dest: Path) -> Path:
    for folder in SOURCE:
        shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def edited_copy(tmp_path: Path, rel: str, line: str = "\n# an edit\n") -> Path:
    root = copy_source(tmp_path / "edited")
    with open(root / rel, "a") as f:
        f.write(line)
    return root


def keys(recipe: Recipe, root: Path, code: str | None = None) -> dict[str, str]:
    """Every stage's key, each reading from the ones before it as build_graph chains them."""
    out: dict[str, str] = {}
    for stage in plan(recipe):
        deps = {d: out[d] for d in stage.after}
        if stage.name == "eval":
            deps = {"data": out["data"], **deps}
        out[stage.name] = stage_key(stage, recipe, deps, code, root)
    return out


@pytest.fixture(scope="module")
def smoke() -> Recipe:
    return load_recipe(ROOT / "recipes/smoke.yaml")


@pytest.fixture
def original(tmp_path: Path) -> Path:
    return copy_source(tmp_path / "original")


def test_a_copy_has_the_same_keys_as_the_repository(smoke: Recipe, original: Path) -> None:
    """Paths are hashed relative to the root: the keys do not depend on where the checkout lies."""
    assert keys(smoke, original) == keys(smoke, ROOT) and code_digest(original) == code_digest(ROOT)


def test_editing_the_contract_changes_the_pretrain_key(smoke: Recipe, original: Path, tmp_path: Path) -> None:
    """filipctl/contract.py is outside jobs/ and models/ but every worker imports it (job_main, RunDir)."""
    before, after = keys(smoke, original), keys(smoke, edited_copy(tmp_path, "filipctl/contract.py"))
    assert after["pretrain"] != before["pretrain"]
    assert after["data"] != before["data"] and after["eval"] != before["eval"]
    assert code_digest(tmp_path / "edited") != code_digest(original)


def test_editing_the_schema_changes_every_key(smoke: Recipe, original: Path, tmp_path: Path) -> None:
    before, after = keys(smoke, original), keys(smoke, edited_copy(tmp_path, "filipctl/schema.py"))
    assert all(after[stage] != before[stage] for stage in before)


def test_editing_eval_code_changes_the_eval_key_only(smoke: Recipe, original: Path, tmp_path: Path) -> None:
    before, after = keys(smoke, original), keys(smoke, edited_copy(tmp_path, "jobs/eval/linear_probe.py"))
    assert after["eval"] != before["eval"]
    assert after["pretrain"] == before["pretrain"] and after["data"] == before["data"]


def test_editing_training_code_keeps_the_data_key(smoke: Recipe, original: Path, tmp_path: Path) -> None:
    """The eval key changes too, through the pretrain key it reads from."""
    before, after = keys(smoke, original), keys(smoke, edited_copy(tmp_path, "models/loss.py"))
    assert after["data"] == before["data"]
    assert after["pretrain"] != before["pretrain"] and after["eval"] != before["eval"]


def test_editing_code_no_worker_imports_changes_no_key(smoke: Recipe, original: Path, tmp_path: Path) -> None:
    before, after = keys(smoke, original), keys(smoke, edited_copy(tmp_path, "filipctl/cli/app.py"))
    assert after == before and code_digest(tmp_path / "edited") == code_digest(original)


def test_a_missing_local_module_is_an_error(smoke: Recipe, tmp_path: Path) -> None:
    """An import the walk cannot find would be code the key misses: refused, not skipped."""
    root = edited_copy(tmp_path, "jobs/eval/scoring.py", "\n\ndef later():\n    from jobs.eval import gone\n"
                       "    import filipctl.nowhere\n")
    with pytest.raises(FilipctlError, match=r"filipctl\.nowhere.*jobs/eval/scoring\.py"):
        keys(smoke, root)


def test_the_walk_follows_every_kind_of_import(tmp_path: Path) -> None:
    """Imports inside functions, `from pkg import submodule`, relative imports, package __init__ files;
    third-party modules and names that are not submodules are left out."""
    files = {
        "jobs/a/__init__.py": "",
        "jobs/a/main.py": "import numpy\nfrom jobs.b import sub, NAME\n\ndef run():\n    from . import helper\n"
                          "    from .. import c\n",
        "jobs/a/helper.py": "from models.m import x\n",
        "jobs/b/__init__.py": "NAME = 1\n",
        "jobs/b/sub.py": "",
        "jobs/c.py": "",
        "models/__init__.py": "",
        "models/m.py": "import torch\n",
        "models/unused.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = worker_modules(("jobs.a.main",), tmp_path)
    assert found == tuple(sorted(set(files) - {"models/unused.py"}))


def test_the_repository_workers_import_the_contract_and_schema_but_not_the_cli() -> None:
    for module in JOB_MODULES:
        found = worker_modules((module, *WORKER_RUNNERS), ROOT)
        assert {"filipctl/contract.py", "filipctl/schema.py", "filipctl/__init__.py"} <= set(found)
        assert not any(f.startswith("filipctl/cli/") for f in found)


def test_job_modules_are_the_stages_modules(smoke: Recipe) -> None:
    assert {stage.module for stage in plan(smoke)} == set(JOB_MODULES)


def test_every_recipe_key_is_read_by_a_stage_or_named_unread() -> None:
    """A new recipe key is in the stage keys and the fingerprint, or declared to change no result."""
    read = {path for paths in READS.values() for path in paths}
    covers = read | set(UNREAD)
    leaves = [row["key"] for row in schema_rows(Recipe) if row["type"] != "section"]
    uncovered = [k for k in leaves if not any(k == p or k.startswith(p + ".") for p in covers)]
    assert uncovered == []
    # An unread path may sit below a read section (train.keep_checkpoints), never above or equal to a read one.
    assert not any(r == u or r.startswith(u + ".") for r in read for u in UNREAD)


@pytest.mark.parametrize("override", ["tracking.uri=http://x:5000", "eval.batch_size=7", "name=other",
                                      "output_dir=elsewhere", "description=words", "cluster.name=c",
                                      "train.seed=1", "data.shuffle_buffer=7", "optim.warmup_steps=2",
                                      "data.synthetic.train_samples=300",
                                      "train.keep_checkpoints=5", "train.max_restarts=0",
                                      "train.collective_timeout_s=30"])
def test_the_fingerprint_changes_exactly_when_the_pretrain_key_does(smoke: Recipe, override: str) -> None:
    """One definition of what determines the trained weights: the fingerprint and the keys agree."""
    other = load_recipe(ROOT / "recipes/smoke.yaml", [override])
    key_changed = keys(smoke, ROOT, code="c")["pretrain"] != keys(other, ROOT, code="c")["pretrain"]
    assert (recipe_fingerprint(smoke) != recipe_fingerprint(other)) == key_changed
