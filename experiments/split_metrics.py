"""What the LoRA split study measures per split: cost figures of the network and pooled AP on test windows.

Cost (no training needed): which ViT blocks carry LoRA, how many run once and are shared by both passes,
trainable parameters (LoRA + instance head), and the FLOPs of the DA3 ViT trunk per window for both
passes (``fast3dis_ros.bench.suite.vit_flops``: blocks ``>= first_lora_block`` run twice; LoRA's own rank-r
GEMMs are left out, < 1% at rank 4).

Accuracy: each test window (one synthetic scene: cameras x frames views) is one "scene" of a pooled
class-agnostic ScanNet AP (``eval.metrics.InstanceAPEvaluator``, as ``eval.heldout``'s per-window
protocol), predictions from the deployed postprocess (``model.postprocess.instances_from_queries``) with a
low score threshold (AP ranks by score), as the training loop's ``quick_ap``. The ScanNet matching is per
scene, so each window's matches are computed once and a bootstrap over windows only re-pools them
(``PooledAP.bootstrap``): 500 resamples of 96 windows take a few seconds, and the same resamples for every split give
paired confidence intervals of the AP differences between splits.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["SplitCost", "split_cost", "PooledAP", "score_checkpoint", "time_forward"]


@dataclass
class SplitCost:
    split: int  # first_lora_block
    lora_blocks: list[int]
    shared_blocks: int  # ViT blocks run once for both passes
    trunk_blocks: int  # blocks up to the last tap
    trainable_params: int
    lora_params: int
    head_params: int
    trunk_gflops: float  # both passes, one window (B=1)
    da3_gflops: float  # one plain DA3 pass over the same blocks, for scale

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_cost(cfg: Any, split: int, views: int, height: int, width: int) -> SplitCost:
    """Cost figures of ``cfg`` with ``first_lora_block = split`` (random weights: only shapes matter)."""
    from fast3dis_ros.bench.suite import vit_flops
    from fast3dis_ros.model.fast3dis import Fast3DIS

    cfg = copy.deepcopy(cfg)
    cfg.backbone.first_lora_block = int(split)
    cfg.backbone.pretrained = None
    cfg.train_backbone = False
    model = Fast3DIS(cfg)
    bb = model.backbone
    last = max(bb.out_layers) + 1
    lora = sum(p.numel() for p in bb.lora_parameters())
    head = sum(p.numel() for p in model.head.parameters())
    # after injection the adapted linears are peft layers, so read the blocks off the LoRA parameters
    blocks = sorted({int(n.split("blocks.", 1)[1].split(".", 1)[0]) for n, _ in bb.net.named_parameters()
                     if "lora_" in n})
    return SplitCost(
        split=int(split), lora_blocks=blocks, shared_blocks=min(bb.lora_start, last), trunk_blocks=last,
        trainable_params=sum(p.numel() for p in model.trainable_parameters()), lora_params=lora, head_params=head,
        trunk_gflops=vit_flops(bb, views, height, width, bb.lora_start) / 1e9,
        da3_gflops=vit_flops(bb, views, height, width, None) / 1e9,
    )


# ---------------------------------------------------------------------------------------------- AP
class PooledAP:
    """Pooled ScanNet AP over windows with a cheap bootstrap over windows.

    ``add`` keeps each window's per-scene statistics in an ``InstanceAPEvaluator``; for every IoU threshold
    the ScanNet matching of each window is computed once (``InstanceAPEvaluator.scene_matches``: the
    matching is per scene), so a resample only pools the windows' matches and runs the AP integral
    (``eval.metrics.ap_from_matches``, the reduction ``InstanceAPEvaluator.compute()`` itself uses).
    ``compute()`` equals ``InstanceAPEvaluator.compute()`` over the same windows (tested).
    """

    def __init__(self) -> None:
        from fast3dis_ros.eval.metrics import InstanceAPEvaluator

        self._ev = InstanceAPEvaluator()
        self._matches: dict[float, list] | None = None

    def __len__(self) -> int:
        return len(self._ev.scenes)

    def add(self, pred_labels: np.ndarray, scores: np.ndarray, gt_labels: np.ndarray) -> None:
        self._ev.add_scene(np.asarray(pred_labels).ravel(), np.asarray(scores), np.asarray(gt_labels).ravel())
        self._matches = None

    def _window_matches(self) -> dict[float, list]:
        if self._matches is None:
            self._matches = {t: self._ev.scene_matches(t) for t in self._ev.evaluated_thresholds()}
        return self._matches

    def compute(self, idx: Sequence[int] | None = None) -> dict[str, float]:
        """AP / AP50 / AP25 over the windows ``idx`` (default all; repeats allowed)."""
        from fast3dis_ros.eval.metrics import ap_from_matches, ap_summary

        m = self._window_matches()
        idx = range(len(self)) if idx is None else idx
        per_th = {f"{t:.2f}": ap_from_matches([rows[i] for i in idx])[0] for t, rows in m.items()}
        return {k: float(v) for k, v in ap_summary(per_th, self._ev.iou_thresholds).items()}

    def bootstrap(self, resamples: np.ndarray) -> dict[str, np.ndarray]:
        """AP / AP50 / AP25 for each row of window indices ``resamples (R, n)``."""
        rows = [self.compute(r) for r in resamples]
        return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in ("AP", "AP50", "AP25")}


@torch.no_grad()
def score_checkpoint(ckpt_dir: str | Path, windows, device: torch.device, amp: torch.dtype | None,
                     score_threshold: float = 0.05, batch_size: int = 8) -> tuple[PooledAP, dict[str, Any]]:
    """Run the checkpoint on every test window; returns the pooled AP and the loaded model's info."""
    from fast3dis_ros.model.checkpoint import load_checkpoint
    from fast3dis_ros.inference.postprocess import instances_from_queries
    from fast3dis_ros.train.data import collate
    from fast3dis_ros.train.loop import autocast_ctx

    model, cfg = load_checkpoint(ckpt_dir, device=device)
    pooled = PooledAP()
    n_pred = 0
    for start in range(0, len(windows), batch_size):
        batch = collate([windows[i] for i in range(start, min(start + batch_size, len(windows)))])
        with autocast_ctx(device, amp):
            out = model(batch["images"].to(device), return_aux=False)
        V, H, W = batch["instance"].shape[1:]
        for b in range(batch["images"].shape[0]):
            labels, scores, _ = instances_from_queries(out["pred_logits"][b].float(), out["pred_masks"][b].float(),
                                                       (H, W), score_threshold, cfg.mask_threshold)
            pooled.add(labels.cpu().numpy(), scores.float().cpu().numpy(), batch["instance"][b].numpy())
            n_pred += int(scores.numel())
    return pooled, {"model": model, "cfg": cfg, "n_pred": n_pred}


def time_forward(model: torch.nn.Module, window: dict, device: torch.device, amp: torch.dtype | None,
                 warmup: int = 3, iters: int = 10) -> float:
    """Median ms of one eager forward (one window, B=1) with ``fast3dis_ros.bench.suite.measure``."""
    from fast3dis_ros.bench.suite import measure
    from fast3dis_ros.train.loop import autocast_ctx

    images = window["images"][None].to(device)

    def fn():
        with torch.no_grad(), autocast_ctx(device, amp):
            model(images, return_aux=False)

    r = measure(fn, device, warmup, iters)
    return float(r["ms"]) if isinstance(r.get("ms"), (int, float)) else float("nan")
