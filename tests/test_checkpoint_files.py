"""The checkpoint store's decisions as pure functions of the folder (jobs/train/checkpoints.py): which checkpoints
retention keeps, when a checkpoint verifies, what a failed save says. One process, real torch files, no DeepSpeed;
tests/test_fault_checkpoints.py runs the store for real under torchrun."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from jobs.train.checkpoint_files import (MANIFEST, CheckpointDamaged, build_manifest, checkpoint_bytes,
                                         checkpoint_problem, file_problem, latest_step, step_folders, steps_to_delete)
from jobs.train.checkpoints import DirectoryCheckpoints
from jobs.train.save_failures import WriteFailure, mount_of, save_failure_message


# -- retention -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps, current, keep, pinned, deleted", [
    ([10, 20, 30, 40], 40, 2, [], [10, 20]),
    ([10, 20, 30, 40], 40, 2, [10], [20]),  # a pinned step survives
    ([10, 20], 20, 3, [], []),  # fewer than keep
    ([10, 20, 30], 30, 1, [], [10, 20]),
    ([10, 20, 30, 40], 20, 2, [], [30, 40]),  # above the current step: passed over on resume as damaged
    ([10, 20, 30], 30, 1, [5, 20], [10]),  # a pin without a checkpoint changes nothing
])
def test_retention_keeps_the_newest_and_the_pinned(steps, current, keep, pinned, deleted) -> None:
    assert steps_to_delete(steps, current, keep, pinned) == deleted


def test_retention_never_deletes_the_checkpoint_just_saved() -> None:
    assert steps_to_delete([10, 20], 20, 0, []) == [10]


# -- verification ----------------------------------------------------------------------------------------
def _checkpoint(folder: Path, step: int, manifest: bool = True) -> Path:
    """A checkpoint folder as the store leaves it: torch zip files, a data position, the manifest."""
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(4096, dtype=torch.float32)}, "step": step},
               folder / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"m": torch.ones(2048)}}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (folder / "data_rank0.json").write_text(json.dumps({"epoch": 0, "position": 12}))
    if manifest:
        (folder / MANIFEST).write_text(json.dumps(build_manifest(folder, step)))
    return folder


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_a_sound_checkpoint_verifies_and_its_manifest_records_every_file(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "step10", 10)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["step"] == 10
    assert manifest["files"] == {p.name: p.stat().st_size for p in folder.iterdir() if p.name != MANIFEST}
    assert checkpoint_problem(folder) is None
    assert checkpoint_bytes(folder) == sum(manifest["files"].values())


def test_a_truncated_file_is_named_with_both_sizes(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "step20", 20)
    model = folder / "mp_rank_00_model_states.pt"
    size = model.stat().st_size
    _truncate(model, 1234)
    assert checkpoint_problem(folder) == f"{model} does not load (truncated: 1234 of {size} bytes)"


def test_a_file_of_the_recorded_size_that_does_not_load_is_named(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "step20", 20)
    optim = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(b"\0" * optim.stat().st_size)  # same size, not a zip any more
    problem = checkpoint_problem(folder)
    assert problem is not None and problem.startswith(f"{optim} does not load (") and "truncated" not in problem


def test_a_missing_file_and_a_bad_data_position_are_named(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "step20", 20)
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint_problem(folder) == f"{folder / 'zero_pp_rank_0_mp_rank_00_optim_states.pt'} is missing " \
                                         "(No such file or directory)"
    other = _checkpoint(tmp_path / "step30", 30, manifest=False)
    (other / "data_rank0.json").write_text('{"epoch": 0, "posi')
    assert checkpoint_problem(other).startswith(f"{other / 'data_rank0.json'} does not load (JSONDecodeError")


def test_a_checkpoint_without_manifest_is_judged_by_loading(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "step10", 10, manifest=False)
    assert checkpoint_problem(folder) is None
    _truncate(folder / "mp_rank_00_model_states.pt", 1000)
    problem = checkpoint_problem(folder)
    assert problem.startswith(f"{folder / 'mp_rank_00_model_states.pt'} does not load (") and "truncated" not in problem
    empty = tmp_path / "step20"
    empty.mkdir()
    assert checkpoint_problem(empty) == f"{empty} holds no checkpoint file"


def test_a_file_that_does_not_load_stops_the_manifest(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "step10.tmp", 10, manifest=False)
    _truncate(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", 500)
    with pytest.raises(CheckpointDamaged, match="zero_pp_rank_0_mp_rank_00_optim_states.pt does not load"):
        build_manifest(folder, 10)


def test_the_newest_checkpoint_that_verifies_is_chosen_and_the_bad_one_named(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        _checkpoint(root / f"step{step}", step)
    (root / "latest").write_text("step30")
    _truncate(root / "step30" / "mp_rank_00_model_states.pt", 100)
    (root / "step20" / MANIFEST).write_text("{not json")
    (root / "step40.tmp").mkdir()  # a save cut short
    store = DirectoryCheckpoints(root)
    store._remove_unfinished()
    assert store._newest_usable() == "step10"
    assert latest_step(root) == 10  # `latest` no longer names a checkpoint that was passed over
    out = capsys.readouterr().out
    bad = root / "step30" / "mp_rank_00_model_states.pt"
    assert f"checkpoint step30 is not used: {bad} does not load (truncated: 100 of " in out
    assert f"checkpoint step20 is not used: {root / 'step20' / MANIFEST} does not load (JSONDecodeError" in out
    assert not (root / "step40.tmp").exists() and sorted(step_folders(root)) == [10, 20, 30]


def test_a_manifestless_checkpoint_that_latest_never_named_is_passed_over(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "checkpoints"
    _checkpoint(root / "step10", 10, manifest=False)
    _checkpoint(root / "step20", 20, manifest=False)  # older code wrote `latest` last: this save did not finish
    (root / "latest").write_text("step10")
    assert latest_step(root) == 10
    assert DirectoryCheckpoints(root)._newest_usable() == "step10"
    assert "checkpoint step20 is not used" in capsys.readouterr().out


def test_no_usable_checkpoint_means_step_0_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "checkpoints"
    assert DirectoryCheckpoints(root)._newest_usable() == ""  # nothing there: nothing to say
    assert capsys.readouterr().out == ""
    _checkpoint(root / "step10", 10)
    _truncate(root / "step10" / "data_rank0.json", 3)
    assert DirectoryCheckpoints(root)._newest_usable() == ""
    assert "warning: no checkpoint in" in capsys.readouterr().out


def test_file_problem_of_a_good_file_is_none(tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(3)}, tmp_path / "x.pt")
    assert file_problem(tmp_path / "x.pt", (tmp_path / "x.pt").stat().st_size) is None
    assert "bytes, 1 recorded" in file_problem(tmp_path / "x.pt", 1)


# -- a failed save ---------------------------------------------------------------------------------------
def _failure(text: str, code: int | None, free: int) -> WriteFailure:
    return WriteFailure(rank=1, text=text, errno=code, free_bytes=free)


def test_a_full_disk_without_errno_is_told_from_the_free_space(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "step20"
    # What torch says when the disk fills: no errno, but no room for a checkpoint either.
    msg = save_failure_message(folder, [_failure("RuntimeError: [enforce fail at inline_container.cc:664] . "
                                                 "PytorchStreamWriter failed writing file data/3: file write failed",
                                                 None, 4096)],
                               85_000_000, True, 40_000_000, "/mnt/ck (tmpfs)")
    assert msg.startswith(f"no space left on /mnt/ck (tmpfs) writing {folder}: needs about 85 MB, 40 MB free")
    assert "PytorchStreamWriter" not in msg and "\n" not in msg


def test_a_full_disk_with_errno_and_an_io_error_are_told_apart(tmp_path: Path) -> None:
    folder = tmp_path / "step20"
    nospace = save_failure_message(folder, [_failure("OSError: [Errno 28] No space left on device", errno.ENOSPC,
                                                     10**12)], 3_000_000, False, 10**9, "/ (ext4 /dev/sda1)")
    assert nospace.startswith(f"no space left on / (ext4 /dev/sda1) writing {folder}: needs more than 3 MB")
    eio = save_failure_message(folder, [_failure("OSError: [Errno 5] Input/output error", errno.EIO, 100)],
                               3_000_000, True, 10**9, "/")
    assert eio.startswith(f"I/O error writing {folder} (rank 1): OSError: [Errno 5] Input/output error")
    other = save_failure_message(folder, [_failure("RuntimeError: basic_ios::clear: iostream error", None, 10**10)],
                                 3_000_000, True, 10**10, "/")
    assert other.startswith("I/O error writing") and "iostream error" in other


def test_errno_is_found_in_the_exception_chain(tmp_path: Path) -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file") from inner
    except RuntimeError as exc:
        failure = WriteFailure.of(exc, 0, tmp_path)
    assert failure.errno == errno.ENOSPC and failure.text.startswith("RuntimeError: PytorchStreamWriter")
    assert failure.free_bytes > 0


def test_mount_of_names_the_file_system(tmp_path: Path) -> None:
    where = mount_of(tmp_path / "not" / "yet")
    assert where.split(" ")[0] in {"/", "/tmp"} or str(tmp_path).startswith(where.split(" ")[0])
    assert mount_of(Path("/proc/self")).startswith("/proc (proc")
