"""Resume a DeepSpeed ZeRO checkpoint at another world size than the one that wrote it.

DeepSpeed 0.19.8 loads ZeRO 1/2/3 optimizer state only at the data-parallel size that saved it ("Automatic
adjustment of ZeRO's optimizer state partitioning with a new world size is not currently supported").
`load_resharded` does it: every rank builds ITS flat partitions for the engine's current layout -- the fp32 master
weights and every per-element optimizer tensor (LAMB/AdamW exp_avg, exp_avg_sq, ...) -- sliced parameter by
parameter out of the N memory-mapped rank files (a rank reads its 1/M of the state, never a whole model),
and hands them to the ZeRO optimizer's own `load_state_dict`, the very call DeepSpeed makes at the same size: it
sets the optimizer's state and param_groups (LAMB keeps `step` there, as timm's does), the fp32 partitions, the module's
weights from them and the loss scale. The LR schedule and the engine's step counters come from the model-states
file. At the size that wrote the checkpoint, and for ZeRO-0 (one unpartitioned optimizer state, which DeepSpeed
loads at any size), DeepSpeed's own `load_checkpoint` runs.

Not `deepspeed.utils.safe_set_full_fp32_param` / `safe_set_full_optimizer_state`: under ZeRO-3 they index past the
end of a parameter whose size the world size does not divide (`logit_scale`, 1 element, at any size > 1), they
need optimizer states that a fresh engine does not have yet (LAMB creates them in its first step), and they
leave the module's (low-precision) weights as they were. Not universal checkpoints (ds_to_universal): an offline
conversion that writes a second copy of the checkpoint and needs `load_universal` in the engine's config.

Files (what `engine.save_checkpoint` writes into root/tag, 0.19.8): ZeRO 0-2 `mp_rank_00_model_states.pt` (rank 0:
module, lr_scheduler, counters, param_shapes, dp_world_size, ds_config, client_state); ZeRO-3 one
`zero_pp_rank_{r}_mp_rank_00_model_states.pt` per rank instead; ZeRO 1-3 one
`[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt` per rank (its flat partitions and optimizer state).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from filipctl.contract import JobError

MODEL_STATES = "mp_rank_00_model_states.pt"


def _z3model_states(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"


def _optim_states(rank: int, bf16: bool) -> str:
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


# What DeepSpeed's load_checkpoint keeps out of the client_state it returns (engine._load_checkpoint).
_DEEPSPEED_KEYS = ("module", "skipped_steps", "global_steps", "dp_world_size", "mp_world_size", "data_sampler",
                   "random_ltd", "lr_scheduler", "optimizer")


# -- reading a checkpoint folder ---------------------------------------------------------------------------
def _load(path: Path, folder: Path) -> dict[str, Any]:
    """One DeepSpeed file, memory-mapped (its tensors are paged in when sliced) -> its dict; JobError if it cannot."""
    if not path.is_file():
        raise JobError(f"checkpoint {folder} cannot be resumed: {path.name} is missing (a save that did not finish, "
                       f"or files removed); resume from another checkpoint or start over with --fresh")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]  # torch adds paragraphs
        raise JobError(f"checkpoint {folder} cannot be resumed: {path} does not load ({why}); resume from another "
                       f"checkpoint or start over with --fresh") from None


def model_states(folder: Path) -> dict[str, Any]:
    """Rank 0's model-states file (ZeRO-3 writes one per rank, the others one in all)."""
    if not folder.is_dir():
        raise JobError(f"checkpoint {folder} cannot be resumed: the folder is missing")
    z3 = folder / _z3model_states(0)
    path = z3 if z3.is_file() else folder / MODEL_STATES
    states = _load(path, folder)
    if not isinstance(states, dict) or "dp_world_size" not in states:
        raise JobError(f"checkpoint {folder} cannot be resumed: {path} is not a DeepSpeed model-states file")
    return states


def _stage_of(states: dict[str, Any], folder: Path) -> int:
    if (folder / _z3model_states(0)).is_file():
        return 3
    zero = (states.get("ds_config") or {}).get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else 0


def saved_world(folder: Path) -> int:
    """The data-parallel world size that wrote checkpoint folder root/tag."""
    return int(model_states(folder)["dp_world_size"])


def saved_zero_stage(folder: Path) -> int:
    """The ZeRO stage that wrote checkpoint folder root/tag (0-3)."""
    return _stage_of(model_states(folder), folder)


# -- the saved layout: where each parameter lies in the N ranks' flat partitions ------------------------
@dataclass(frozen=True)
class Piece:
    """A run of one parameter's elements in one rank's flat tensor."""

    rank: int
    flat: int  # which flat tensor of that rank: its param group (ZeRO 1/2) or sub-group (ZeRO-3)
    at: int  # offset in that flat tensor
    start: int  # offset in the flattened parameter
    numel: int


@dataclass
class SavedParam:
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)


def zero12_pieces(shapes: list[dict[str, Any]], partition: list[int], paddings: list[list[int]] | None,
                  world: int) -> dict[str, SavedParam]:
    """ZeRO 1/2: param group i is one flat vector (its parameters in `param_shapes` order, each followed by its
    alignment padding) cut into `world` equal partitions of partition[i] elements, rank r holding the r-th."""
    params: dict[str, SavedParam] = {}
    for i, group in enumerate(shapes):
        offset = 0
        for k, (name, shape) in enumerate(group.items()):
            shape = tuple(int(d) for d in shape)
            numel, pos = math.prod(shape), offset
            param = params[name] = SavedParam(shape)
            while pos < offset + numel:
                rank, at = divmod(pos, partition[i])
                n = min(offset + numel - pos, partition[i] - at)
                if rank >= world:
                    raise ValueError(f"parameter {name} lies past the {world} partitions of group {i}")
                param.pieces.append(Piece(rank, i, at, pos - offset, n))
                pos += n
            offset += numel + (paddings[i][k] if paddings else 0)
    return params


def zero3_pieces(shapes: list[dict[str, Any]], world: int) -> dict[str, SavedParam]:
    """ZeRO-3: every parameter is cut into `world` parts of ceil(numel / world) (the last one padded); a rank's
    flat tensor of sub-group j holds its part of each of the sub-group's parameters, in `param_shapes` order."""
    params: dict[str, SavedParam] = {}
    for j, group in enumerate(shapes):
        at = 0
        for name, shape in group.items():
            shape = tuple(int(d) for d in shape)
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            params[name] = SavedParam(shape, [Piece(r, j, at, r * part, min(part, numel - r * part))
                                              for r in range(world) if numel > r * part])
            at += part
    return params


def shape_problem(saved: dict[str, tuple[int, ...]], current: dict[str, tuple[int, ...]]) -> str | None:
    """The first parameter whose shape differs between checkpoint and model, or that only one of them has."""
    for name, shape in current.items():
        if name not in saved:
            return f"parameter {name} {list(shape)} of the recipe's model is not in the checkpoint"
        if tuple(saved[name]) != tuple(shape):
            return f"parameter {name} is {list(saved[name])} in the checkpoint, {list(shape)} in the recipe's model"
    for name, shape in saved.items():
        if name not in current:
            return f"the checkpoint has a parameter {name} {list(shape)} that the recipe's model lacks"
    return None


class SavedCheckpoint:
    """The files of checkpoint folder root/tag, memory-mapped, and where each parameter lies in them."""

    def __init__(self, folder: Path, bf16_first: bool = False) -> None:
        self.folder = folder
        self.states = model_states(folder)
        self.stage = _stage_of(self.states, folder)
        self.world = int(self.states["dp_world_size"])
        self.optim: list[dict[str, Any]] = []
        if self.stage:
            first = next((b for b in (bf16_first, not bf16_first) if (folder / _optim_states(0, b)).is_file()),
                         bf16_first)
            self.optim = [_load(folder / _optim_states(r, first), folder)["optimizer_state_dict"]
                          for r in range(self.world)]
        self.params: dict[str, SavedParam] = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter's shape as saved."""
        if self.stage == 3:  # the module's tensors are empty placeholders there
            shapes = {n: s for group in self.states["param_shapes"] for n, s in group.items()}
            shapes.update(self.states.get("frozen_param_shapes") or {})
        else:
            buffers = set(self.states.get("buffer_names") or ())
            shapes = {n: t.shape for n, t in self.states["module"].items() if n not in buffers}
        return {n: tuple(int(d) for d in s) for n, s in shapes.items()}

    def layout_problem(self) -> str | None:
        """Why the rank files do not make one consistent checkpoint of this world size (None when they do);
        computes `params`."""
        counts = [sd.get("partition_count") for sd in self.optim]
        for r, count in enumerate(counts):
            if any(int(c) != self.world for c in (count if isinstance(count, list) else [count])):
                return f"rank {r}'s optimizer file was written by {count} ranks, the model states say {self.world}"
        if self.stage == 3 and self.states.get("frozen_param_shapes"):
            return "it has frozen parameters, which resuming ZeRO-3 at another world size does not handle"
        try:
            if self.stage == 3:
                self.params = zero3_pieces(self.states["param_shapes"], self.world)
            else:
                first = self.optim[0]
                partition = [len(t) + int(p) for t, p in zip(first["single_partition_of_fp32_groups"],
                                                              first["group_paddings"])]
                self.params = zero12_pieces(self.states["param_shapes"], partition,
                                            first.get("param_alignment_paddings"), self.world)
        except (KeyError, ValueError, TypeError) as exc:
            return f"its layout cannot be read ({type(exc).__name__}: {exc})"
        for j in range(len(self._flats(0))):
            keys = set(self.partition_keys(j))
            for r in range(1, self.world):
                if set(self.partition_keys(j, r)) != keys:
                    return f"rank {r}'s optimizer state holds other tensors than rank 0's"
        return None

    # -- the saved flat tensors ----------------------------------------------------------------------------
    def _flats(self, rank: int) -> list[torch.Tensor]:
        sd = self.optim[rank]
        return sd["fp32_flat_groups"] if self.stage == 3 else sd["single_partition_of_fp32_groups"]

    def _base(self, rank: int) -> dict[str, Any]:
        """That rank's state_dict of the wrapped (client) optimizer."""
        sd = self.optim[rank]
        return sd["optimizer_state_dict"] if self.stage == 3 else sd["base_optimizer_state"]

    def flat_state(self, flat: int, rank: int = 0) -> dict[str, Any]:
        return self._base(rank)["state"].get(flat, {})

    def param_groups(self) -> list[dict[str, Any]]:
        return self._base(0)["param_groups"]

    def first_flat_of_group(self, group: int) -> int:
        return self.param_groups()[group]["params"][0]

    def _partition_numel(self, flat: int, rank: int) -> int:
        n = len(self._flats(rank)[flat])
        return n if self.stage == 3 else n + int(self.optim[rank]["group_paddings"][flat])

    def partition_keys(self, flat: int, rank: int = 0) -> list[str]:
        """The optimizer state's tensors that are partitioned like the weights (exp_avg, ...); the rest (AdamW's
        `step`, ...) is one value for the whole flat tensor."""
        n = self._partition_numel(flat, rank)
        return [k for k, v in self.flat_state(flat, rank).items()
                if torch.is_tensor(v) and v.dim() == 1 and v.numel() == n]

    def read(self, name: str, key: str | None, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of parameter `name`, flattened: the fp32 master weight (key None) or
        optimizer state `key`; only the pieces that overlap are read."""
        out = torch.zeros(numel, dtype=torch.float32)
        for pc in self.params[name].pieces:
            lo, hi = max(start, pc.start), min(start + numel, pc.start + pc.numel)
            if lo >= hi:
                continue
            src = self._flats(pc.rank)[pc.flat] if key is None else self.flat_state(pc.flat, pc.rank)[key]
            out[lo - start:hi - start] = src[pc.at + lo - pc.start:pc.at + hi - pc.start]
        return out


# -- the engine's current layout -----------------------------------------------------------------------
def current_shapes(engine) -> dict[str, tuple[int, ...]]:
    return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()}


def _clone(value: Any) -> Any:
    """A copy that does not share memory with the mapped file."""
    return value.clone() if torch.is_tensor(value) else copy.deepcopy(value)


def _flat_state(saved: SavedCheckpoint, group: int, fill: dict[str | None, torch.Tensor]) -> dict[str, Any]:
    """The optimizer state of one flat tensor of the current layout: the partitioned tensors just built, the rest
    as saved for a flat tensor of the same param group."""
    first = saved.first_flat_of_group(group)
    state = {k: _clone(v) for k, v in saved.flat_state(first).items() if k not in saved.partition_keys(first)}
    state.update({k: t for k, t in fill.items() if k is not None})
    return state


def _groups(saved: SavedCheckpoint, params: list[list[int]]) -> list[dict[str, Any]]:
    """The saved param_groups' settings (lr, betas, LAMB's step, ...) over the current layout's flat tensors."""
    return [{**{k: _clone(v) for k, v in g.items() if k != "params"}, "params": p}
            for g, p in zip(saved.param_groups(), params)]


def _zero12_state_dict(engine, saved: SavedCheckpoint) -> dict[str, Any]:
    """What this rank's optimizer file would hold, had it been saved at the current world size (ZeRO 1/2)."""
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    partitions, state = [], {}
    for i, lp_group in enumerate(opt.bit16_groups):
        hp = opt.single_partition_of_fp32_groups[i]
        keys = [None, *saved.partition_keys(saved.first_flat_of_group(i))]
        fill = {k: torch.zeros(hp.numel(), dtype=torch.float32) for k in keys}
        for p in lp_group:
            mapping = getattr(p, "_hp_mapping", None)  # the part of p in this rank's partition, if any
            if mapping is None:
                continue
            lp, hp_at = mapping.lp_fragment_address, mapping.hp_fragment_address
            for key, buf in fill.items():
                buf.narrow(0, hp_at.start, hp_at.numel).copy_(saved.read(names[id(p)], key, lp.start, lp.numel))
        partitions.append(fill[None])
        if saved.flat_state(saved.first_flat_of_group(i)):
            state[i] = _flat_state(saved, i, fill)
    first = saved.optim[0]
    return {
        "loss_scaler": first["loss_scaler"], "dynamic_loss_scale": first["dynamic_loss_scale"],
        "overflow": first["overflow"], "clip_grad": first["clip_grad"], "zero_stage": first["zero_stage"],
        "base_optimizer_state": {"state": state, "param_groups": _groups(saved, [[i] for i in range(len(partitions))])},
        "single_partition_of_fp32_groups": partitions,
        "group_paddings": list(opt.groups_padding),
        "param_alignment_paddings": opt.round_robin_bit16_padding,
        "partition_count": opt.partition_count,
        "ds_version": first["ds_version"],
    }


def _zero3_state_dict(engine, saved: SavedCheckpoint, rank: int) -> dict[str, Any]:
    """What this rank's optimizer file would hold, had it been saved at the current world size (ZeRO-3)."""
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    partitions, state = [], {}
    params: list[list[int]] = [[] for _ in saved.param_groups()]
    for j, lp_group in enumerate(opt.fp16_groups):
        group = opt.sub_group_to_group_id[j]
        params[group].append(j)  # sub-groups are numbered group by group, as the optimizer lists them
        keys = [None, *saved.partition_keys(saved.first_flat_of_group(group))]
        numel = opt.fp32_partitioned_groups_flat[j].numel()
        fill = {k: torch.zeros(numel, dtype=torch.float32) for k in keys}
        at = 0
        for p in lp_group:
            part = p.partition_numel()
            n = max(0, min(part, p.ds_numel - rank * part))  # the last rank's part is padded with zeros
            for key, buf in fill.items():
                buf.narrow(0, at, n).copy_(saved.read(names[id(p)], key, rank * part, n))
            at += part
        if at != numel:
            raise JobError(f"cannot lay out ZeRO-3 sub-group {j}: {at} elements, the engine has {numel}")
        partitions.append(fill[None])
        if saved.flat_state(saved.first_flat_of_group(group)):
            state[j] = _flat_state(saved, group, fill)
    first = saved.optim[0]
    return {
        "zero_stage": first["zero_stage"], "loss_scaler": first["loss_scaler"],
        "dynamic_loss_scale": first["dynamic_loss_scale"], "overflow": first["overflow"],
        "partition_count": opt.partition_count,
        "optimizer_state_dict": {"state": state, "param_groups": _groups(saved, params)},
        "fp32_flat_groups": partitions,
    }


def link_optimizer_state(opt) -> None:
    """Point every parameter's fragment at the ZeRO 1/2 optimizer's state, so that
    deepspeed.utils.safe_get_full_optimizer_state answers. DeepSpeed links them once, right after it steps the
    FIRST param group for the first time: the other groups have no state yet then and stay unlinked ("exp_avg
    not found in optimizer state fragment"); a load unlinks them all."""
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and getattr(opt, "optimizer", None) is not None:
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


# -- the entry point -------------------------------------------------------------------------------------
def _validated(engine, folder: Path) -> SavedCheckpoint:
    """The checkpoint, when this engine can resume from it; JobError naming the first reason it cannot."""
    saved = SavedCheckpoint(folder, bf16_first=bool(engine.bfloat16_enabled()))
    stage = int(engine.zero_optimization_stage())
    if saved.stage != stage:
        raise JobError(f"checkpoint {folder} was written with ZeRO stage {saved.stage}, the recipe trains with stage "
                       f"{stage}: resume with train.zero_stage={saved.stage} (the stage it was written with), or "
                       f"start over with --fresh")
    problem = shape_problem(saved.shapes(), current_shapes(engine))
    if problem:
        raise JobError(f"checkpoint {folder} holds another model: {problem}; resume with the model it was written "
                       f"with, or start over with --fresh")
    world = int(engine.dp_world_size)
    if stage and saved.world != world:
        problem = saved.layout_problem()
        if problem is None and stage < 3 and not hasattr(engine.optimizer, "single_partition_of_fp32_groups"):
            # DeepSpeed's BF16_Optimizer: bf16 with data_types.grad_accum_dtype fp32 under ZeRO-1
            problem = (f"DeepSpeed's {type(engine.optimizer).__name__} cannot be re-partitioned; resume on "
                       f"{saved.world} workers")
        if problem is None and len(saved.param_groups()) != len(engine.optimizer.param_groups):
            problem = (f"its optimizer has {len(saved.param_groups())} parameter groups, this one "
                       f"{len(engine.optimizer.param_groups)}")
        if problem:
            raise JobError(f"checkpoint {folder} cannot be resumed on {world} workers: {problem}")
    return saved


def _agreed(engine, folder: Path) -> SavedCheckpoint:
    """Validate on every rank; all ranks fail with the first rank's line if any rank cannot go on (before anything
    is changed, and before any rank enters a collective the others would not)."""
    import torch.distributed as dist

    saved, problem, unexpected = None, None, None
    try:
        saved = _validated(engine, folder)
    except JobError as exc:
        problem = str(exc)
    except Exception as exc:  # noqa: BLE001 - a bug, not the user's: its traceback on this rank, a line on the others
        problem, unexpected = f"checkpoint {folder} cannot be resumed: {type(exc).__name__}: {exc}", exc
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if unexpected is not None:
        raise unexpected
    first = next((p for p in problems if p), None)
    if first or saved is None:
        raise JobError(first or f"checkpoint {folder} cannot be resumed")
    return saved


def load_resharded(engine, root: Path, tag: str) -> dict[str, Any]:
    """Load checkpoint root/tag into `engine`, whatever world size wrote it (every rank calls this) -> the
    client_state DeepSpeed's load_checkpoint would return. Restores the fp32 master and module weights, every
    optimizer state tensor and the param_groups' settings, the LR schedule, global_steps / global_samples /
    skipped_steps and the loss scale. A checkpoint of another model or ZeRO stage, or a missing or unreadable
    file: JobError, the engine untouched."""
    import torch.distributed as dist

    folder = Path(root) / tag
    saved = _agreed(engine, folder)
    opt = engine.optimizer
    if not saved.stage or saved.world == int(engine.dp_world_size):
        path, client_state = engine.load_checkpoint(str(root), tag=tag)
        if path is None:
            raise JobError(f"checkpoint {folder} cannot be resumed: DeepSpeed found nothing to load there")
        link_optimizer_state(opt)
        return client_state

    states = saved.states
    rank = dist.get_rank(group=opt.dp_process_group)
    sd = _zero3_state_dict(engine, saved, rank) if saved.stage == 3 else _zero12_state_dict(engine, saved)
    if saved.stage == 3:
        opt.checkpoint_event_prologue()  # every parameter partitioned, as DeepSpeed's load has them
    # From the module's saved state only what the optimizer does not hold (buffers, frozen weights): the optimized
    # weights follow from the fp32 partitions.
    optimized = {name for group in states["param_shapes"] for name in group}
    engine.module.load_state_dict({k: v for k, v in states["module"].items() if k not in optimized}, strict=False)
    opt.load_state_dict([sd if r == rank else None for r in range(int(engine.dp_world_size))],
                        load_optimizer_states=True, load_from_fp32_weights=True)
    if saved.stage == 3:
        opt.checkpoint_event_epilogue()  # gathers the persistent (small) parameters again from their partitions
    else:
        opt.update_lp_params()  # the module's weights from the fp32 partitions, all-gathered
        link_optimizer_state(opt)
    if engine.lr_scheduler is not None and states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(copy.deepcopy(states["lr_scheduler"]))
    engine.global_steps = states["global_steps"]
    engine.global_samples = states.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = states["skipped_steps"]
    engine.loaded_checkpoint_dp_world_size = saved.world
    engine.loaded_checkpoint_mp_world_size = states["mp_world_size"]
    return {k: v for k, v in states.items() if k not in _DEEPSPEED_KEYS}
