"""The FAST3DIS training loop (model-, data- and loss-agnostic parts of ``fast3dis-train``).

One optimizer step = ``accum_steps`` micro-batches of ``batch_size`` samples:

    for each micro-batch: forward under autocast -> instance set losses (model/losses.py) on
        targets built from the GT instance maps (train/targets.py) [+ geometry losses] -> backward(loss / accum)
    unscale (fp16) -> clip grad norm -> AdamW step -> warm-up + cosine LR step

Checkpoints: ``out/config.json`` + ``out/model.safetensors`` (model/checkpoint.py; dtype ``save_dtype``)
plus ``out/train_state.pt`` with everything needed for an exact resume: step, optimizer, LR scheduler,
GradScaler, RNG states and an fp32 copy of the trainable parameters and buffers (so a checkpoint saved
in fp16 still resumes exactly). Data order and augmentation are pure functions of (seed, step)
(train/data.py ``ResumableSampler``), so a resumed run reproduces an uninterrupted one.

Distributed (``torchrun``; fast3dis_ros/core/distributed.py, train/sharded_sampler.py): the model is wrapped in
DDP (gradients of the trainable parameters averaged over ranks, no all-reduce on non-final micro-steps
via ``no_sync``); each rank reads its shard of the same global sample stream (``ShardedSceneSampler``),
so a step on N ranks with batch b sees the samples of one rank with batch N x b; the set losses divide by
the GT-mask count of the whole global step (all ranks, all micro-steps), so the averaged gradient is the
large-batch one. Rank 0 alone writes logs, checkpoints and plots; ``train_state.pt`` keeps every rank's
RNG state.

Logs: ``out/train_log.jsonl`` (one line per optimizer step), ``out/val_log.jsonl`` (one line per
validation), ``out/loss_curve.png`` at the end (matplotlib, optional).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader

from fast3dis_ros.core import distributed as D
from fast3dis_ros.eval import metrics
from fast3dis_ros.inference.factory import resolve_device
from fast3dis_ros.inference.postprocess import instances_from_queries
from fast3dis_ros.model.checkpoint import drop_alias_keys, read_checkpoint_config, save_checkpoint
from fast3dis_ros.model.weights_io import WEIGHTS_NAME, check_and_load, read_tensors
from fast3dis_ros.model.config import Fast3disConfig
from fast3dis_ros.train.data import TargetCollate, TrainSampleDataset, collate
from fast3dis_ros.train.geometry_losses import GeometryLoss
from fast3dis_ros.train.losses import SetCriterion
from fast3dis_ros.train.sharded_sampler import ShardedSceneSampler
from fast3dis_ros.train.targets import build_targets

__all__ = ["TrainConfig", "Trainer", "autocast_ctx", "cosine_warmup_lambda", "resolve_amp"]

TRAIN_STATE = "train_state.pt"
TRAIN_LOG = "train_log.jsonl"
VAL_LOG = "val_log.jsonl"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1
    accum_steps: int = 1
    lr: float = 3e-4
    lr_backbone_mult: float = 1.0  # LR multiplier of backbone parameters (full fine-tune)
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    amp: str = "auto"  # auto | bf16 | fp16 | none
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0 = only at the end
    eval_every: int = 0  # 0 = only at the end (when a validation set exists)
    full_finetune: bool = False
    geometry_loss_weight: float = -1.0  # <0: 1.0 with full_finetune, else 0
    num_workers: int = 0
    save_dtype: str = "fp32"  # fp32 | fp16 | bf16 (model.safetensors; train_state keeps fp32)
    deterministic: bool = False
    progress: bool = True
    max_eval_batches: int = 16
    quick_ap: bool = True
    val_score_threshold: float = 0.05  # quick_ap: postprocess score threshold (AP ranks by score)
    plot: bool = True
    time_budget_s: float = 0.0  # >0: after 20 steps, shrink ``steps`` so training ends within this wall time
    out: str = "outputs/train"

    @property
    def geometry_weight(self) -> float:
        if self.geometry_loss_weight >= 0:
            return float(self.geometry_loss_weight)
        return 1.0 if self.full_finetune else 0.0


def cosine_warmup_lambda(total: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor: linear warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""
    total = max(int(total), 1)
    warmup = max(min(int(warmup), total - 1), 0)

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return float(step + 1) / float(warmup)
        prog = (step - warmup) / max(total - warmup, 1)
        prog = min(max(prog, 0.0), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * prog))

    return f


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    amp = (amp or "none").lower()
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None, "fp32": None}[amp]


def autocast_ctx(device: torch.device, amp: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type in ``amp`` (from :func:`resolve_amp`); no-op for None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------- model adapters
def build_model(cfg: Any) -> torch.nn.Module:
    from fast3dis_ros.model.fast3dis import Fast3DIS

    return Fast3DIS(cfg)


def build_model_split_invariant(cfg: Any, seed: int) -> torch.nn.Module:
    """``Fast3DIS(cfg)`` whose instance head starts from the same weights whatever the LoRA layout.

    Why: ``Fast3DIS(cfg)`` draws the backbone (random DA3 init, then one random LoRA ``A`` per adapted
    linear) and then the head from one RNG stream, so moving ``first_lora_block`` would also change the
    head's starting point. Re-seeding before the head keeps a split comparison about the split alone.
    (LoRA ``B`` starts at zero, so every split's feature pass starts equal to the geometry pass.)
    """
    from fast3dis_ros.model.da3.backbone import DA3Backbone
    from fast3dis_ros.model.fast3dis import Fast3DIS
    from fast3dis_ros.model.head.instance_head import InstanceHead

    torch.manual_seed(seed)
    backbone = DA3Backbone(cfg.backbone)
    torch.manual_seed(seed)
    head = InstanceHead(cfg.head)
    return Fast3DIS(cfg, backbone=backbone, head=head)


def select_trainable(model: torch.nn.Module, full: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """Set requires_grad: everything (full fine-tune) or ``model.trainable_parameters()`` (LoRA + head)."""
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    elif hasattr(model, "trainable_parameters"):
        chosen = list(model.trainable_parameters())
        chosen_ids = {id(p if isinstance(p, torch.Tensor) else p[1]) for p in chosen}
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen_ids)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_model_checkpoint(model: torch.nn.Module, cfg: Any, folder: Path, dtype: torch.dtype) -> None:
    """config.json + model.safetensors (``model/checkpoint.py``), floating tensors cast to ``dtype``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    save_checkpoint(model, folder)
    if dtype == torch.float32:
        return
    path = Path(folder) / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    save_file(sd, str(path), metadata=meta)


def read_model_config(folder: Path) -> Fast3disConfig:
    """Fast3disConfig of a checkpoint folder (``model/checkpoint.py``'s reader)."""
    return read_checkpoint_config(folder)[0]


def load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    """Initialise ``model`` from a checkpoint folder (``--init``, resume), as ``load_checkpoint`` checks.

    A key the network lacks, a missing one, or a shape that differs is a ``CheckpointMismatchError``:
    skipping them would start training from weights other than the ones asked for, silently."""
    _, contents, folder = read_checkpoint_config(folder)
    path = Path(folder) / WEIGHTS_NAME
    state = drop_alias_keys(read_tensors(path), str(path))
    expected = set(model.state_dict()) if contents == "full" else set(model.trainable_state_dict())
    check_and_load(model, state, str(path), expected=expected)


# ---------------------------------------------------------------------------------- criterion adapter
def build_criterion(cfg: Fast3disConfig, total_steps: int) -> SetCriterion:
    """``SetCriterion`` with ``cfg.loss``, its overlap schedule fitted to the run length: warm-up over the
    first 10% of the steps, decay until the last (peak, floor and decay shape as configured)."""
    total = max(int(total_steps), 2)
    overlap = replace(cfg.loss.overlap, warmup=max(1, total // 10), total=total)
    return SetCriterion(replace(cfg.loss, overlap=overlap))


def instance_losses(criterion: SetCriterion, outputs: dict, targets: list[dict], step: int) -> tuple[torch.Tensor, dict]:
    """Run the set criterion; returns (weighted total, {final-layer loss name: unweighted value})."""
    ld = criterion(outputs, targets, step=step)
    parts = {k: v for k, v in ld.items() if k != "total" and isinstance(v, torch.Tensor)
             and v.dim() == 0 and not k.rsplit("_", 1)[-1].isdigit()}
    return ld["total"], parts


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(
        self,
        model_cfg: Any,
        tcfg: TrainConfig,
        train_set: TrainSampleDataset,
        val_set: TrainSampleDataset | None = None,
        *,
        model: torch.nn.Module | None = None,
        criterion: SetCriterion | None = None,
    ) -> None:
        self.cfg = model_cfg
        self.tcfg = tcfg
        self.out = Path(tcfg.out)
        self.device = resolve_device(tcfg.device)
        self.amp_dtype = resolve_amp(tcfg.amp, self.device)
        if tcfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(tcfg.seed)
        np.random.seed(tcfg.seed % (2**32))
        if hasattr(model_cfg, "train_backbone"):
            model_cfg.train_backbone = bool(tcfg.full_finetune)
        self.model = (model if model is not None else build_model(model_cfg)).to(self.device)
        self.named_trainable = select_trainable(self.model, tcfg.full_finetune)
        if not self.named_trainable:
            raise RuntimeError("no trainable parameters")
        self.dist = D.env()
        self.forward_model = self._wrap_ddp()
        if self.dist.rank > 0:  # own random stream per rank (rank 0 keeps the single-process one)
            torch.manual_seed(tcfg.seed + 7919 * self.dist.rank)
        self._num_masks: float | None = None
        self.criterion = criterion if criterion is not None else build_criterion(model_cfg, tcfg.steps)
        if isinstance(self.criterion, torch.nn.Module):
            self.criterion.to(self.device)
        gw = tcfg.geometry_weight
        self.geometry = GeometryLoss(w_depth=gw, w_trans=gw, w_rot=gw, w_K=0.5 * gw) if gw > 0 else None
        self.train_set = train_set
        self.val_set = val_set
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_warmup_lambda(tcfg.steps, tcfg.warmup_steps, tcfg.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup
    def _wrap_ddp(self) -> torch.nn.Module:
        """DDP over the trainable parameters (frozen ones are skipped by DDP itself); the bare model for
        one process. ``find_unused_parameters``: heads whose loss is off (e.g. geometry without
        --full-finetune) get no gradient, which plain DDP would wait for forever."""
        if not self.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index if self.device.index is not None else self.dist.local_rank] \
            if self.device.type == "cuda" else None
        return DDP(self.model, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: per-rank batch x world size x accumulation steps."""
        return D.global_batch(self.tcfg.batch_size, self.tcfg.accum_steps, self.dist.world)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.tcfg
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in self.named_trainable:
            is_backbone = name.startswith("backbone") and t.full_finetune
            decay = p.ndim >= 2 and "norm" not in name.lower() and "lora_" not in name
            groups.setdefault((is_backbone, decay), []).append(p)
        pg = []
        for (bb, decay), params in sorted(groups.items()):
            pg.append({"params": params, "lr": t.lr * (t.lr_backbone_mult if bb else 1.0),
                       "weight_decay": t.weight_decay if decay else 0.0})
        fused = self.device.type == "cuda"
        self._fused = False
        if fused:
            try:
                opt = torch.optim.AdamW(pg, lr=t.lr, betas=(0.9, 0.999), fused=True)
                self._fused = True
                return opt
            except (TypeError, RuntimeError):
                pass
        return torch.optim.AdamW(pg, lr=t.lr, betas=(0.9, 0.999))

    def _loader(self, start_pos: int, n_micro: int) -> Iterable[dict]:
        t = self.tcfg
        sampler = ShardedSceneSampler(len(self.train_set), rank=self.dist.rank, world=self.dist.world,
                                      block=t.batch_size, seed=t.seed, start=start_pos,
                                      length=n_micro * t.batch_size)
        mhw = self.mask_hw()
        cf = TargetCollate(mhw, self.num_queries()) if mhw is not None else collate
        # one loader per fit(): its workers live for the whole run (persistent_workers only matters
        # across epochs of the same loader, and the sampler here is one endless stream)
        return DataLoader(
            self.train_set,
            batch_size=t.batch_size,
            sampler=sampler,
            num_workers=t.num_workers,
            collate_fn=cf,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if t.num_workers > 0 else None,
            drop_last=True,
        )

    def mask_hw(self) -> tuple[int, int] | None:
        """Mask-logit resolution of the model for the training image size (None = unknown)."""
        head = getattr(self.cfg, "head", None)
        s = getattr(head, "mask_stride", None)
        hw = getattr(self.train_set, "hw", None)
        if s is None or hw is None:
            return None
        return (int(hw[0]) // int(s), int(hw[1]) // int(s))

    def num_queries(self) -> int | None:
        return getattr(getattr(self.cfg, "head", None), "num_queries", None)

    # ------------------------------------------------------------------ losses
    def compute_losses(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        images = batch["images"].to(self.device, non_blocking=True)
        with autocast_ctx(self.device, self.amp_dtype):
            outputs = self.forward_model(images)
        outputs = _to_float(outputs)
        hm, wm = outputs["pred_masks"].shape[-2:]
        if "tgt_masks" in batch and tuple(batch["tgt_masks"].shape[-2:]) == (hm, wm):
            # built by TargetCollate in the DataLoader workers; counts stay on the CPU (no sync)
            targets = {"masks": batch["tgt_masks"].to(self.device, non_blocking=True),
                       "valid": batch["tgt_valid"].to(self.device, non_blocking=True),
                       "counts": [int(x) for x in batch["tgt_count"].tolist()]}
            if self._num_masks is not None:  # normaliser of the whole global step (see _step_num_masks)
                targets["num_masks"] = self._num_masks
        else:
            targets = build_targets(batch["instance"], (hm, wm), max_instances=outputs["pred_masks"].shape[1])
            targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=self.device)
        if self.criterion is not None:
            li, pi = instance_losses(self.criterion, outputs, targets, step)
            total = total + li
            parts["loss_instance"] = li
            parts.update(pi)
        if self.geometry is not None:
            gb = {k: batch[k].to(self.device) for k in ("depth", "K", "T_cam_world", "images") if k in batch}
            gl = self.geometry(outputs, gb)
            total = total + gl["loss_geometry"]
            parts.update(gl)
        return total, parts, outputs

    # ------------------------------------------------------------------ one optimizer step
    def accumulate(self, micro_batches: list[dict]) -> dict[str, float]:
        """Forward + backward of ``loss / len(micro_batches)`` for each micro-batch (grads accumulate)."""
        return _floats(self._accumulate(micro_batches))

    def _accumulate(self, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        """`accumulate` with the statistics left as 0-d device tensors (no host sync)."""
        self.model.train()
        accum = len(micro_batches)
        sums: dict[str, torch.Tensor] = {}
        self._num_masks = self._step_num_masks(micro_batches)
        for i, mb in enumerate(micro_batches):
            # DDP: all-reduce the gradients once, on the last micro-step
            sync = i == accum - 1 or not self.dist.enabled
            with contextlib.nullcontext() if sync else self.forward_model.no_sync():
                loss, parts, _ = self.compute_losses(mb, self.step)
                self.scaler.scale(loss / accum).backward()
            for k, v in (("loss", loss), *parts.items()):
                v = v.detach().float() / accum
                sums[k] = sums[k] + v if k in sums else v
        self._num_masks = None
        return sums

    def _step_num_masks(self, micro_batches: list[dict]) -> float | None:
        """Per-micro-batch normaliser of the set losses so that the gradient of a step equals that of one
        batch holding every sample of the step: (GT masks of all micro-batches of all ranks) / (world x
        accum), since the loss of each micro-batch is divided by ``accum`` and DDP averages over ranks.
        One small all-reduce per step; None (each micro-batch normalises itself) without ``tgt_count``."""
        if not all("tgt_count" in mb for mb in micro_batches):
            return None
        local = sum(int(mb["tgt_count"].sum()) for mb in micro_batches)
        if self.dist.enabled:
            dev = self.device if self.dist.backend == "nccl" else torch.device("cpu")
            t = D.all_reduce_sum_(torch.tensor([float(local)], dtype=torch.float64, device=dev))
            local = float(t.item())
        return max(float(local), 1.0) / (self.dist.world * len(micro_batches))

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step; returns python floats (one host sync)."""
        return _floats(self._train_step(micro_batches))

    def _train_step(self, micro_batches: list[dict]) -> dict[str, Any]:
        """One optimizer step; statistics stay 0-d device tensors so the loop can log every N steps.

        A non-finite gradient norm skips the update: fp16 through GradScaler; otherwise, with the fused
        (CUDA) AdamW, through its ``found_inf`` input (no host sync), else by a host-side check."""
        sums: dict[str, Any] = self._accumulate(micro_batches)
        self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.named_trainable]
        if self.tcfg.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip)
        else:
            gnorm = torch.norm(torch.stack([p.grad.detach().norm() for p in params if p.grad is not None]))
        gnorm = gnorm.detach().float()
        nonfinite = (~torch.isfinite(gnorm)).float()
        if self.amp_dtype == torch.float16:
            self.scaler.step(self.optimizer)  # GradScaler skips the step itself on inf/nan (fp16)
        elif self._fused:
            self.optimizer.grad_scale = None
            self.optimizer.found_inf = nonfinite  # fused AdamW skips the update where found_inf == 1
            self.optimizer.step()
            self.optimizer.found_inf = None
        elif math.isfinite(float(gnorm)):
            self.optimizer.step()
        sums["skipped"] = nonfinite
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        sums["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        sums["grad_norm"] = gnorm
        self.step += 1
        return sums

    # ------------------------------------------------------------------ checkpoint / resume
    def save(self, folder: Path | None = None) -> Path:
        """Checkpoint + train_state.pt. Collective under torchrun (every rank's RNG state is gathered);
        rank 0 writes, the others wait for it."""
        folder = Path(folder or self.out)
        rng_ranks = D.all_gather_objects(_rng_state())
        if not self.dist.is_main:
            D.barrier()
            return folder
        try:
            self._write_state(folder, rng_ranks)
        finally:
            D.barrier()
        return folder

    def _write_state(self, folder: Path, rng_ranks: list[dict]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_model_checkpoint(self.model, self.cfg, folder, _DTYPES[self.tcfg.save_dtype])
        trainable = {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.named_trainable}
        buffers = {n: b.detach().cpu().clone() for n, b in self.model.named_buffers()}
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rng_ranks": rng_ranks,
            "world_size": self.dist.world,
            "global_batch": self.global_batch,
            "trainable": trainable,
            "buffers": buffers,
            "train_config": asdict(self.tcfg),
        }
        tmp = folder / (TRAIN_STATE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, folder / TRAIN_STATE)

    def load(self, folder: Path) -> None:
        """Exact resume from ``folder`` (model weights + train_state.pt)."""
        folder = Path(folder)
        state_path = folder / TRAIN_STATE
        if (folder / "model.safetensors").exists():
            load_model_weights(self.model, folder)
        if not state_path.exists():
            return  # weights-only initialisation
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in state["trainable"].items():
                if n in named:
                    named[n].copy_(v.to(named[n].dtype))
            bufs = dict(self.model.named_buffers())
            for n, v in state.get("buffers", {}).items():
                if n in bufs and bufs[n].shape == v.shape:
                    bufs[n].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == self.dist.world:
            _set_rng_state(ranks[self.dist.rank])
        else:
            if ranks is not None and self.dist.is_main:
                print(f"[fast3dis-train] resuming a {len(ranks)}-process run on {self.dist.world}: data order "
                      "and weights carry over (per-step global batch permitting), RNG streams restart per rank")
            torch.set_rng_state(state["rng_cpu"])
            if state.get("rng_cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            if self.dist.rank > 0:
                torch.manual_seed(self.tcfg.seed + 7919 * self.dist.rank + int(state["step"]))
        self.step = int(state["step"])

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if self.val_set is None or len(self.val_set) == 0:
            return {}
        self.model.eval()
        sums: dict[str, float] = {}
        n = 0
        ap_scores: list[dict] = []
        loader = DataLoader(self.val_set, batch_size=1, shuffle=False, collate_fn=collate, num_workers=0)
        for i, batch in enumerate(loader):
            if i >= self.tcfg.max_eval_batches:
                break
            loss, parts, outputs = self.compute_losses(batch, self.step)
            sums["loss"] = sums.get("loss", 0.0) + float(loss)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
            if self.tcfg.quick_ap:
                r = quick_ap(outputs, batch, self.tcfg.val_score_threshold,
                             getattr(self.cfg, "score_threshold", None))
                if r:
                    ap_scores.append(r)
        self.model.train()
        res = {f"val_{k}": v / max(n, 1) for k, v in sums.items()}
        if ap_scores:
            for k in ap_scores[0]:
                vals = [r[k] for r in ap_scores if k in r and r[k] is not None and math.isfinite(r[k])]
                if vals:
                    res[f"val_{k}"] = float(np.mean(vals))
        return res

    # ------------------------------------------------------------------ main loop
    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until ``tcfg.steps`` (or ``stop_at``, to simulate an interruption), save, validate."""
        t = self.tcfg
        end = t.steps if stop_at is None else min(int(stop_at), t.steps)
        main = self.dist.is_main
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / TRAIN_LOG
        if main:
            _truncate_log(log_path, self.step)
            _truncate_log(self.out / VAL_LOG, self.step)
            print(f"[fast3dis-train] global batch {self.global_batch} = per-rank batch {t.batch_size} x "
                  f"{self.dist.world} process(es) x {t.accum_steps} accumulation step(s)", flush=True)
        remaining = max(t.steps - self.step, 0)
        loader = self._loader(self.step * self.global_batch, remaining * t.accum_steps)
        bar = None
        if t.progress and main:
            try:
                from tqdm.auto import tqdm

                bar = tqdm(total=t.steps, initial=self.step, desc="fast3dis-train", dynamic_ncols=True,
                           mininterval=0.5)
            except ImportError:
                bar = None
        rng = torch.get_rng_state()
        it = iter(loader)  # draws the DataLoader's base seed from the global RNG:
        torch.set_rng_state(rng)  # undo, so the losses' random draws are the same after a resume
        last: dict[str, float] = {}
        t0 = time.perf_counter()
        ema = None
        # per-step statistics stay on the device and are written every `flush` steps with one transfer
        flush = max(1, min(t.log_every or 50, 50))
        pending: list[tuple[int, dict, float]] = []
        start_step = self.step
        t_rate0, s_rate0 = None, None

        def write_pending() -> None:
            nonlocal last, ema
            if not pending:
                return
            keys = sorted({k for _, st, _ in pending for k, v in st.items() if isinstance(v, torch.Tensor)})
            dev = next(v.device for _, st, _ in pending for v in st.values() if isinstance(v, torch.Tensor)) \
                if keys else None
            if keys:
                nan = torch.tensor(float("nan"), device=dev)
                mat = torch.stack([torch.stack([st[k].detach().float().reshape(()).to(dev) if k in st else nan
                                                for k in keys]) for _, st, _ in pending])
                if self.dist.enabled:  # the logged losses are the means over ranks (one all-reduce per flush)
                    mat = D.all_reduce_mean_(mat if self.dist.backend == "nccl" else mat.cpu())
                mat = mat.cpu().tolist()
            for j, (step, st, dt) in enumerate(pending):
                stats = {k: (v if not isinstance(v, torch.Tensor) else None) for k, v in st.items()}
                if keys:
                    stats.update({k: mat[j][i] for i, k in enumerate(keys) if k in st})
                stats["time_s"] = dt
                stats["samples_per_s"] = self.global_batch / max(dt, 1e-9)
                rec = {"step": step, **{k: _round(v) for k, v in stats.items()}}
                logf.write(json.dumps(rec) + "\n")
                self.history.append(rec)
                last = rec
                ema = stats["loss"] if ema is None else 0.9 * ema + 0.1 * stats["loss"]
                if t.log_every and step % t.log_every == 0:
                    msg = f"step {step}/{t.steps} " + " ".join(
                        f"{k}={v:.4g}" for k, v in stats.items() if k.startswith("loss"))
                    (bar.write if bar is not None else print)(msg)
            logf.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.4f}", avg=f"{ema:.4f}", lr=f"{last['lr']:.2e}", refresh=False)
            pending.clear()

        with open(log_path if main else os.devnull, "a") as logf:
            while self.step < end:
                ts = time.perf_counter()
                mbs = [next(it) for _ in range(t.accum_steps)]
                stats = self._train_step(mbs)
                pending.append((self.step, stats, time.perf_counter() - ts))
                if bar is not None:
                    bar.update(1)
                done = self.step - start_step
                if done == self._rate_skip:
                    t_rate0, s_rate0 = time.perf_counter(), self.step
                if self.step % flush == 0 or self.step >= end:
                    write_pending()
                if (t.time_budget_s > 0 and stop_at is None and t_rate0 is not None
                        and done in self._budget_probes):
                    per_step = (time.perf_counter() - t_rate0) / max(self.step - s_rate0, 1)
                    self._fit_to_budget(time.perf_counter() - t0, bar, per_step=per_step)
                    end = t.steps
                if t.save_every and self.step % t.save_every == 0 and self.step < t.steps:
                    write_pending()
                    self.save()
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                    write_pending()
                    self._run_val(bar)
            write_pending()
        if bar is not None:
            bar.close()
        self.save()
        val = self._run_val(None) if stop_at is None else {}
        if t.plot and main:
            plot_losses(log_path, self.out / "loss_curve.png")
        return {"step": self.step, "train": last, "val": val, "wall_s": time.perf_counter() - t0}

    # time budget: the step time is measured after the first `_rate_skip` steps of this fit() (start-up:
    # worker start, allocator / cuDNN warm-up, first-batch latency) and --steps is refitted at these
    # step counts (may grow back up to the requested --steps or shrink)
    _rate_skip = 10
    _budget_probes = (30, 80, 200, 500, 1000, 2000)

    def _fit_to_budget(self, elapsed: float, bar, per_step: float | None = None) -> None:
        """Fit the run to the wall-time budget (LR and overlap schedules are refitted to the new end)."""
        t = self.tcfg
        if not hasattr(self, "_requested_steps"):
            self._requested_steps = t.steps
        per_step = per_step if per_step is not None else elapsed / max(self.step, 1)
        # every rank must pick the same new end: rank 0's timing decides
        per_step, elapsed = D.broadcast_object((per_step, elapsed))
        n_eval_left = ((self._requested_steps - self.step) // t.eval_every) if t.eval_every else 0
        usable = t.time_budget_s * 0.97 - elapsed - 15.0 - 2.0 * n_eval_left
        new_total = int(self.step + max(usable, 0.0) / max(per_step, 1e-6))
        new_total = max(min(new_total, self._requested_steps), self.step + 1)
        if new_total == t.steps:
            return
        msg = (f"[fast3dis-train] {per_step * 1000:.0f} ms/step: --steps {t.steps} -> {new_total} "
               f"to fit the {t.time_budget_s:.0f}s budget")
        (bar.write if bar is not None else print)(msg)
        t.steps = new_total
        if bar is not None:
            bar.total = new_total
        self.scheduler.lr_lambdas = [cosine_warmup_lambda(new_total, t.warmup_steps, t.min_lr_ratio)
                                     for _ in self.optimizer.param_groups]
        sched = getattr(getattr(self.criterion, "cfg", None), "overlap", None)
        if sched is not None and hasattr(sched, "total"):
            sched.total = max(new_total, 2)
            sched.warmup = min(sched.warmup, max(1, new_total // 10))

    def _run_val(self, bar) -> dict[str, float]:
        """Validate on rank 0 (the other ranks wait at a barrier; the set is small)."""
        if not self.dist.is_main:
            D.barrier()
            return {}
        try:
            val = self.validate()
        finally:
            D.barrier()
        if val:
            with open(self.out / VAL_LOG, "a") as f:
                f.write(json.dumps({"step": self.step, **{k: _round(v) for k, v in val.items()}}) + "\n")
            msg = f"[val step {self.step}] " + " ".join(f"{k}={v:.4g}" for k, v in val.items())
            (bar.write if bar is not None else print)(msg)
        return val


# ---------------------------------------------------------------------------------- helpers
def _rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU and, when present, every CUDA device)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["cpu"])
    if st.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _to_float(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float(v) for v in x)
    return x


def _floats(d: dict[str, Any]) -> dict[str, float]:
    """0-d tensors -> python floats with one device->host transfer."""
    keys = [k for k, v in d.items() if isinstance(v, torch.Tensor)]
    out = {k: (float(v) if not isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    if keys:
        dev = d[keys[0]].device
        vals = torch.stack([d[k].detach().float().reshape(()).to(dev) for k in keys]).cpu().tolist()
        out.update(zip(keys, vals))
    return out


def _round(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else str(v)
    return v


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines after ``step`` (a resumed run rewrites them)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(l + "\n" for l in keep))


def plot_losses(log_path: Path, png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    recs = [json.loads(l) for l in Path(log_path).read_text().splitlines() if l.strip()]
    if not recs:
        return None
    keys = [k for k in recs[-1] if k.startswith("loss") and isinstance(recs[-1][k], (int, float))]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in recs]
    for k in keys:
        ys = [r.get(k, float("nan")) for r in recs]
        ax.plot(steps, ys, label=k, lw=2.0 if k == "loss" else 1.0)
    vpath = Path(log_path).with_name(VAL_LOG)
    if vpath.exists():
        vr = [json.loads(l) for l in vpath.read_text().splitlines() if l.strip()]
        if vr:
            ax.plot([r["step"] for r in vr], [r.get("val_loss", float("nan")) for r in vr], "ko--", label="val_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def quick_ap(outputs: dict, batch: dict, score_threshold: float = 0.05,
             deploy_threshold: float | None = None, mask_threshold: float = 0.5) -> dict[str, float]:
    """Cheap validation metrics of the first sample with fast3dis_ros.eval.metrics.

    Predictions come from the deployed postprocess (`inference.postprocess.instances_from_queries`: score =
    sigmoid(objectness) x mean mask probability inside the mask, queries with score > ``score_threshold``,
    per-pixel argmax of mask probability > ``mask_threshold``). AP ranks by score, so the low default
    threshold only drops hopeless queries; ``n_pred`` counts the kept instances and ``n_pred_deploy``
    those above ``deploy_threshold`` (the checkpoint's inference threshold; 0 there means the node would
    output nothing). ``ap2d``: per-view COCO mask AP; ``mv_AP``/``mv_AP50``/``mv_AP25``: class-agnostic ScanNet AP
    over all pixels of all views (ids are consistent across views, so this scores multi-view
    consistency like a 3D AP on the pixel point set); ``abs_rel``: depth (median scaled).

    (Before: objectness > 0.3 alone, argmax of objectness x mask probability -- with focal-alpha 0.25
    objectness rarely passed 0.3, which zeroed the AP.)
    """
    logits = outputs["pred_logits"][0].float()
    masks = outputs["pred_masks"][0].float()  # Q,V,Hm,Wm
    gt = batch["instance"][0].cpu().numpy()
    V, H, W = gt.shape
    labels, scores, _ = instances_from_queries(logits, masks, (H, W), score_threshold, mask_threshold)
    labels_np = labels.long().cpu().numpy()
    sc = scores.detach().float().cpu().numpy()
    res: dict[str, float] = {"n_pred": float(len(sc))}
    if deploy_threshold is not None:
        res["n_pred_deploy"] = float((sc > deploy_threshold).sum())
    try:
        r = metrics.mask_ap_2d(labels_np, sc, gt)
        res["ap2d"] = float(r["AP"])
        ev = metrics.InstanceAPEvaluator()
        ev.add_scene(labels_np.ravel(), sc, gt.ravel())
        r = ev.compute()
        res["mv_AP"] = float(r["AP"])
        res["mv_AP50"] = float(r["AP50"])
        res["mv_AP25"] = float(r["AP25"])
        if "depth" in batch:
            d = outputs["depth"][0].float()
            if tuple(d.shape[-2:]) != (H, W):
                d = torch.nn.functional.interpolate(d[None], size=(H, W), mode="bilinear", align_corners=False)[0]
            r = metrics.depth_metrics(d.cpu().numpy(), batch["depth"][0].cpu().numpy(), scale="global_median")
            res["abs_rel"] = float(r["abs_rel"])
    except Exception as e:  # metrics are a convenience here; never kill a training run
        res["metrics_error"] = float("nan")
        print(f"[quick_ap] metrics failed: {e!r}")
    return res
