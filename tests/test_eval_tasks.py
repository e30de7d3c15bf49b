"""The pieces of evaluation around the figures: which tasks a set gets, what its metrics are called, which digest
names the weights, and the CLI's torch-free check of a checkpoint (tests/test_eval.py checks the figures)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from filipctl.contract import RunDir, file_sha256, write_result
from filipctl.errors import FilipctlError
from filipctl.orchestration.evaluation import check_weights, checkpoint_shapes, resolve
from filipctl.recipes import load_recipe
from jobs.eval.encoder import Encoder
from jobs.eval.names import metric_name, named
from jobs.eval.sets import EvalSet
from jobs.eval.tasks import FineGrainedRetrieval, LinearProbe, Retrieval, WordPatchPointing, ZeroShot, tasks_for
from jobs.eval.weights import weights_digest
from tests.conftest import ROOT

SMOKE = ROOT / "recipes" / "smoke.yaml"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(SMOKE)


# -- the CLI's check of a checkpoint, without torch ------------------------------------------------------

def test_shapes_of_a_real_state_dict_are_read_without_its_tensors(tmp_path: Path, recipe) -> None:
    from models.filip import build_model

    state = build_model(recipe.model).state_dict()
    torch.save(state, tmp_path / "model.pt")
    shapes = checkpoint_shapes(tmp_path / "model.pt")
    assert list(shapes) == list(state) and all(shapes[k].shape == tuple(v.shape) for k, v in state.items())
    check_weights(tmp_path / "model.pt", recipe)  # the smoke model's projections: accepted
    # Parameters, bfloat16 and a view into a larger storage are read as well.
    odd = {"image_proj.weight": torch.nn.Parameter(torch.zeros(64, 96)),
           "text_proj.weight": torch.zeros(2, 64, 96, dtype=torch.bfloat16)[1]}
    torch.save(odd, tmp_path / "odd.pt")
    check_weights(tmp_path / "odd.pt", recipe)


def test_the_shape_reader_imports_no_torch(tmp_path: Path) -> None:
    torch.save({"image_proj.weight": torch.zeros(64, 96)}, tmp_path / "m.pt")
    probe = ("import sys\nfrom filipctl.orchestration.evaluation import checkpoint_shapes\n"
             f"print(checkpoint_shapes({str(tmp_path / 'm.pt')!r})['image_proj.weight'].shape, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == ["(64,", "96)", "False"], res.stdout + res.stderr


@pytest.mark.parametrize("state, fragment", [
    ({"image_proj.weight": torch.zeros(32, 96), "text_proj.weight": torch.zeros(64, 96)},
     "image_proj.weight is (32, 96), the recipe makes (64, 96)"),
    ({"image_proj.weight": torch.zeros(64, 96), "text_proj.weight": torch.zeros(64, 48)},
     "text_proj.weight is (64, 48), the recipe makes (64, 96)"),
    ({"image_proj.weight": torch.zeros(64, 96)}, "text_proj.weight is missing"),
    ({"model": {"image_proj.weight": torch.zeros(64, 96)}}, "image_proj.weight is missing"),
    ([torch.zeros(64, 96)], "image_proj.weight is missing"),
])
def test_a_state_dict_of_another_model_is_named(tmp_path: Path, recipe, state, fragment: str) -> None:
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(FilipctlError, match="does not hold weights of recipe smoke's model") as err:
        check_weights(tmp_path / "m.pt", recipe)
    assert fragment in str(err.value) and "--recipe RECIPE.yaml" in str(err.value)


def _refused(path: Path, recipe) -> str:
    with pytest.raises(FilipctlError, match="is not a model.pt state dict") as err:
        check_weights(path, recipe)
    assert "\n" not in str(err.value) and "torch.save(model.state_dict())" in str(err.value)
    return str(err.value)


def test_files_that_are_no_zip_checkpoint_are_refused(tmp_path: Path, recipe) -> None:
    (tmp_path / "x.pt").write_bytes(b"x")
    assert "not a zip archive" in _refused(tmp_path / "x.pt", recipe)
    torch.save({"image_proj.weight": torch.zeros(64, 96)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert "legacy format" in _refused(tmp_path / "legacy.pt", recipe)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("a/notes.txt", "hello")
    assert "0 data.pkl" in _refused(tmp_path / "other.zip", recipe)
    with zipfile.ZipFile(tmp_path / "cut.pt", "w") as z:
        z.writestr("m/data.pkl", pickle.dumps({"image_proj.weight": 1})[:-3])
    assert "UnpicklingError" in _refused(tmp_path / "cut.pt", recipe)


class _Payload:
    """Pickles as a call of os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_naming_another_global_is_refused_unrun(tmp_path: Path, recipe) -> None:
    marker = tmp_path / "ran"
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"image_proj.weight": _Payload(marker)}, protocol=2))
    assert f"it names {os.system.__module__}.system" in _refused(tmp_path / "evil.pt", recipe)
    assert not marker.exists()
    torch.save(torch.nn.Linear(96, 64), tmp_path / "module.pt")  # a whole module, not its state dict
    assert "torch.nn.modules.linear.Linear" in _refused(tmp_path / "module.pt", recipe)


def test_the_cli_checks_weights_without_importing_torch(tmp_path: Path) -> None:
    from tests.benchmark_sets import retrieval_set

    retrieval_set(tmp_path / "wds", 2, per_shard=4)
    torch.save({"image_proj.weight": torch.zeros(8, 96), "text_proj.weight": torch.zeros(8, 96)}, tmp_path / "m.pt")
    argv = ["filipctl", "eval", str(tmp_path / "m.pt"), "--recipe", str(SMOKE), "-d", str(tmp_path / "wds"),
            "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"]
    probe = ("import sys\n"
             f"sys.argv = {argv!r}\n"
             "from filipctl.cli.app import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
             "print('TORCH', 'torch' in sys.modules, 'CODE', code)\n")
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert "TORCH False CODE 1" in res.stdout, res.stdout + res.stderr
    assert "image_proj.weight is (8, 96)" in res.stderr


# -- which digest names the weights ---------------------------------------------------------------------

def _pretrain_folder(root: Path, digest: str | None) -> RunDir:
    rd = RunDir(root)
    rd.root.mkdir(parents=True)
    rd.model.write_bytes(b"weights")
    if digest is not None:
        write_result(rd, {"loss": 1.0}, digests={"model.pt": digest})
    return rd


def test_the_weights_are_hashed_only_when_nobody_did(tmp_path: Path) -> None:
    recorded, given = "a" * 64, "b" * 64
    pre = _pretrain_folder(tmp_path / "pretrain", recorded)
    stage = RunDir(tmp_path / "eval")
    stage.root.mkdir()
    stage.inputs_file.write_text(json.dumps({"pretrain": str(pre.root)}))
    assert weights_digest(stage, pre.model) == recorded  # the pretrain stage's result.json
    stage.inputs_file.write_text(json.dumps({"pretrain": str(pre.model), "digests": {"pretrain": given}}))
    assert weights_digest(stage, pre.model) == given  # what the CLI took of a model.pt given to filipctl eval
    stage.inputs_file.write_text(json.dumps({"pretrain": str(pre.model)}))
    assert weights_digest(stage, pre.model) == file_sha256(pre.model)  # nobody did: hashed here
    bare = _pretrain_folder(tmp_path / "unfinished", None)
    stage.inputs_file.write_text(json.dumps({"pretrain": str(bare.root)}))
    assert weights_digest(stage, bare.model) == file_sha256(bare.model)
    stage.inputs_file.write_text(json.dumps({"pretrain": str(pre.root), "digests": {"pretrain": "not a digest"}}))
    assert weights_digest(stage, pre.model) == file_sha256(pre.model)


def test_the_cli_takes_the_digest_a_pretrain_stage_recorded(tmp_path: Path) -> None:
    pre = _pretrain_folder(tmp_path / "pretrain", "c" * 64)
    assert resolve(str(pre.root), None, "filip", 1.0).digest == "c" * 64
    assert resolve(str(pre.model), None, "filip", 1.0).digest == "c" * 64
    (tmp_path / "elsewhere.pt").write_bytes(b"weights")
    assert resolve(str(tmp_path / "elsewhere.pt"), None, "filip", 1.0).digest is None  # hashed once, by run_eval
    assert resolve(str(_pretrain_folder(tmp_path / "old", None).root), None, "filip", 1.0).digest is None


def test_the_eval_stage_key_names_the_weights_by_their_full_sha256(tmp_path: Path, monkeypatch) -> None:
    from rich.console import Console

    from filipctl.orchestration import evaluation, graph
    from tests.benchmark_sets import retrieval_set

    retrieval_set(tmp_path / "wds", 2, per_shard=4)
    recipe = load_recipe(SMOKE)
    torch.save({"image_proj.weight": torch.zeros(64, 96), "text_proj.weight": torch.zeros(64, 96)}, tmp_path / "m.pt")
    seen: list[dict] = []

    class Stop(Exception):
        pass

    def capture(stage, recipe, inputs, output_root, code=None):
        seen.append(inputs)
        raise Stop

    monkeypatch.setattr(graph, "external_graph", capture)
    source = resolve(str(tmp_path / "m.pt"), None, "filip", 1.0)
    r = evaluation.eval_recipe(source, str(SMOKE), [f"output_dir={tmp_path}/runs"], [str(tmp_path / "wds")], False)
    with pytest.raises(Stop):
        evaluation.run_eval(source, r, Console(quiet=True))
    assert seen[-1]["pretrain"] == (str((tmp_path / "m.pt").resolve()), f"sha256:{file_sha256(tmp_path / 'm.pt')}")
    source.digest = "d" * 64  # recorded by a pretrain stage: not hashed again
    monkeypatch.setattr(evaluation, "file_sha256", lambda path: pytest.fail("hashed twice"))
    with pytest.raises(Stop):
        evaluation.run_eval(source, r, Console(quiet=True))
    assert seen[-1]["pretrain"][1] == "sha256:" + "d" * 64


# -- metric names and task choice -----------------------------------------------------------------------

def test_metric_names_are_computed_for_any_k() -> None:
    assert metric_name("held_out", "text_retrieval_recall@1") == "i2t_R1"
    assert metric_name("held_out", "image_retrieval_recall@1500") == "t2i_R1500"
    # the count with ties as hits (jobs/eval/scoring.py) ends in R<k> too, so the tables give it a chance level
    assert metric_name("held_out", "text_retrieval_recall_ties_as_hits@5") == "i2t_ties_as_hits_R5"
    assert metric_name("cifar", "image_retrieval_recall_ties_as_hits@1") == "cifar.image_retrieval_recall_ties_as_hits_at_1"
    from filipctl.reports.eval_tables import tables

    rows = tables({"i2t_R5": 0.2, "i2t_ties_as_hits_R5": 0.3, "chance_R1": 0.01})[0].columns[2].cells
    assert list(rows) == ["0.050", "0.050"]  # chance of R@5 beside both
    assert metric_name("held_out", "acc1") == "zeroshot_top1" and metric_name("held_out", "images") == "eval_pairs"
    assert metric_name("held_out", "finegrained_sT_images") == "finegrained_sT_images"
    assert metric_name("cifar", "text_retrieval_recall@5") == "cifar.text_retrieval_recall_at_5"
    assert metric_name("cifar", "images") == "cifar.images"
    assert named("held_out", {"acc1": 0.5, "acc5": None, "chance_zeroshot_top1": 0.1}) == {
        "zeroshot_top1": 0.5, "chance_zeroshot_top1": 0.1}


def test_a_set_gets_the_tasks_its_contents_allow(tmp_path: Path, recipe) -> None:
    enc = Encoder(None, 32, 8)  # type: ignore[arg-type]  # choosing tasks encodes nothing

    def kinds(ds: EvalSet) -> list[type]:
        return [type(t) for t in tasks_for(ds, enc, recipe, tmp_path)]

    assert kinds(EvalSet("flickr", "u", "retrieval", {"test": []}, captions=True)) == [Retrieval]
    assert kinds(EvalSet("cifar", "u", "classification", {"test": [], "train": []}, classnames=["a", "b"],
                         linear_probe=True)) == [ZeroShot, LinearProbe]
    assert kinds(EvalSet("held_out", "u", "classification", {"test": []}, classnames=["a"], captions=True,
                         objects=True)) == [Retrieval, ZeroShot, FineGrainedRetrieval, WordPatchPointing]
    assert kinds(EvalSet("held_out", "u", "classification", {"test": []}, captions=True, objects=True)) == [
        Retrieval, FineGrainedRetrieval, WordPatchPointing]  # no classnames.txt: no zero-shot
