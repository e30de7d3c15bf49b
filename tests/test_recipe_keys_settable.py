"""`filipctl recipe keys` and `--set` agree: every key the schema lists can be set, and resolves to what was set.

The table below gives each listed key a valid value other than the smoke recipe's own, so a `--set` that was
dropped or landed elsewhere fails; a key added to the schema without a row here fails the coverage test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from filipctl.recipes import load_recipe, recipe_to_dict
from filipctl.schema_doc import schema_rows
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes/smoke.yaml"
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))

_FILTER = ["data.filter.output=data/filtered"]
_DATASET = ["eval.datasets.url=data/wds_digits"]

# key -> (value to --set, --set lines it needs first). Sections get a mapping; the resolved section must hold it.
VALUES: dict[str, tuple[Any, list[str]]] = {
    "name": ("renamed", []),
    "description": ("another description", []),
    "output_dir": ("runs-elsewhere", []),
    "model": ({"embed_dim": 32, "interaction": "global"}, []),
    "model.embed_dim": (32, []),
    "model.interaction": ("global", []),
    "model.init_temperature": (0.05, []),
    "model.late_image_cls": (False, []),
    "model.late_text_bos": (False, []),
    "model.token_keep": (0.25, []),
    "model.gather_dtype": ("fp16", []),
    "model.similarity_memory_mb": (64.0, []),
    "model.image": ({"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 4, "mlp_ratio": 2.0}, []),
    "model.image.image_size": (128, []),
    "model.image.patch_size": (16, []),
    "model.image.width": (128, []),
    "model.image.layers": (2, []),
    "model.image.heads": (8, []),
    "model.image.mlp_ratio": (3.0, []),
    "model.text": ({"context_length": 16, "width": 64, "layers": 2, "heads": 4}, []),
    "model.text.context_length": (40, []),
    "model.text.vocab_size": (49408, []),  # the one value the tokenizer allows
    "model.text.width": (128, []),
    "model.text.layers": (2, []),
    "model.text.heads": (8, []),
    "data": ({"train": "data/other/train", "eval": None, "synthetic": None}, []),
    "data.train": ([{"url": "data/a/train", "weight": 2.0}, {"url": "data/b/train", "weight": 1.0}],
                   ["data.synthetic=null"]),
    "data.train.url": ("data/other/train", []),
    "data.train.weight": (2.0, []),
    "data.eval": ("data/other/eval", []),
    "data.synthetic": ({"train_samples": 100, "seed": 4}, []),
    "data.synthetic.train_samples": (100, []),
    "data.synthetic.eval_samples": (50, []),
    "data.synthetic.samples_per_shard": (25, []),
    "data.synthetic.image_size": (32, []),
    "data.synthetic.max_objects": (3, []),
    "data.synthetic.seed": (4, []),
    "data.filter": ({"output": "data/filtered", "min_side": 10}, []),
    "data.filter.output": ("data/filtered", []),
    "data.filter.min_side": (10, _FILTER),
    "data.filter.max_aspect": (2.0, _FILTER),
    "data.filter.language": (None, _FILTER),
    "data.filter.language_min_confidence": (0.9, _FILTER),
    "data.filter.max_repeats": (3, _FILTER),
    "data.filter.meaningless": (False, _FILTER),
    "data.filter.samples_per_shard": (100, _FILTER),
    "data.augment": (True, []),
    "data.text_augment": (True, []),
    "data.shuffle_buffer": (10, []),
    "data.loader_workers": (1, []),
    "data.max_bad_fraction": (0.5, []),
    "optim": ({"name": "adamw", "warmup_steps": 5}, []),
    "optim.name": ("adamw", []),
    "optim.base_lr": (1e-3, []),
    "optim.weight_decay": (0.1, []),
    "optim.betas": ([0.8, 0.99], []),
    "optim.eps": (1e-6, []),
    "optim.warmup_steps": (5, []),
    "optim.min_lr_ratio": (0.1, []),
    "optim.grad_clip": (1.0, []),
    "train": ({"steps": 5, "global_batch": 64, "micro_batch_size": 32, "workers": 2}, []),
    "train.zero_stage": (3, []),
    "train.precision": ("bf16", []),
    "train.gradient_checkpointing": (True, []),
    "train.steps": (7, []),
    "train.global_batch": (128, []),
    "train.micro_batch_size": (16, []),
    "train.workers": (4, []),
    "train.checkpoint_every": (10, []),
    "train.log_every": (5, []),
    "train.seed": (3, []),
    "train.keep_checkpoints": (1, []),
    "train.keep_checkpoint_steps": ([100], []),
    "train.max_restarts": (0, []),
    "train.collective_timeout_s": (30.0, []),
    "eval": ({"batch_size": 50, "held_out": False}, []),
    "eval.enabled": (False, []),
    "eval.held_out": (False, []),
    "eval.datasets": ([{"url": "data/wds_digits", "name": "digits", "split": "test", "linear_probe": False}], []),
    "eval.datasets.url": ("data/wds_digits", []),
    "eval.datasets.name": ("digits", _DATASET),
    "eval.datasets.split": ("val", _DATASET),
    "eval.datasets.linear_probe": (False, _DATASET),
    "eval.batch_size": (50, []),
    "eval.prefixes": (["a photo of"], []),
    "eval.suffixes": (["."], []),
    "eval.recall_at": ([1, 2], []),
    "eval.probe_features": ("pooled", []),
    "eval.probe_val_fraction": (0.3, []),
    "eval.alignment_images": (0, []),
    "eval.seed": (2, []),
    "tracking": ({"experiment": "other"}, []),
    "tracking.uri": ("sqlite:///elsewhere/mlflow.db", []),
    "tracking.experiment": ("other", []),
    "tracking.timeout_s": (2.0, []),
    "tracking.drain_s": (5.0, []),
    "tracking.system_metrics_interval_s": (0.0, []),
    "cluster": ({"backend": "local", "name": "mine"}, []),
    "cluster.backend": ("ray", []),
    "cluster.name": ("mine", []),
    "cluster.shared_dirs": (["/shared"], []),
    "cluster.local": ({"max_parallel": 1}, []),
    "cluster.local.max_parallel": (1, []),
    "cluster.slurm": ({"partition": "debug"}, []),
    "cluster.slurm.max_parallel": (2, []),
    "cluster.slurm.partition": ("debug", []),
    "cluster.slurm.account": ("acct", []),
    "cluster.slurm.qos": ("low", []),
    "cluster.slurm.time_min": (30, []),
    "cluster.slurm.nodes": ("1-2", []),
    "cluster.slurm.tasks_per_node": (2, []),
    "cluster.slurm.gpus_per_node": (1, []),
    "cluster.slurm.cpus_per_task": (2, []),
    "cluster.slurm.mem_gb": (8.0, []),
    "cluster.slurm.constraint": ("avx2", []),
    "cluster.slurm.sbatch": ({"exclusive": True}, []),
    "cluster.slurm.setup": (["module load x"], []),
    "cluster.slurm.signal_delay_s": (60, []),
    "cluster.slurm.max_requeues": (1, []),
    "cluster.ray": ({"address": "auto"}, []),
    "cluster.ray.max_parallel": (2, []),
    "cluster.ray.address": ("auto", []),
    "cluster.ray.workers": ("1-2", []),
    "cluster.ray.resources_per_worker": ({"CPU": 2.0}, []),
    "cluster.ray.use_gpu": (True, []),
    "cluster.ray.placement_strategy": ("SPREAD", []),
    "cluster.ray.storage_path": ("runs/ray2", []),
    "cluster.ray.max_failures": (0, []),
    "cluster.ray.num_cpus": (2, []),
    "cluster.ray.runtime_env": ({"pip": ["six"]}, []),
    "cluster.ray.connect_timeout_s": (5.0, []),
    "cluster.ray.resize_interval_s": (10.0, []),
    "ablation": ({"components": {"aug": {"data.augment": True}}}, []),
    "ablation.baseline": ({"model.interaction": "global"}, []),
    "ablation.components": ({"aug": {"data.augment": True}}, []),
}

LISTED = [row["key"] for row in schema_rows()]


def _resolved_at(resolved: dict[str, Any], key: str) -> Any:
    """The value at a listed key of the resolved recipe; a list of sections (data.train) is read at its one entry."""
    node: Any = resolved
    for part in key.split("."):
        if isinstance(node, list):
            assert len(node) == 1, f"{key}: {node}"
            node = node[0]
        node = node[part]
    return node


def test_every_listed_key_has_a_value_here() -> None:
    assert sorted(VALUES) == sorted(LISTED), "add a row to VALUES for each new schema key (and drop removed ones)"


@pytest.mark.parametrize("key", LISTED)
def test_every_listed_key_is_settable(key: str) -> None:
    value, needs = VALUES[key]
    recipe = load_recipe(SMOKE, [*needs, f"{key}={json.dumps(value)}"])
    got = _resolved_at(recipe_to_dict(recipe), key)
    if isinstance(value, dict) and key not in ("cluster.slurm.sbatch", "cluster.ray.resources_per_worker",
                                               "cluster.ray.runtime_env", "ablation.baseline", "ablation.components"):
        got = {k: got[k] for k in value}  # a section: what was set, beside the defaults of the rest
        if key == "data":
            got["train"] = got["train"][0]["url"]
    assert got == value


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_plain_source_url_becomes_its_url_field(path: Path) -> None:
    """Every shipped recipe writes data.train as a plain URL; its `url` field is set like any other key."""
    before = load_recipe(path).data.train
    assert len(before) == 1
    after = load_recipe(path, ["data.train.url=s3://bucket/cc3m/{00000..00003}.tar", "data.synthetic=null"]).data.train
    assert [(s.url, s.weight) for s in after] == [("s3://bucket/cc3m/{00000..00003}.tar", before[0].weight)]


def test_a_key_inside_several_sources_is_refused_with_the_fix() -> None:
    from filipctl.errors import RecipeError

    with pytest.raises(RecipeError, match=r"data.train lists 2 entries.*set the whole list"):
        load_recipe(SMOKE, ["data.synthetic=null", "data.train=[a, b]", "data.train.url=c"])


def test_set_train_url_is_what_the_data_stage_reads(tmp_path: Path) -> None:
    """`--set data.train.url=URL` on a recipe whose data.train is a plain URL: `recipe show` prints the mapping with
    that url, and the data stage indexes exactly the shards at URL (one shard the generator writes there)."""
    from filipctl.contract import RunDir
    from jobs.data import prepare

    from filipctl.schema import SyntheticData
    from jobs.data.synthetic import generate

    shards = tmp_path / "elsewhere"  # one small shard of the generator's, in img2dataset's layout
    generate(str(shards), str(tmp_path / "unused-eval"),
             SyntheticData(train_samples=50, eval_samples=5, samples_per_shard=50, image_size=32, max_objects=1))
    (written,) = sorted(p.name for p in shards.glob("*.tar"))
    url = f"file://{shards}"
    sets = [f"data.train.url={url}", "data.synthetic=null", "data.eval=null"]

    shown = run_cli("recipe", "show", str(SMOKE), "--json", *(a for s in sets for a in ("--set", s)), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["data"]["train"] == [{"url": url, "weight": 1.0}]

    run_dir = RunDir(tmp_path / "stage")
    run_dir.root.mkdir()
    index = prepare.run(load_recipe(SMOKE, sets), run_dir)
    assert [s["url"] for s in index["train"]] == [url]
    assert [Path(s.removeprefix("file://")).name for s in index["train"][0]["shards"]] == [written]
    assert sum(index["train"][0]["counts"]) == 50
