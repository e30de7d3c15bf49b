"""FILIP pretraining on one worker process; every backend starts N of these (torchrun, Slurm tasks, Ray workers).

    python -m torch.distributed.run --nproc_per_node 2 -m jobs.train.pretrain --workdir DIR

DeepSpeed ZeRO (stage from the recipe) wraps the model and LAMB (jobs/train/lamb.py); the loss object
(models.loss.FilipLoss) scores each rank's local pairs against the gathered global batch.
Checkpoints go to DIR/checkpoints every `train.checkpoint_every` steps and a rerun resumes from
the latest; the final weights are written to DIR/model.pt as a consolidated fp32 state_dict.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from filipctl.contract import (ENV_STOP_AT_STEP, TAG_WEIGHTS, JobError, RunDir, file_sha256, first_error, job_main,
                               write_result)
from filipctl.schema import Recipe
from jobs.train.checkpoints import CheckpointStore, DirectoryCheckpoints
from jobs.data.index import load_index
from filipctl.backends.slurm_requeue import slurm_requeue_cause
from jobs.train.distributed import DistInfo, collectives_named, init_distributed, leave, rank_hosts, rendezvous
from jobs.train.heartbeat import Heartbeat
from jobs.events import emit
from jobs.data.loader import TrainBatches, sources_of
from filipctl.tracking.redact import redact
from jobs.stage_logger import StageLogger
from jobs.system_metrics import system_metrics
from filipctl.tracking.provenance import cpu_record
from jobs.train.batch_layout import BatchLayout, LayoutError, layout_for
from jobs.train.lamb import attach_layout
from jobs.train.optim import build_optimizer, build_scheduler, peak_lr
from jobs.train.segments import commit_segment, next_segment, read_segments, segment_params
from models.accumulation import cached_gradients, surrogate
from models.filip import build_model
from models.loss import FilipLoss
from models.precision import DTYPES


def deepspeed_config(recipe: Recipe, layout: BatchLayout) -> dict[str, Any]:
    train, optim = recipe.train, recipe.optim
    return {
        "train_micro_batch_size_per_gpu": layout.micro,
        "gradient_accumulation_steps": layout.accumulation,
        "train_batch_size": layout.global_batch,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "gradient_clipping": optim.grad_clip,
        # LAMB is a client optimizer DeepSpeed has not certified for ZeRO; it works, with its trust ratio taken per
        # parameter across ZeRO's partitions (jobs/train/lamb.py attach_layout).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def _log(info: DistInfo, msg: str, **fields: Any) -> None:
    if info.is_main:
        emit(msg, stage="pretrain", **fields)


def record_restart(info: DistInfo, logger: StageLogger, start: int) -> None:
    """When torchrun restarted the group after a failed worker (train.max_restarts), or Slurm requeued the job (a lost
    node, a time limit, a preemption): say so in the log, the events and the stage's run (tag filipctl.restarts,
    metric `restarts` at the step it resumed from). Ray Train's restarts are recorded by its driver (ray_driver)."""
    torchrun = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    # Slurm counts the requeues of a job in SLURM_RESTART_COUNT.
    restarts = torchrun or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if not restarts or not info.is_main:
        return
    cause = "" if torchrun else slurm_requeue_cause(os.environ.get("SLURM_JOB_ID", ""))
    what = (f"restart {restarts} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')}" if torchrun
            else f"Slurm requeue {restarts}" + (f" ({cause})" if cause else ""))
    _log(info, f"{what}: resuming from step {start}", restart=restarts, resumed_at=start)
    logger.restart(restarts, start, cause)  # the cause names the lost node, when Slurm's accounting says


def open_segment(info: DistInfo, run_dir: RunDir, start: int, layout: BatchLayout) -> dict[str, Any] | None:
    """Rank 0: the segment (jobs/train/segments.py) a job at another world size than the last one opens, said in the
    log with the step it continues from; recorded by `commit` with the attempt's first checkpoint. None elsewhere
    and when the size did not change."""
    if not info.is_main:
        return None
    segments = read_segments(run_dir.root)
    segment = next_segment(segments, start, layout)
    if segment is not None and segments:
        before = segments[-1]
        _log(info, f"world size {before['world_size']} -> {layout.world} from step {start}: global batch "
                   f"{layout.global_batch} = {layout.describe()} (was {before['layout']})",
             world_size=layout.world, previous_world_size=before["world_size"], resumed_at=start)
    return segment


def commit(segment: dict[str, Any] | None, run_dir: RunDir, logger: StageLogger) -> None:
    """With the first checkpoint of the attempt that opened it: the segment into segments.json and MLflow params."""
    if segment is not None:
        commit_segment(run_dir.root, segment)
        logger.params(segment_params(segment))


def refuse_pointless_restart(run_dir: RunDir) -> None:
    """In a restarted group (torchrun, Ray Train's FailureConfig): when an earlier attempt failed with the user's
    error (a JobError, FILIPCTL_STOP_AT_STEP's stop included), which a restart only repeats, fail with it at once
    instead of training up to it again. The records are cleared whenever the stage is submitted, so any found here
    is an earlier attempt's of this submission."""
    previous = first_error(run_dir)
    if previous is not None and not previous.get("restartable", True):
        raise JobError(previous["message"])


def batch_layout(recipe: Recipe, world_size: int) -> BatchLayout:
    """The recipe's global batch over the workers this job got; one line when it does not split."""
    try:
        return layout_for(recipe.train.global_batch, recipe.train.micro_batch_size, world_size)
    except LayoutError as exc:
        raise JobError(f"this job has {world_size} workers: {exc}") from None


def build_engine(recipe: Recipe, layout: BatchLayout):
    """Model, LAMB and the warmup-cosine schedule inside a DeepSpeed engine -> (engine, scheduler)."""
    import deepspeed

    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model)
    if recipe.train.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, recipe.optim, layout.global_batch)
    scheduler = build_scheduler(optimizer, recipe.optim, recipe.train.steps)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(recipe, layout))
    attach_layout(engine)  # LAMB's trust ratio per parameter, across ZeRO's flat partitions (jobs/train/lamb.py)
    return engine, scheduler


@dataclass
class TrainLog:
    """The loss window between log lines and the per-step compute times."""

    steps: int
    global_batch: int
    max_bad_fraction: float
    logger: StageLogger
    info: DistInfo
    window: list[float] = field(default_factory=list)
    t_window: float = field(default_factory=time.perf_counter)
    step_times: list[float] = field(default_factory=list)
    last_loss: float = float("nan")
    skipped: int = 0  # samples skipped over every rank, as of the last log line
    # A resumed attempt does not log again the steps an earlier one logged (the stage's run keeps one value per
    # step: one loss curve); its progress lines still show them.
    logged_until: int = 0

    def add(self, loss: float, step_time: float) -> None:
        self.window.append(loss)
        self.step_times.append(step_time)

    def flush(self, done: int, lr: float, scale: torch.Tensor, batches: TrainBatches) -> None:
        """Log the window's mean loss and the skipped samples over every rank (a collective: every rank calls it)."""
        for problem in batches.take_problems():  # every rank names what it could not read, in the job log
            print(f"skipped (rank {self.info.rank}): {problem}", flush=True)
        totals = torch.tensor([sum(self.window) / len(self.window), batches.skipped, batches.read], dtype=torch.float64)
        dist.all_reduce(totals)
        self.last_loss = totals[0].item() / self.info.world_size
        skipped, read = int(totals[1].item()), int(totals[2].item())
        self.skipped = skipped
        if not math.isfinite(self.last_loss):
            raise JobError(f"loss is {self.last_loss} at step {done}: lower optim.base_lr or raise optim.weight_decay")
        if read and skipped / read > self.max_bad_fraction:
            raise JobError(f"{skipped} of {read} samples read so far could not be used ({skipped / read:.1%}, more "
                           f"than data.max_bad_fraction {self.max_bad_fraction:g}); the log names them")
        dt = (time.perf_counter() - self.t_window) / len(self.window)
        temp = 1.0 / float(scale.detach().float())
        if done > self.logged_until:
            self.logger.metrics({"loss": self.last_loss, "lr": lr, "temperature": temp, "step_time_s": dt,
                                 "pairs_per_s": self.global_batch / dt, "skipped_samples": skipped}, step=done)
        eta = dt * (self.steps - done)
        _log(self.info, f"step {done:>6}/{self.steps}  loss {self.last_loss:7.4f}  lr {lr:.2e}  temp {temp:.4f}  "
                        f"{dt:.2f} s/step  eta {int(eta // 60)}m{int(eta % 60):02d}s",
             done=done, total=self.steps, loss=self.last_loss)
        self.window, self.t_window = [], time.perf_counter()

    def compute_step_s(self) -> float:
        warm = self.step_times[min(5, len(self.step_times) // 2):]  # the first steps pay for allocation and warm-up
        return sum(warm) / len(warm) if warm else float("nan")


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


def save_model(state: dict[str, torch.Tensor], run_dir: RunDir) -> None:
    tmp = run_dir.model.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(run_dir.model)  # never leave a half-written model.pt


def one_step(engine, loss_fn: FilipLoss, micro_batches: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """One optimizer step over this rank's micro-batches -> (loss, scale). One micro-batch: forward, loss over the
    global batch, backward. Several: exact accumulation (models/accumulation.py), so that the loss still contrasts
    the whole global batch: cached forwards, the loss once, then a forward and backward per micro-batch."""
    if len(micro_batches) == 1:
        features, scale = engine(*micro_batches[0])
        loss = loss_fn(features, scale)
        engine.backward(loss)
        engine.step()
        return loss.detach(), scale
    with torch.no_grad():
        cached = [engine(images, ids) for images, ids in micro_batches]
    loss_scale = float(getattr(engine.optimizer, "cur_scale", 1.0)) if engine.fp16_enabled() else 1.0
    loss, grads, scale_grad = cached_gradients(loss_fn, [f for f, _ in cached], cached[0][1], loss_scale)
    for a, (images, ids) in enumerate(micro_batches):
        features, scale = engine(images, ids)
        # The loss holds the temperature once: its gradient goes in with the first micro-batch only.
        engine.backward(surrogate(features, grads[a], scale, scale_grad if a == 0 else None), scale_wrt_gas=False)
        engine.step()  # DeepSpeed steps the optimizer after the last micro-batch (gradient_accumulation_steps)
    return loss, scale


def train_steps(recipe: Recipe, info: DistInfo, layout: BatchLayout, engine, scheduler, batches: TrainBatches,
                loss_fn: FilipLoss, store: CheckpointStore, start: int, log: TrainLog, heartbeat: Heartbeat,
                saved: Callable[[], None] = lambda: None) -> None:
    """The loop: this rank's micro-batches, loss over the global batch, backward, step; log and checkpoint on
    schedule; stop after a checkpoint when FILIPCTL_STOP_AT_STEP says so (scripts and benchmarks that continue a
    run at another size)."""
    steps, dtype = recipe.train.steps, DTYPES[recipe.train.precision]
    stop_at = int(os.environ.get(ENV_STOP_AT_STEP, "0") or 0)
    engine.train()
    for step in range(start, steps):
        micro = [next(batches) for _ in range(layout.accumulation)]
        t_step = time.perf_counter()
        loss, scale = one_step(engine, loss_fn, [(i.to(info.device, dtype), t.to(info.device)) for i, t in micro])
        log.add(loss.float().item(), time.perf_counter() - t_step)  # data loading excluded
        done = step + 1
        heartbeat.beat(done)  # which rank stopped, should a collective time out (heartbeat.py)
        if done % recipe.train.log_every == 0 or done == steps:
            log.flush(done, scheduler.get_last_lr()[0], scale, batches)
        if done % recipe.train.checkpoint_every == 0 or done == steps:
            store.save(engine, done, {"step": done, "loss": log.last_loss, "global_batch": layout.global_batch},
                       batches.state())
            saved()
            log.logger.sync()  # what was logged up to a checkpoint is as durable as the checkpoint
            if done == stop_at and done < steps:
                raise JobError(f"stopped after the checkpoint of step {done} ({ENV_STOP_AT_STEP}); run again to "
                               "continue, on any number of workers that splits the global batch")


def run(recipe: Recipe, run_dir: RunDir, store: CheckpointStore | None = None) -> dict[str, float]:
    """Pretrain; returns the summary whose metrics rank 0 also writes to the stage folder's result.json.

    A collective that fails because another rank stopped (hung, stopped, killed) ends the job with a JobError
    naming that rank, from every rank's heartbeat."""
    refuse_pointless_restart(run_dir)
    info = init_distributed(recipe.train.collective_timeout_s)
    heartbeat = Heartbeat(run_dir.logs / "heartbeat", info.rank)
    heartbeat.beat(0)
    # One sampler per node (its first local rank): the node's CPU, memory, disk, network, GPUs (jobs/system_metrics.py).
    with (collectives_named(info, heartbeat),
          system_metrics(recipe.tracking.system_metrics_interval_s, run_dir.root, sample=info.local_rank == 0)):
        return pretrain(recipe, run_dir, store, info, heartbeat)


def pretrain(recipe: Recipe, run_dir: RunDir, store: CheckpointStore | None, info: DistInfo,
             heartbeat: Heartbeat) -> dict[str, float]:
    cfg = recipe.train
    store = store or DirectoryCheckpoints(run_dir.checkpoints, cfg.keep_checkpoints, cfg.keep_checkpoint_steps)
    layout = batch_layout(recipe, info.world_size)
    engine, scheduler = build_engine(recipe, layout)
    restored = store.restore(engine, layout.global_batch)
    start = restored.step
    if start:
        _log(info, f"resumed from {restored.source}" + (
            f" (saved by {restored.saved_world} workers, re-partitioned for {info.world_size})"
            if restored.saved_world != info.world_size else "")
            + ("" if restored.data_states else "; it holds no data position, so the data restarts from the first "
                                               "epoch"))
    try:
        batches = TrainBatches(recipe, sources_of(load_index(run_dir.input("data"))), info.rank, layout,
                               restored.data_states or None, start)
    except ValueError as exc:
        raise JobError(f"cannot resume the data where the checkpoint left it: {exc}; rerun with --fresh") from None
    loss_fn = FilipLoss.from_config(recipe.model)
    logger = StageLogger(info.is_main)
    # Constants of the run: MLflow params, not one-point metric series (a chart of one bar says nothing).
    first = {"peak_lr": peak_lr(recipe.optim.base_lr, layout.global_batch), "global_batch": layout.global_batch}
    if info.is_main and not start:
        logger.params(first)
    hosts = rank_hosts(info)
    if info.is_main:  # what a rerun must match to be bitwise identical, besides the recipe and the code
        # Where it ran: each rank's host (rank order) and the rendezvous, so that a multi-node run shows its nodes.
        logger.tags({"filipctl.hosts": ",".join(hosts), "filipctl.nodes": str(len(set(hosts))),
                     "filipctl.rendezvous": rendezvous() or "launcher"})
        logger.tags({"filipctl.world_size": str(info.world_size), "filipctl.torch_threads": str(torch.get_num_threads()),
                     "filipctl.torch": torch.__version__, "filipctl.cuda": str(torch.version.cuda),
                     "filipctl.device": str(info.device)})
        # The CPU that computed (rank 0's node, not the host the CLI ran on): reproduce --verify compares it.
        logger.tags({f"filipctl.{k}": v for k, v in cpu_record().items()})
        logger.text(json.dumps(deepspeed_config(recipe, layout), indent=1), "deepspeed_config.json")
    segment = open_segment(info, run_dir, start, layout)
    if layout.share > 1 and recipe.model.interaction == "late" and recipe.model.token_keep < 1:
        _log(info, f"note: {layout.share} workers share each micro-batch of {layout.micro_batch_size}: each picks the "
                   f"tokens it sends (model.token_keep {recipe.model.token_keep:g}) against its {layout.micro} texts, "
                   f"not {layout.micro_batch_size}; the loss differs from a run on {layout.slots} workers by that")
    stop_at = int(os.environ.get(ENV_STOP_AT_STEP, "0") or 0)
    if stop_at and stop_at % cfg.checkpoint_every and stop_at != cfg.steps:
        _log(info, f"note: {ENV_STOP_AT_STEP}={stop_at} is not a checkpoint step (train.checkpoint_every "
                   f"{cfg.checkpoint_every}): the run does not stop there")
    _log(info, f"pretraining {recipe.name}: {cfg.steps} steps, global batch {layout.global_batch} "
               f"({layout.describe()}), ZeRO-{cfg.zero_stage}, {cfg.precision}, {loss_fn.describe()}")
    if len(set(hosts)) > 1:
        _log(info, f"ranks on {len(set(hosts))} nodes: " + ", ".join(f"{r}={h}" for r, h in enumerate(hosts))
             + f"; rendezvous {rendezvous() or 'by the launcher'}")
    record_restart(info, logger, start)
    log = TrainLog(cfg.steps, layout.global_batch, recipe.data.max_bad_fraction, logger, info,
                   logged_until=logger.last_step("loss") if start else 0)
    t_start = time.perf_counter()
    heartbeat.beat(start)
    first_save = [segment]  # recorded with this attempt's first checkpoint, then no more
    train_steps(recipe, info, layout, engine, scheduler, batches, loss_fn, store, start, log, heartbeat,
                saved=lambda: commit(first_save.pop(), run_dir, logger) if first_save else None)

    state = final_weights(engine, info)
    result = {"final_loss": log.last_loss, "train_time_s": time.perf_counter() - t_start,
              "steps_run": cfg.steps - start, "compute_step_s": log.compute_step_s()}
    if info.is_main:
        save_model(state, run_dir)
        logger.metrics({k: v for k, v in result.items() if math.isfinite(v)}, step=cfg.steps)
        logger.artifact(str(run_dir.model), "model")
        digest = file_sha256(run_dir.model)
        # The weights as an MLflow logged model (the UI's "Logged models"); the eval stage links its metrics to it
        # by this digest (filipctl/tracking/spool.py).
        logger.model(str(run_dir.model), name=recipe.name, tags={TAG_WEIGHTS: digest, "filipctl.recipe": recipe.name},
                     params={"interaction": recipe.model.interaction, "steps": str(cfg.steps), **first},
                     recipe=redact(recipe.model_dump(mode="json")))
        logger.sync()
        write_result(run_dir, {k: v for k, v in result.items() if math.isfinite(v)},
                     digests={"model.pt": digest}, skipped=log.skipped)
    leave(info)
    return result


def main(argv: list[str] | None = None) -> int:
    return job_main(run, argv, __doc__)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
