"""Two gloo processes with the autograd all-gather give the single-process full-batch loss and gradients.

Each rank holds half of the batch and calls the loss object (models.loss.FilipLoss), which gathers the
features across ranks and scores its own rows against all gathered columns; it backpropagates and
averages loss and parameter gradients over ranks the way data-parallel training does. The result must
equal one process running the whole batch through the same object, which then has no group to gather from.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.xdist_group("torchrun")  # its tests on one worker, so that `runs` is computed once

WORLD_SIZE = 2
BATCH = 8  # 4 per rank
INTERACTIONS = ("late", "global")
MODEL_SEED = 1234
CAPTIONS = [
    "a dog",
    "a red square on a blue background",
    "two cats sleeping",
    "an old man walking his dog along the beach at sunset with a red kite flying high",
    "sky",
    "a bowl of fruit on a wooden kitchen table",
    "three people riding bicycles down a busy city street in the rain",
    "graffiti",
]
CONTEXT = 16


def _build_model():
    from filipctl.schema import ImageTower, TextTower
    from models.filip import FILIP

    torch.manual_seed(MODEL_SEED)
    return FILIP(embed_dim=16, image=ImageTower(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2),
                 text=TextTower(context_length=CONTEXT, width=32, layers=1, heads=2))


def _loss_and_grads(model, images, ids, interaction: str):
    """Forward this process's slice, loss (gathering when a group exists), backward -> (loss, {name: grad or None})."""
    from models.loss import FilipLoss

    model.zero_grad(set_to_none=True)
    local, scale = model(images, ids)
    loss = FilipLoss(interaction)(local, scale)
    loss.backward()
    grads = {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}
    return loss.detach(), grads


def _worker(rank: int, store: str, images: torch.Tensor, ids: torch.Tensor, out_dir: str) -> None:
    """One rank: its half of the batch, both interactions; rank-averaged loss and gradients to out_dir."""
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(1)
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD_SIZE,
                                timeout=datetime.timedelta(seconds=60))
        b = images.shape[0] // WORLD_SIZE
        mine = slice(rank * b, (rank + 1) * b)
        model = _build_model()
        results = {}
        for interaction in INTERACTIONS:
            loss, grads = _loss_and_grads(model, images[mine], ids[mine], interaction)
            own = loss.clone()
            # Data-parallel averaging: all_reduce(sum) / world size.
            dist.all_reduce(loss)
            avg = {}
            for name, g in grads.items():
                t = torch.zeros_like(dict(model.named_parameters())[name]) if g is None else g
                dist.all_reduce(t)
                avg[name] = t / WORLD_SIZE
            results[interaction] = {
                "loss": loss / WORLD_SIZE,
                "own_loss": own,
                "grads": avg,
                "had_grad": {n: g is not None for n, g in grads.items()},
            }
        from models.gather import global_max

        results["global_max"] = global_max(10 + 5 * rank)  # how the loss sizes its text slots
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (Path(out_dir) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise


def _run_ranks(tmp_path: Path, images: torch.Tensor, ids: torch.Tensor, timeout: float = 120.0) -> None:
    ctx = mp.get_context("spawn")
    store = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_worker, args=(r, store, images, ids, str(tmp_path))) for r in range(WORLD_SIZE)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if all(p.exitcode is not None for p in procs):
                break
            if any(p.exitcode not in (None, 0) for p in procs):
                time.sleep(2.0)  # let the other rank write its traceback too, then stop it
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(10)
    report = []
    for r, p in enumerate(procs):
        err = tmp_path / f"error{r}.txt"
        if p.exitcode != 0 or err.exists():
            why = err.read_text() if err.exists() else "(no traceback: killed or timed out)"
            report.append(f"rank {r} exit code {p.exitcode}:\n{why}")
    if report:
        pytest.fail("distributed worker failed\n" + "\n".join(report), pytrace=False)


# Session scope: a test worker may run other modules' tests between these, which would end a module fixture.
@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """(2-rank results, 1-process reference results), each {interaction: {...}}, computed once."""
    from models.tokenizer import tokenize

    tmp_path = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 32, generator=g)
    ids = tokenize(CAPTIONS, CONTEXT)
    _run_ranks(tmp_path, images, ids)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]

    model = _build_model()
    ref = {}
    for interaction in INTERACTIONS:
        loss, grads = _loss_and_grads(model, images, ids, interaction)
        ref[interaction] = {"loss": loss, "grads": grads}
    return ranks, ref, ids


def test_batch_has_real_padding(runs) -> None:
    """The captions give texts of different lengths, some padded and one cut at the context length."""
    from models.tokenizer import text_mask

    _, _, ids = runs
    lengths = text_mask(ids).sum(-1)
    assert len(set(lengths.tolist())) >= 4
    assert lengths.min() < CONTEXT // 2
    assert lengths.max() == CONTEXT
    # Both halves of the batch hold padded texts, so gathered masks matter on each rank.
    assert (lengths[: BATCH // 2] < CONTEXT).any() and (lengths[BATCH // 2 :] < CONTEXT).any()


@pytest.mark.parametrize("interaction", INTERACTIONS)
def test_two_ranks_equal_full_batch(runs, interaction: str) -> None:
    ranks, ref, _ = runs
    want = ref[interaction]
    for r, res in enumerate(ranks):
        got = res[interaction]
        torch.testing.assert_close(got["loss"], want["loss"], atol=1e-5, rtol=1e-4,
                                   msg=lambda m: f"rank {r} loss: {m}")
        assert set(got["grads"]) == set(want["grads"])
        for name, g_ref in want["grads"].items():
            # A parameter without gradient in the reference has none on any rank either.
            assert got["had_grad"][name] == (g_ref is not None), name
            if g_ref is None:
                continue
            torch.testing.assert_close(got["grads"][name], g_ref, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, name=name: f"rank {r}, {interaction}, grad of {name}: {m}")


@pytest.mark.parametrize("interaction", INTERACTIONS)
def test_comparison_is_not_vacuous(runs, interaction: str) -> None:
    """The gradients compared are substantial, reach both towers and the temperature, and the two
    interactions give different losses and gradients (so each run really used its interaction)."""
    _, ref, _ = runs
    grads = ref[interaction]["grads"]
    for prefix in ("visual.", "text.", "image_proj.", "text_proj.", "logit_scale"):
        tower = [g for n, g in grads.items() if n.startswith(prefix) and g is not None]
        assert tower and max(g.abs().max().item() for g in tower) > 1e-4, prefix
    other = ref["global" if interaction == "late" else "late"]
    assert abs(ref[interaction]["loss"].item() - other["loss"].item()) > 1e-4
    assert not torch.allclose(grads["image_proj.weight"], other["grads"]["image_proj.weight"], atol=1e-5, rtol=1e-4)


def test_ranks_agree_and_halves_differ(runs) -> None:
    """Both ranks end with the same averaged numbers; a rank's own (un-averaged) half-batch loss differs
    from the full-batch loss, so the agreement above is not an accident of the data."""
    ranks, ref, _ = runs
    for interaction in INTERACTIONS:
        a, b = ranks[0][interaction], ranks[1][interaction]
        full = ref[interaction]["loss"]
        assert abs(a["own_loss"].item() - b["own_loss"].item()) > 1e-4
        assert abs(a["own_loss"].item() - full.item()) > 1e-4
        # ... yet the two halves' losses average to it.
        torch.testing.assert_close((a["own_loss"] + b["own_loss"]) / 2, full, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a["loss"], b["loss"], atol=0, rtol=0)
        for name in a["grads"]:
            torch.testing.assert_close(a["grads"][name], b["grads"][name], atol=0, rtol=0)


def test_global_max_reaches_every_rank(runs) -> None:
    ranks, _, _ = runs
    assert [r["global_max"] for r in ranks] == [15, 15]
