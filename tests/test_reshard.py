"""Resuming a ZeRO checkpoint written by 2 ranks on 1, 2 and 4 ranks (jobs/train/reshard.py), with real DeepSpeed on
the CPU (gloo): tests/reshard_scenario.py trains a tiny FILIP 2 steps at world size 2 and saves; fresh engines load
it at 1, 2 (DeepSpeed's own load) and 4 ranks. Each must hold what the saved run held, bit for bit, and one more
step on the same global batch must land where the saved run's next step did.

The pure layout arithmetic is tested without processes first.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from filipctl.contract import free_port
from jobs.train.reshard import shape_problem, zero3_pieces, zero12_pieces
from tests.reshard_scenario import CASES

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "reshard_scenario.py"
SIZES = (1, 2, 4)  # 2 wrote the checkpoints

pytestmark = pytest.mark.xdist_group("reshard")  # on one pytest worker, so that the module's fixture runs once


# -- the layout arithmetic, no processes ------------------------------------------------------------------
def _gather(params, flats, name: str) -> torch.Tensor:
    """A parameter rebuilt from its pieces in the ranks' flat tensors."""
    param = params[name]
    out = torch.full((math.prod(param.shape),), float("nan"))
    for pc in param.pieces:
        out[pc.start:pc.start + pc.numel] = flats[pc.rank][pc.flat][pc.at:pc.at + pc.numel]
    return out.view(param.shape)


def test_zero12_pieces_rebuild_parameters_across_partitions_and_paddings():
    shapes = [{"a": (3, 2), "b": (5,)}, {"c": (4,)}]
    paddings = [[1, 0], [0]]  # "a" is followed by one alignment element
    world, a, b, c = 3, torch.arange(6.), torch.arange(10., 15.), torch.arange(20., 24.)
    group0 = torch.cat([a, torch.zeros(1), b, torch.zeros(3)])  # 12 elements: 3 partitions of 4, padded at the end
    group1 = torch.cat([c, torch.zeros(2)])  # 6: 3 partitions of 2
    flats = [[group0[4 * r:4 * r + 4], group1[2 * r:2 * r + 2]] for r in range(world)]
    params = zero12_pieces(shapes, [4, 2], paddings, world)
    assert torch.equal(_gather(params, flats, "a"), a.view(3, 2))
    assert torch.equal(_gather(params, flats, "b"), b)
    assert torch.equal(_gather(params, flats, "c"), c)
    assert [(p.rank, p.at, p.numel) for p in params["b"].pieces] == [(1, 3, 1), (2, 0, 4)]


def test_zero3_pieces_rebuild_parameters_cut_per_rank_with_padding():
    shapes = [{"w": (2, 3), "s": (1,)}]
    world, w, s = 4, torch.arange(6.), torch.tensor([7.])
    # Each rank: ceil(6/4) = 2 elements of w (rank 3's padded), then ceil(1/4) = 1 of s (ranks 1-3 padding).
    wp, sp = torch.cat([w, torch.zeros(2)]), torch.cat([s, torch.zeros(3)])
    flats = [[torch.cat([wp[2 * r:2 * r + 2], sp[r:r + 1]])] for r in range(world)]
    params = zero3_pieces(shapes, world)
    assert torch.equal(_gather(params, flats, "w"), w.view(2, 3))
    assert torch.equal(_gather(params, flats, "s"), s)
    assert len(params["w"].pieces) == 3 and len(params["s"].pieces) == 1


def test_shape_problem_names_the_first_difference():
    saved = {"a": (2,), "b": (3, 4), "gone": (1,)}
    assert shape_problem(saved, {"a": (2,), "b": (3, 4), "gone": (1,)}) is None
    assert shape_problem(saved, {"a": (2,), "b": (3, 5), "gone": (1,)}) == \
        "parameter b is [3, 4] in the checkpoint, [3, 5] in the recipe's model"
    assert "new [7] of the recipe's model is not in the checkpoint" in shape_problem(saved, {"new": (7,), **saved})
    assert shape_problem(saved, {"a": (2,), "b": (3, 4)}) == \
        "the checkpoint has a parameter gone [1] that the recipe's model lacks"


# -- real DeepSpeed, 2 -> 1, 2, 4 ranks -------------------------------------------------------------------
def _torchrun(world: int, *args: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(SCENARIO), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, out: Path, what: str, timeout: float = 240) -> None:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    errors = "\n".join(p.read_text() for p in sorted(out.glob("error_*.txt")))
    assert proc.returncode == 0, f"{what} failed:\n{errors or log[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Save at 2 ranks, then load at 1 (and the refusals) and at 4 at once -> the folder of their records."""
    base = tmp_path_factory.mktemp("reshard")
    root, out = base / "checkpoints", base / "out"
    out.mkdir()
    _finish(_torchrun(2, "save", "--root", str(root), "--out", str(out)), out, "saving at 2 ranks")
    one = _torchrun(1, "load", "--root", str(root), "--out", str(out), "--refusals")
    four = _torchrun(4, "load", "--root", str(root), "--out", str(out))
    _finish(one, out, "loading at 1 rank")
    _finish(four, out, "loading at 4 ranks")
    return out


def _records(out: Path, case: str, world: int) -> tuple[dict, dict]:
    return (torch.load(out / f"ref_{case}.pt", weights_only=False),
            torch.load(out / f"w{world}_{case}.pt", weights_only=False))


@pytest.mark.slow
def test_saved_world_and_stage(runs: Path):
    from jobs.train.reshard import saved_world, saved_zero_stage

    root = runs.parent / "checkpoints"
    for case, (stage, _, _) in CASES.items():
        assert saved_world(root / case / "step2") == 2
        assert saved_zero_stage(root / case / "step2") == stage


@pytest.mark.slow
@pytest.mark.parametrize("world", SIZES)
@pytest.mark.parametrize("case", list(CASES))
def test_resume_restores_everything_bitwise(runs: Path, case: str, world: int):
    ref, got = _records(runs, case, world)
    saved, loaded = ref["loaded"], got["loaded"]
    for kind in ("weights", "states"):  # full fp32 master weights; exp_avg, exp_avg_sq of every parameter
        assert saved[kind].keys() == loaded[kind].keys()
        different = [n for n in saved[kind] if not torch.equal(saved[kind][n], loaded[kind][n])]
        assert not different, f"{kind} differ after loading at {world}: {different[:3]}"
    # The param groups' settings (LAMB's step lives there), AdamW's per-tensor step, the schedule, the counters.
    for key in ("groups", "state_steps", "last_epoch", "last_lr", "global_steps", "global_samples", "skipped_steps"):
        assert loaded[key] == saved[key], key
    assert got["client"] == {"step": 2, "marker": "saved by 2"}


@pytest.mark.slow
@pytest.mark.parametrize("world", SIZES)
def test_lamb_step_schedule_and_counters_continue(runs: Path, world: int):
    for case in CASES:
        ref, got = _records(runs, case, world)
        assert got["after_next"] == ref["after_next"], case
        assert got["after_next"]["global_steps"] == got["after_next"]["last_epoch"] == 3
        if "lamb" in case:  # timm's LAMB counts its steps in its param groups
            assert len(got["after_next"]["group_steps"]) == 2
            assert got["after_next"]["group_steps"] > [g["step"] for g in got["loaded"]["groups"]]


def _continues(runs: Path, case: str, world: int) -> None:
    """The step after the resume at `world` matches the saved run's next step: in fp32 to within 1/1000 of the
    step's size (only the order of floating-point sums differs); in bf16, whose gradients are reduced in bf16 and
    so rounded differently at each world size, to within 1e-3 (Adam moves a weight by about the LR, 4.4e-4 here)."""
    ref, got = _records(runs, case, world)
    for name, expected in ref["next"].items():
        difference = (got["next"][name] - expected).abs().max().item()
        step = (expected - ref["loaded"]["weights"][name]).abs().max().item()
        bound = 1e-3 * step + 1e-8 if CASES[case][2] == "fp32" else 1e-3
        assert difference <= bound, f"{name}: {difference:.3g} off the saved run's next step ({step:.3g}) at {world}"


@pytest.mark.slow
@pytest.mark.parametrize("world", SIZES)
@pytest.mark.parametrize("case", ["z0_lamb", "z1_adamw", "z2_adamw", "z3_adamw", "z2_adamw_bf16", "z3_adamw_bf16"])
def test_next_step_lands_where_the_saved_run_did(runs: Path, case: str, world: int):
    _continues(runs, case, world)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["z1_lamb", "z2_lamb", "z3_lamb"])
def test_lamb_next_step_under_zero_does_not_depend_on_world_size(runs: Path, case: str):
    # jobs/train/lamb.py: the trust ratio per parameter across ZeRO's flat partitions (timm's Lamb took it per
    # partition, so its step changed with the world size)
    _continues(runs, case, 1)


@pytest.mark.slow
def test_refusals_are_one_line_each_and_change_nothing(runs: Path):
    # tests/reshard_scenario.py checks that every refused load left the engine's weights as they were.
    lines = json.loads((runs / "refusals_w1.json").read_text())
    assert all(line and "\n" not in line for line in lines.values()), lines
    assert "parameter image_proj.weight is [16, 32] in the checkpoint, [24, 32] in the recipe's model" \
        in lines["other_shape"]
    assert "written with ZeRO stage 1, the recipe trains with stage 2: resume with train.zero_stage=1" \
        in lines["other_stage"]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in lines["missing_file"]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt does not load" in lines["truncated_file"]
