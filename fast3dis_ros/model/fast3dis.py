"""The assembled FAST3DIS network: DA3 geometry pass + LoRA feature pass + anchored instance head.

``Fast3DIS(cfg).forward(images, K=None, T_cam_world=None)`` returns

* ``depth (B,V,H,W)``, ``depth_conf (B,V,H,W)``: from the adapter-free pass (plain DA3),
* ``intrinsics (B,V,3,3)``, ``extrinsics (B,V,4,4)`` (``T_cam_world``),
* ``pred_logits (B,Q)``, ``pred_masks (B,Q,V,Hm,Wm)``, ``anchors (B,Q,3)``, ``aux_outputs``: from
  ``InstanceHead`` fed with the LoRA features and the world point map lifted from depth,
* ``metric (B,)`` bool: depth/extrinsics are in the units of the given poses (True) or DA3 units.

World frame: without given poses it is view 0's camera (DA3 anchors its world at its reference
view, which its ``saddle_balanced`` strategy may choose anywhere among >= 3 views; we re-express
DA3's cameras relative to view 0, a rigid change that leaves depth untouched). With given poses
(``T_cam_world``, requires ``K``) the cameras are normalised as DA3's own API does (view 0 =
identity, median camera distance = 1), fed to DA3's camera encoder, and the outputs are mapped back
to the given world: extrinsics = the given poses, depth rescaled by median distance x a least-squares
fit of the predicted to the normalised camera centres.
With only ``K`` given, DA3 has no intrinsics-only conditioning: the given K replaces the predicted
intrinsics for lifting and in the outputs, depth stays DA3's. ``K`` may be partial: a view whose K holds
NaN (unknown, e.g. a camera without CameraInfo) keeps DA3's estimate, the others use theirs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from fast3dis_ros.model.da3.backbone import DA3Backbone, stage
from fast3dis_ros.model.config import Fast3disConfig
from fast3dis_ros.model.fastpath.accelerate import FastPathOptions, FastRunner, accelerate
from fast3dis_ros.model.fastpath.weight_dtype import store_weights_in
from fast3dis_ros.model.head.projection import rigid_inverse, unproject_depth  # noqa: F401 (re-exported; one lifting convention)
from fast3dis_ros.model.median import lower_median


def fast_path_weight_dtype(device: torch.device | str, dtype: torch.dtype | None) -> torch.dtype | None:
    """The ``weight_dtype`` the fast path compiles with: the reduced autocast dtype on a GPU, None otherwise
    (fp32, or the CPU, where the weights stay as they are)."""
    reduced = dtype is not None and dtype != torch.float32
    return dtype if reduced and torch.device(device).type == "cuda" else None


def normalize_extrinsics(T_cam_world: Tensor) -> tuple[Tensor, Tensor]:
    """DA3 API's normalisation: view 0 = identity, median camera-centre distance = 1 (per batch).

    Returns (T_norm (B,V,4,4), median_dist (B,)). ``T_cam_world = T_norm' @ inv(T_cam_world[:, :1])``
    with translations scaled back by ``median_dist``.
    """
    T = T_cam_world.float()
    T_norm = T @ rigid_inverse(T[:, :1])
    centres = rigid_inverse(T_norm)[..., :3, 3]  # (B,V,3)
    med = lower_median(centres.norm(dim=-1), dim=1).clamp(min=1e-1)  # DA3 clamps at 0.1
    T_norm = T_norm.clone()
    T_norm[..., :3, 3] = T_norm[..., :3, 3] / med[:, None, None]
    return T_norm, med


class Fast3DIS(nn.Module):
    def __init__(self, cfg: Fast3disConfig, backbone: DA3Backbone | None = None, head: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else DA3Backbone(cfg.backbone)
        if head is None:
            from fast3dis_ros.model.head.instance_head import InstanceHead

            head = InstanceHead(cfg.head)
        self.head = head
        if cfg.train_backbone:
            self.backbone.net.requires_grad_(True)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRA + head parameters, or every parameter when ``cfg.train_backbone``."""
        if self.cfg.train_backbone:
            return [p for p in self.parameters()]
        return self.backbone.lora_parameters() + list(self.head.parameters())

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a FAST3DIS checkpoint stores: LoRA + head (everything when ``train_backbone``)."""
        sd = self.state_dict()
        if self.cfg.train_backbone:
            return sd
        return {k: v for k, v in sd.items() if k.startswith("head.") or "lora_" in k}

    # ------------------------------------------------------------------ speed
    def compile_for_inference(self, blocks: bool = True, head: bool = True, merge_lora: bool = True,
                              dpt_bf16: bool = True, weight_dtype: torch.dtype | None = None,
                              chain: bool = True, fold_dpt_pe: bool = True, dpt_nhwc: bool = True) -> FastRunner:
        """Inference speed-ups that change outputs at rounding level only (measured in BENCHMARKS.md),
        installed in the backbone as its fast runner (``model/fastpath/accelerate.py``, which documents
        each option) plus a compiled instance head: DA3's DPT head in the autocast dtype instead of fp32
        (``dpt_bf16``), LoRA folded into a second weight copy (``merge_lora``), ``torch.compile`` of the
        DA3 ViT blocks, taps and DPT head (``blocks``) and of the instance head (``head``; one graph, no
        breaks). ``weight_dtype``: the autocast dtype the forward will run under (bf16 on a GPU); with
        ``blocks`` the ViT blocks' GEMM weights are stored in it and fc1 + GELU / q/k norm + RoPE fused,
        and both heads' weights too (DA3's only with ``dpt_bf16``). ``chain``: chained residual adds
        between blocks. ``fold_dpt_pe`` / ``dpt_nhwc``: the DPT head's layout options. Compilation
        happens at the first forward of each window shape (about two minutes for DA3-Large on the lent
        16-core host). Load weights first; training afterwards is unsupported. Returns the runner.
        """
        runner = accelerate(self.backbone, FastPathOptions(
            compile_blocks=blocks, compile_dpt=blocks, merge_lora=merge_lora,
            block_dtype=weight_dtype if blocks else None, chain=chain and blocks, head_autocast=dpt_bf16,
            head_dtype=weight_dtype if dpt_bf16 else None, fold_dpt_pe=fold_dpt_pe, dpt_nhwc=dpt_nhwc))
        if weight_dtype is not None:  # the instance head runs under autocast(weight_dtype) from here on
            store_weights_in(self.head, weight_dtype)
        if head:
            self.head.compile(dynamic=False)
        return runner

    # ------------------------------------------------------------------ forward
    def forward(
        self, images: Tensor, K: Tensor | None = None, T_cam_world: Tensor | None = None, return_aux: bool = True
    ) -> dict:
        """``return_aux``: also every earlier decoder layer's masks (deep supervision); inference skips them."""
        B, V, _, H, W = images.shape
        known_pose = T_cam_world is not None
        # with known poses every view's K must be finite as well; that is checked by the host-side callers
        # (``Predictor.predict_arrays``): checking values here would sync the device
        if known_pose and K is None:
            raise ValueError("known T_cam_world needs K of every view as well (DA3's camera encoder uses both)")
        T_in = None
        med = None
        if known_pose:
            T_in, med = normalize_extrinsics(T_cam_world)
        geo, feats = self.backbone.forward_both(
            images, K if known_pose else None, T_in, geometry_grad=self.cfg.train_backbone
        )
        depth, conf = geo["depth"], geo["depth_conf"]
        T_pred = geo["extrinsics"].float()
        T_pred = T_pred[:, 1:] @ rigid_inverse(T_pred[:, :1])  # world = view 0's camera
        eye = torch.eye(4, device=T_pred.device, dtype=T_pred.dtype).expand(B, 1, 4, 4)
        T_pred = torch.cat([eye, T_pred], dim=1)
        if known_pose:
            c_pred = rigid_inverse(T_pred)[..., :3, 3]
            c_norm = rigid_inverse(T_in)[..., :3, 3]
            num = (c_pred * c_norm).sum(dim=(1, 2))
            den = (c_pred * c_pred).sum(dim=(1, 2))
            fit = torch.where(den > 1e-8, num / den.clamp(min=1e-8), torch.ones_like(den)).clamp(min=1e-3)
            depth = depth * (fit * med)[:, None, None, None]
            extrinsics = T_cam_world.float()
        else:
            extrinsics = T_pred
        intrinsics = geo["intrinsics"].float()
        if K is not None:  # per view: a given (finite) K replaces the estimate, a NaN one keeps it
            known = torch.isfinite(K).flatten(-2).all(-1)[..., None, None]
            intrinsics = torch.where(known, torch.nan_to_num(K.float()), intrinsics)

        with stage("f3d.lift"):
            # fp32 lifting whatever the head's dtype: bf16 world coordinates would cost centimetres
            points = unproject_depth(depth.float(), intrinsics.float(), extrinsics.float())
        if not self.cfg.train_backbone:
            points = points.detach()
        with stage("f3d.instance_head"), self.backbone.runner.scope():  # the head compiles with the blocks
            head_out = self.head(feats, points, conf, intrinsics, extrinsics, (H, W), return_aux=return_aux)
        out = {
            "depth": depth,
            "depth_conf": conf,
            "intrinsics": intrinsics,
            "extrinsics": extrinsics,
            "points_world": points,
            "metric": torch.full((B,), known_pose, dtype=torch.bool, device=images.device),
        }
        out.update(head_out)
        return out
