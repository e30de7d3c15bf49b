"""FILIP pretraining on one worker process; every backend starts N of these (torchrun, Slurm tasks, Ray workers).

    python -m torch.distributed.run --nproc_per_node 2 -m jobs.pretrain --recipe R.json --workdir DIR

DeepSpeed ZeRO (stage from the recipe) wraps the model and timm's LAMB; each rank scores its
local pairs against the gathered global batch. Checkpoints go to DIR/checkpoints every
`train.checkpoint_every` steps and a rerun resumes from the latest; the final weights are
written to DIR/model.pt as a consolidated fp32 state_dict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jobs.checkpoints import CheckpointStore, DirectoryCheckpoints
from jobs.distributed import DistInfo, gather_features, init_distributed
from jobs.events import emit
from jobs.loader import train_batches
from jobs.metrics import StageLogger
from jobs.optim import build_optimizer, peak_lr, warmup_cosine
from jobs.synthetic import read_manifest
from models.filip import build_model
from models.loss import filip_loss, reduce_for_gather

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(recipe: dict[str, Any]) -> dict[str, Any]:
    train, optim = recipe["train"], recipe["optim"]
    return {
        "train_micro_batch_size_per_gpu": train["micro_batch_size"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": train["zero_stage"]},
        "bf16": {"enabled": train["precision"] == "bf16"},
        "fp16": {"enabled": train["precision"] == "fp16"},
        "gradient_clipping": optim["grad_clip"],
        # timm's LAMB is a client optimizer DeepSpeed has not certified for ZeRO; it works (FINDINGS).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _log(info: DistInfo, msg: str, **fields: Any) -> None:
    if info.is_main:
        emit(msg, stage="pretrain", **fields)


def final_weights(engine, info: DistInfo) -> dict[str, torch.Tensor] | None:
    """The full fp32 weights on rank 0 (None elsewhere), whatever the ZeRO stage.

    DeepSpeed assembles each parameter's fp32 master copy from its partitions (a collective:
    every rank calls it), so no checkpoint file has to be readable from rank 0.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None:  # no ZeRO optimizer: the module holds the weights itself
            full = p.detach()
        if info.is_main:
            state[name] = full.detach().float().cpu().clone()
    if not info.is_main:
        return None
    for name, buf in engine.module.state_dict().items():
        state.setdefault(name, buf.detach().float().cpu().clone())  # persistent buffers, if any
    return state


def train(recipe: dict[str, Any], workdir: Path, store: CheckpointStore | None = None) -> dict[str, float]:
    """Pretrain; returns the summary rank 0 also writes to workdir/pretrain.json."""
    info = init_distributed()
    store = store or DirectoryCheckpoints(workdir / "checkpoints")
    train_cfg, data_cfg, model_cfg = recipe["train"], recipe["data"], recipe["model"]
    if info.world_size != train_cfg["workers"]:
        _log(info, f"note: recipe asks for {train_cfg['workers']} workers, running on {info.world_size}")
    torch.manual_seed(train_cfg["seed"])
    import deepspeed

    model = build_model(model_cfg)
    if train_cfg["gradient_checkpointing"]:
        model.set_grad_checkpointing(True)
    global_batch = train_cfg["micro_batch_size"] * info.world_size
    optimizer = build_optimizer(model, recipe["optim"], global_batch)
    scheduler = warmup_cosine(optimizer, recipe["optim"]["warmup_steps"], train_cfg["steps"], recipe["optim"]["min_lr_ratio"])
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(recipe)
    )

    start, source = store.restore(engine)
    if start:
        _log(info, f"resumed from {source}")

    manifest = read_manifest(data_cfg["url"])
    if manifest is None:
        raise SystemExit(f"no dataset at {data_cfg['url']} (dataset.json missing): run the data stage first")
    steps = train_cfg["steps"]
    b = train_cfg["micro_batch_size"]
    batches = train_batches(
        data_cfg["url"], manifest["shards"]["train"], info.rank, info.world_size, b,
        model_cfg["image"]["image_size"], model_cfg["text"]["context_length"], data_cfg["augment"],
        train_cfg["seed"], data_cfg["shuffle_buffer"],
        start_epoch=start * global_batch // max(1, manifest["counts"]["train"]),
    )
    dtype = DTYPES[train_cfg["precision"]]
    interaction = model_cfg["interaction"]
    mem_mb = model_cfg["similarity_memory_mb"]
    logger = StageLogger(info.is_main)
    if info.is_main and not start:
        logger.metrics({"peak_lr": peak_lr(recipe["optim"]["base_lr"], global_batch), "global_batch": global_batch})
    _log(info, f"pretraining {recipe['name']}: {steps} steps, global batch {global_batch} "
               f"({info.world_size} x {b}), ZeRO-{train_cfg['zero_stage']}, {train_cfg['precision']}, "
               f"{interaction} interaction"
               + (f", gather {model_cfg['gather_dtype']} keeping {model_cfg['token_keep']:.0%} of tokens"
                  if interaction == "late" else ""))

    engine.train()
    window_loss, window_n, t_window = 0.0, 0, time.perf_counter()
    t_start = time.perf_counter()
    step_times: list[float] = []
    loss_value = float("nan")
    for step in range(start, steps):
        images, ids = next(batches)
        t_step = time.perf_counter()
        images, ids = images.to(info.device, dtype), ids.to(info.device)
        local, scale = engine(images, ids)
        sent = reduce_for_gather(local, model_cfg["token_keep"], mem_mb) if interaction == "late" else local
        gathered = gather_features(sent, interaction, model_cfg["gather_dtype"])
        loss = filip_loss(local, gathered, scale, offset=info.rank * b, interaction=interaction, memory_mb=mem_mb)
        engine.backward(loss)
        engine.step()
        step_times.append(time.perf_counter() - t_step)  # compute + communication, data loading excluded
        window_loss += loss.detach().float().item()
        window_n += 1
        done = step + 1
        if done % train_cfg["log_every"] == 0 or done == steps:
            mean = torch.tensor([window_loss / window_n], dtype=torch.float64)
            dist.all_reduce(mean)
            loss_value = mean.item() / info.world_size
            if not math.isfinite(loss_value):
                raise SystemExit(f"loss is {loss_value} at step {done}: lower optim.base_lr or raise optim.weight_decay")
            dt = (time.perf_counter() - t_window) / window_n
            lr = scheduler.get_last_lr()[0]
            temp = 1.0 / float(scale.detach().float())
            logger.metrics({"loss": loss_value, "lr": lr, "temperature": temp, "step_time_s": dt,
                            "pairs_per_s": global_batch / dt}, step=done)
            eta = dt * (steps - done)
            _log(info, f"step {done:>6}/{steps}  loss {loss_value:7.4f}  lr {lr:.2e}  temp {temp:.4f}  "
                       f"{dt:.2f} s/step  eta {int(eta // 60)}m{int(eta % 60):02d}s", done=done, total=steps, loss=loss_value)
            window_loss, window_n, t_window = 0.0, 0, time.perf_counter()
        if done % train_cfg["checkpoint_every"] == 0 or done == steps:
            store.save(engine, done, {"step": done, "loss": loss_value})

    state = final_weights(engine, info)
    if info.is_main:
        tmp = workdir / "model.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(workdir / "model.pt")  # never leave a half-written model.pt
    warm = step_times[min(5, len(step_times) // 2):]  # the first steps pay for allocation and kernel warm-up
    result = {"final_loss": loss_value, "train_time_s": time.perf_counter() - t_start, "steps_run": steps - start,
              "compute_step_s": sum(warm) / len(warm) if warm else float("nan")}
    if info.is_main:
        logger.metrics({k: v for k, v in result.items() if math.isfinite(v)}, step=steps)
        logger.artifact(str(workdir / "model.pt"), "model")
        (workdir / "pretrain.json").write_text(json.dumps(result))
    dist.barrier()
    if info.owns_group:
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="resolved recipe (JSON) written by filipctl")
    parser.add_argument("--workdir", required=True, help="run folder: checkpoints/, model.pt")
    args = parser.parse_args(argv)
    recipe = json.loads(Path(args.recipe).read_text())
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    train(recipe, workdir)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
