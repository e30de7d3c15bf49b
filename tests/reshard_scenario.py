"""One world size of tests/test_reshard.py, run by `python -m torch.distributed.run --nproc_per_node W`.

    save (W=2): per case, a tiny FILIP engine trains STEPS optimizer steps on fixed global batches and saves
        ROOT/<case>/step<STEPS>; rank 0 writes what it holds then (ref_<case>.pt: full fp32 weights, full optimizer
        states, the counters) and its weights after one more step on the next global batch. A fresh engine then
        loads the checkpoint the normal way (same size) and does the same (w2_<case>.pt).
    load (any W): per case, a fresh engine loads the checkpoint with load_resharded and does the same
        (w<W>_<case>.pt); with --refusals also the refused loads (refusals.json).

Every rank holds rows [r*G/W, (r+1)*G/W) of each global batch of G pairs, so the data of a step is the same at
every size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch

G = 4  # pairs per global batch
STEPS = 2  # optimizer steps before the checkpoint
CASES = {  # name: (ZeRO stage, optimizer, precision)
    "z0_lamb": (0, "lamb", "fp32"),
    "z1_lamb": (1, "lamb", "fp32"), "z2_lamb": (2, "lamb", "fp32"), "z3_lamb": (3, "lamb", "fp32"),
    "z1_adamw": (1, "adamw", "fp32"), "z2_adamw": (2, "adamw", "fp32"), "z3_adamw": (3, "adamw", "fp32"),
    "z2_adamw_bf16": (2, "adamw", "bf16"), "z3_adamw_bf16": (3, "adamw", "bf16"),
}


def model_config(embed_dim: int = 16):
    from filipctl.schema import ModelConfig

    return ModelConfig(embed_dim=embed_dim,
                       image=dict(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2),
                       text=dict(context_length=16, width=32, layers=1, heads=2))


def build(stage: int, optimizer: str, precision: str, world: int, embed_dim: int = 16):
    """The engine as jobs/train/pretrain.build_engine makes it, at a fixed global batch."""
    import deepspeed

    from filipctl.schema import OptimConfig
    from jobs.train.lamb import attach_layout
    from jobs.train.optim import build_optimizer, build_scheduler
    from models.filip import build_model

    torch.manual_seed(0)
    model = build_model(model_config(embed_dim))
    optim = OptimConfig(name=optimizer, base_lr=5e-3, warmup_steps=2)
    opt = build_optimizer(model, optim, G)
    scheduler = build_scheduler(opt, optim, 10)
    config = {"train_micro_batch_size_per_gpu": G // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision == "bf16"},
              "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=scheduler, config=config)
    attach_layout(engine)  # LAMB's trust ratio per parameter across the partitions, as pretraining has it
    return engine


def step(engine, t: int, rank: int, world: int) -> None:
    """One optimizer step on global batch t (this rank's rows of it)."""
    from models.loss import FilipLoss

    g = torch.Generator().manual_seed(100 + t)
    images, ids = torch.randn(G, 3, 32, 32, generator=g), torch.randint(1, 49000, (G, 16), generator=g)
    mine = slice(rank * G // world, (rank + 1) * G // world)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    features, scale = engine(images[mine].to(dtype), ids[mine])
    engine.backward(FilipLoss("late")(features, scale))
    engine.step()


def weights(engine) -> dict[str, torch.Tensor]:
    """Full fp32 master weights (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p.detach() if full is None else full).float().clone()
    return out


def snapshot(engine) -> dict:
    """Everything a resume must restore, in full (collectives: every rank calls it)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from jobs.train.reshard import link_optimizer_state

    opt = engine.optimizer
    link_optimizer_state(opt)
    base = getattr(opt, "optimizer", opt)  # the client optimizer (LAMB / AdamW)
    keys = ("exp_avg", "exp_avg_sq")
    states = {}
    for name, p in engine.module.named_parameters():
        for key in keys:
            full = safe_get_full_optimizer_state(p, key)
            states[f"{name}/{key}"] = (base.state[p][key] if full is None else full).float().clone()
    steps = sorted({float(s["step"]) for s in base.state.values() if "step" in s})  # AdamW: per tensor
    groups = [{k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items() if k != "params"}
              for g in base.param_groups]
    return {"weights": weights(engine), "states": states, "state_steps": steps, "groups": groups,
            "last_epoch": engine.lr_scheduler.last_epoch, "last_lr": engine.lr_scheduler.get_last_lr(),
            "global_steps": engine.global_steps, "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps}


def counters(engine) -> dict:
    """What counts optimizer steps: the engine, the schedule, LAMB's param groups."""
    groups = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups
    return {"global_steps": engine.global_steps, "last_epoch": engine.lr_scheduler.last_epoch,
            "group_steps": [float(g["step"]) for g in groups if "step" in g]}


def resume_and_step(engine, root: Path, case: str, rank: int, world: int, out: Path, name: str) -> None:
    from jobs.train.reshard import load_resharded

    client = load_resharded(engine, root / case, f"step{STEPS}")
    loaded = snapshot(engine)
    step(engine, STEPS, rank, world)
    record = {"loaded": loaded, "next": weights(engine), "client": {k: client.get(k) for k in ("step", "marker")},
              "after_next": counters(engine)}
    if rank == 0:
        torch.save(record, out / f"{name}_{case}.pt")


def save_run(root: Path, out: Path, cases: list[str], rank: int, world: int) -> None:
    for case in cases:
        engine = build(*CASES[case], world)
        for t in range(STEPS):
            step(engine, t, rank, world)
        engine.save_checkpoint(str(root / case), tag=f"step{STEPS}",
                               client_state={"step": STEPS, "marker": f"saved by {world}"}, save_latest=False)
        saved = snapshot(engine)
        step(engine, STEPS, rank, world)
        after = counters(engine)
        nxt = weights(engine)
        if rank == 0:
            torch.save({"loaded": saved, "next": nxt, "after_next": after}, out / f"ref_{case}.pt")
        resume_and_step(build(*CASES[case], world), root, case, rank, world, out, f"w{world}")


def refused(engine, root: Path, case: str) -> str | None:
    """The line load_resharded refuses with (None if it loads), checking that the engine was left as it was."""
    from filipctl.contract import JobError
    from jobs.train.reshard import load_resharded

    before = weights(engine)
    try:
        load_resharded(engine, root / case, f"step{STEPS}")
    except JobError as exc:
        after = weights(engine)
        assert all(torch.equal(before[n], after[n]) for n in before), "a refused load changed the engine"
        return str(exc)
    return None


def refusals(root: Path, out: Path, rank: int, world: int) -> None:
    """The loads that must be refused, each with one line."""
    lines = {"other_shape": refused(build(1, "lamb", "fp32", world, embed_dim=24), root, "z1_lamb"),
             "other_stage": refused(build(2, "lamb", "fp32", world), root, "z1_lamb")}
    broken = root / "broken"
    if rank == 0:
        shutil.copytree(root / "z1_lamb", broken / "missing")
        (broken / "missing" / f"step{STEPS}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
        shutil.copytree(root / "z1_lamb", broken / "truncated")
        damaged = broken / "truncated" / f"step{STEPS}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        damaged.write_bytes(damaged.read_bytes()[:1000])
    torch.distributed.barrier()
    lines["missing_file"] = refused(build(1, "lamb", "fp32", world), broken, "missing")
    lines["truncated_file"] = refused(build(1, "lamb", "fp32", world), broken, "truncated")
    if rank == 0:
        (out / f"refusals_w{world}.json").write_text(json.dumps(lines, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("save", "load"))
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--refusals", action="store_true")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(1)
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        cases = args.cases.split(",")
        if args.mode == "save":
            save_run(args.root, args.out, cases, rank, world)
        else:
            for case in cases:
                resume_and_step(build(*CASES[case], world), args.root, case, rank, world, args.out, f"w{world}")
            if args.refusals:
                refusals(args.root, args.out, rank, world)
        torch.distributed.barrier()
        return 0
    except BaseException:
        (args.out / f"error_w{world}_rank{rank}.txt").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
