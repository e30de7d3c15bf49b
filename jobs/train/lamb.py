"""LAMB whose trust ratio is per original parameter (layer-wise, as LAMB and FILIP intend) under any ZeRO partitioning.

Under ZeRO 1/2 (and DeepSpeed's BF16_Optimizer) the client optimizer steps one flat fp32 partition per param group
per rank, under ZeRO-3 one flat partition per sub-group: a per-tensor LAMB such as timm's then takes ||w|| / ||u||
over a PARTITION -- pieces of many parameters, cut where the world size says -- so its step changes with the world
size. `attach_layout(engine)` tells this LAMB which pieces of which parameters each flat tensor holds on this rank;
`step` sums ||w_p||^2 and ||u_p||^2 per parameter over its local pieces, all-reduces those sums over the
data-parallel group (one small vector per flat tensor stepped) and scales every piece by its parameter's ratio.

The math is timm 1.0.31's `Lamb` (single-tensor path) with the options jobs/train/optim.py uses: Adam moments with
gradient averaging, bias correction, weight decay added to the update before the trust ratio (timm's default,
decoupled_decay=False), no trust clipping unless asked, parameters without weight decay not adapted unless
always_adapt. No gradient clipping: DeepSpeed's `gradient_clipping` does it over the global gradient. State keys are
timm's (`exp_avg`, `exp_avg_sq` per tensor, `step` in each param group), so checkpoints and jobs/train/reshard.py
read it as they read timm's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from filipctl.contract import JobError


@dataclass(frozen=True)
class Segment:
    """A run of one original parameter's elements in a flat tensor."""

    param: int  # the parameter's index in its (sub-)group, the same on every rank
    start: int  # offset in the flat tensor
    numel: int


@dataclass(frozen=True)
class FlatLayout:
    """What one flat tensor holds on this rank, and with whom its parameters' norms are summed."""

    params: int  # parameters of the flat tensor's (sub-)group over all ranks: the summed vector holds 2 * params
    segments: tuple[Segment, ...]  # this rank's pieces, in flat order
    group: Any  # the data-parallel process group (None: nothing to sum with)
    advances_step: bool = True  # False for a ZeRO-3 sub-group that is not its param group's first (one step each)

    def runs(self, numel: int) -> tuple[list[int], list[int]]:
        """(parameter index per run, run lengths) covering [0, numel): padding between and after the segments is a
        run of index `params`, whose ratio is 1 (its weights, gradients and moments are zero anyway)."""
        index, lengths, at = [], [], 0
        for seg in sorted(self.segments, key=lambda s: s.start):
            if seg.start < at or seg.start + seg.numel > numel:
                raise ValueError(f"segment {seg} overlaps another or lies past the flat tensor's {numel} elements")
            if seg.start > at:
                index.append(self.params)
                lengths.append(seg.start - at)
            if seg.numel:
                index.append(seg.param)
                lengths.append(seg.numel)
            at = seg.start + seg.numel
        if at < numel:
            index.append(self.params)
            lengths.append(numel - at)
        return index, lengths


@dataclass(frozen=True)
class _Laid:
    """A flat tensor's layout as step() uses it (index tensors on the tensor's device, built once)."""

    flat: Tensor
    layout: FlatLayout
    pieces: list[tuple[int, int]]  # (start, numel) of each non-empty segment
    piece_param: Tensor  # the parameter of each piece
    run_param: Tensor  # FlatLayout.runs: parameter (or padding) per run ...
    run_numel: Tensor  # ... and its length


def trust_ratio(w_norm: Tensor, u_norm: Tensor, trust_clip: bool) -> Tensor:
    """||w|| / ||u||, 1 where either is 0 (timm's _lamb_trust_ratio); LAMBC clips it at 1."""
    ratio = torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, 1.0), 1.0)
    return torch.clamp(ratio, max=1.0) if trust_clip else ratio


class Lamb(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 grad_averaging: bool = True, trust_clip: bool = False, always_adapt: bool = False) -> None:
        for what, value in (("learning rate", lr), ("epsilon", eps), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"Invalid {what}: {value}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps, weight_decay=weight_decay,
                        grad_averaging=grad_averaging, trust_clip=trust_clip, always_adapt=always_adapt)
        super().__init__(params, defaults)
        # id(flat tensor) -> what step() needs of its layout; empty: plain per-tensor LAMB.
        self._layouts: dict[int, _Laid] = {}

    def set_layouts(self, layouts: list[tuple[Tensor, FlatLayout]]) -> None:
        """Which parameter pieces each flat tensor holds (attach_layout computes them from the engine)."""
        self._layouts = {}
        for flat, layout in layouts:
            index, lengths = layout.runs(flat.numel())
            pieces = [s for s in layout.segments if s.numel]
            self._layouts[id(flat)] = _Laid(
                flat, layout, [(s.start, s.numel) for s in pieces],
                torch.tensor([s.param for s in pieces], dtype=torch.long, device=flat.device),
                torch.tensor(index, dtype=torch.long, device=flat.device),
                torch.tensor(lengths, dtype=torch.long, device=flat.device))

    def _layout_of(self, p: Tensor) -> _Laid | None:
        entry = self._layouts.get(id(p))
        return entry if entry is not None and entry.flat is p else None

    def _advances(self, group: dict) -> bool:
        """Whether stepping this group now counts as one more optimizer step. Without a layout, always (timm).
        With one, only when the group holds a flat tensor that advances it: DeepSpeed's ZeRO-3 calls step() once
        per sub-group with every other group's params emptied, and timm would count each call for every group."""
        if not self._layouts:
            return True
        entries = [self._layout_of(p) for p in group["params"]]
        return any(e is None or e.layout.advances_step for e in entries) if entries else False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if "step" not in group:
                group["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            if self._advances(group):
                group["step"].add_(1)
            for p in group["params"]:
                if self._layouts and self._layout_of(p) is None:  # a silent per-tensor step would be wrong
                    raise RuntimeError("LAMB steps a tensor that attach_layout did not lay out: DeepSpeed replaced "
                                       "its flat partitions; call jobs.train.lamb.attach_layout(engine) again")
                if p.grad is not None or self._layouts:  # laid out: every rank joins the sum, gradient or not
                    self._step_tensor(p, group)
        return loss

    def _step_tensor(self, p: Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        step = float(group["step"].item())
        bc1, bc2 = (1 - beta1 ** step, 1 - beta2 ** step) if group["bias_correction"] else (1.0, 1.0)
        beta3 = 1 - beta1 if group["grad_averaging"] else 1.0
        weight_decay, lr = group["weight_decay"], group["lr"]
        adapt = weight_decay != 0 or group["always_adapt"]
        entry = self._layout_of(p)
        grad = p.grad
        if grad is None:  # a laid-out tensor without a gradient: no update, but the collective must happen
            if adapt:
                self._summed_ratios(p, torch.zeros_like(p), entry, group["trust_clip"])
            return
        if grad.is_sparse:
            raise RuntimeError("Lamb does not support sparse gradients")
        state = self.state[p]
        if len(state) == 0:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if beta3 == 1 - beta1:
            exp_avg.lerp_(grad, beta3)
        else:
            exp_avg.mul_(beta1).add_(grad, alpha=beta3)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (bc2 ** 0.5)).add_(group["eps"])
        update = (exp_avg / bc1).div_(denom)
        if weight_decay != 0:
            update.add_(p, alpha=weight_decay)
        if adapt:
            if entry is None:  # one tensor, one parameter: exactly timm's arithmetic
                update.mul_(trust_ratio(p.norm(2.0), update.norm(2.0), group["trust_clip"]))
            else:
                update.mul_(self._summed_ratios(p, update, entry, group["trust_clip"]))
        p.add_(update, alpha=-lr)

    @staticmethod
    def _summed_ratios(p: Tensor, update: Tensor, laid: _Laid, trust_clip: bool) -> Tensor:
        """Per-element trust ratios of flat tensor p: each parameter's ||w|| and ||u|| summed over its pieces on
        every rank of the layout's group (squares in float64, so a whole tensor's norm comes back exactly)."""
        k, group = laid.layout.params, laid.layout.group
        sums = torch.zeros(2 * (k + 1), dtype=torch.float64, device=p.device)
        if laid.pieces:
            w = torch.stack(torch._foreach_norm([p.narrow(0, s, n) for s, n in laid.pieces])).double()
            u = torch.stack(torch._foreach_norm([update.narrow(0, s, n) for s, n in laid.pieces])).double()
            sums[:k + 1].index_add_(0, laid.piece_param, w * w)
            sums[k + 1:].index_add_(0, laid.piece_param, u * u)
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        norms = sums.sqrt().to(p.dtype)
        ratios = trust_ratio(norms[:k + 1], norms[k + 1:], trust_clip)
        ratios[k] = 1.0  # padding
        return ratios[laid.run_param].repeat_interleave(laid.run_numel, output_size=p.numel())


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# -- the engine's layout -------------------------------------------------------------------------------------
def _zero12_layouts(lp_groups, hp_flats, dp_groups) -> list[tuple[Tensor, FlatLayout]]:
    """ZeRO 1/2 and BF16_Optimizer: DeepSpeed maps each parameter's piece in this rank's partition of its group
    (`_hp_mapping.hp_fragment_address`: offset and length in the flat fp32 partition)."""
    layouts = []
    for lp_group, flat, group in zip(lp_groups, hp_flats, dp_groups):
        segments = []
        for k, p in enumerate(lp_group):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                at = mapping.hp_fragment_address
                segments.append(Segment(k, int(at.start), int(at.numel)))
        layouts.append((flat, FlatLayout(len(lp_group), tuple(segments), group)))
    return layouts


def _zero3_layouts(opt) -> list[tuple[Tensor, FlatLayout]]:
    """ZeRO-3: sub-group j's flat partition holds, for each of its parameters in order, this rank's
    ceil(numel / world) elements of it (`ds_tensor`), the last rank's padded with zeros."""
    rank = dist.get_rank(group=opt.dp_process_group)
    layouts, seen = [], set()
    for j, lp_group in enumerate(opt.fp16_groups):
        flat = opt.fp32_partitioned_groups_flat[j]
        segments, at = [], 0
        for k, p in enumerate(lp_group):
            part = int(p.partition_numel())
            n = max(0, min(part, int(p.ds_numel) - rank * part))
            segments.append(Segment(k, at, n))
            at += part
        if at != flat.numel():
            raise RuntimeError(f"ZeRO-3 sub-group {j}: its parameters' parts hold {at} elements, the flat "
                               f"partition {flat.numel()}")
        group_id = opt.sub_group_to_group_id[j]
        layouts.append((flat, FlatLayout(len(lp_group), tuple(segments), opt.dp_process_group,
                                         advances_step=group_id not in seen)))
        seen.add(group_id)
    return layouts


def attach_layout(engine) -> None:
    """Give the engine's LAMB (if it is one) the pieces of each parameter that its flat tensors hold on this rank.
    Call it on every rank right after deepspeed.initialize. Other optimizers, and LAMB over whole tensors (ZeRO-0
    fp32, or DeepSpeed's per-tensor fp16/bf16 wrapper at ZeRO-0), need nothing."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", None)
    if isinstance(opt, Lamb) or not isinstance(base, Lamb):
        return
    kind = type(opt).__name__
    if getattr(opt, "cpu_offload", False) or getattr(opt, "offload_optimizer", False):
        raise JobError(f"LAMB with ZeRO optimizer offload is not supported ({kind}): turn offload off in the "
                       f"recipe, or use optim.name=adamw")
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO 1/2
        layouts = _zero12_layouts(opt.bit16_groups, opt.single_partition_of_fp32_groups, opt.real_dp_process_group)
    elif hasattr(opt, "fp32_groups_flat_partition"):  # BF16_Optimizer (ZeRO-1, bf16, fp32 gradient accumulation)
        layouts = _zero12_layouts(opt.bf16_groups, opt.fp32_groups_flat_partition, opt.real_dp_process_group)
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        layouts = _zero3_layouts(opt)
    elif kind == "FP16_UnfusedOptimizer":  # one fp32 copy per parameter: plain per-tensor LAMB is right
        return
    else:
        raise JobError(f"LAMB does not know how DeepSpeed's {kind} lays out parameters, so its trust ratio would "
                       f"not be per parameter: use train.zero_stage 1 or 2, or optim.name=adamw")
    stepped = {id(p) for g in base.param_groups for p in g["params"]}  # ZeRO-3 fills them in per sub-group
    if not hasattr(opt, "fp32_partitioned_groups_flat") and any(id(flat) not in stepped for flat, _ in layouts):
        raise JobError(f"DeepSpeed's {kind} steps other tensors than its flat partitions; LAMB cannot lay them "
                       f"out: use optim.name=adamw")
    base.set_layouts(layouts)
