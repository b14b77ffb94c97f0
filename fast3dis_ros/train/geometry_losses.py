"""Geometry supervision for end-to-end training (depth, camera poses, intrinsics).

Used when the whole network is trained (``--full-finetune``, the tiny configuration) so the DA3-style
geometry head learns depth and cameras along with the instance decoder. Predictions follow the
FAST3DIS output contract (docs/ARCHITECTURE.md): ``depth (B,V,H,W)``, ``depth_conf (B,V,H,W)``,
``intrinsics (B,V,3,3)``, ``extrinsics (B,V,4,4)`` = ``T_cam_world`` with world = first view (DA3).

Everything is scale-invariant by default, because any-view DA3 predicts depth and translations up to one
global scale per sample: both prediction and ground truth are normalised by their own per-sample scale
(geometric mean of valid depths), and that *same* scale normalises the camera translations, so depth
and poses stay mutually consistent.

- depth: L1 on normalised log depth, optionally confidence-weighted as DA3/DUSt3R do
  (``c * |r| - alpha * log c``); zero for perfect predictions with ``c == 1``.
- pose: ground-truth and predicted extrinsics are re-expressed relative to the first view
  (``T_ci_c0 = T_ci_w @ inv(T_c0_w)``); L1 on the scale-normalised translation + rotation geodesic
  angle (radians).
- intrinsics: L1 on log focal lengths + L1 on the principal point divided by the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "relative_to_first",
    "rotation_geodesic",
    "depth_log_scale",
    "depth_loss",
    "pose_loss",
    "intrinsics_loss",
    "GeometryLoss",
]

_EPS = 1e-6


def _invert_se3(T: torch.Tensor) -> torch.Tensor:
    R = T[..., :3, :3]
    t = T[..., :3, 3:]
    Rt = R.transpose(-1, -2)
    out = torch.zeros_like(T)
    out[..., :3, :3] = Rt
    out[..., :3, 3:] = -Rt @ t
    out[..., 3, 3] = 1.0
    return out


def relative_to_first(T_cam_world: torch.Tensor) -> torch.Tensor:
    """(B,V,4,4) extrinsics -> (B,V,4,4) ``T_ci_c0`` (first view becomes identity)."""
    return T_cam_world @ _invert_se3(T_cam_world[:, :1])


def rotation_geodesic(R_a: torch.Tensor, R_b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle (radians) between rotation matrices (..., 3, 3); stable gradients near 0 and pi."""
    R = R_a.transpose(-1, -2) @ R_b
    cos = (R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1.0) * 0.5
    vee = torch.stack(
        [R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], dim=-1
    )
    sin = 0.5 * torch.sqrt((vee * vee).sum(-1) + 1e-12) - 0.5e-6
    return torch.atan2(sin.clamp_min(0.0), cos)


def _valid_mask(depth_gt: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    m = torch.isfinite(depth_gt) & (depth_gt > _EPS)
    if valid is not None:
        m = m & valid.bool()
    return m


def depth_log_scale(depth: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of log depth over valid pixels: (B,V,H,W) -> (B,)."""
    logd = torch.log(depth.clamp_min(_EPS))
    w = valid.to(logd.dtype)
    return (logd * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1.0)


def _resize_like(x: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    B, V = x.shape[:2]
    y = F.interpolate(x.reshape(B * V, 1, *x.shape[-2:]).float(), size=hw, mode=mode)
    return y.reshape(B, V, *hw)


def depth_loss(
    depth_pred: torch.Tensor,
    depth_gt: torch.Tensor,
    conf: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    *,
    scale_invariant: bool = True,
    conf_alpha: float = 0.2,
) -> torch.Tensor:
    """Depth loss on log depth. ``conf`` (>0) weights the residual as DA3 does (``c|r| - alpha log c``).

    With ``scale_invariant`` the per-sample geometric-mean scale is removed from both sides.
    Returns a scalar (mean over valid pixels of the batch).
    """
    depth_pred = depth_pred.float()
    depth_gt = _resize_like(depth_gt.float(), depth_pred.shape[-2:], "nearest")
    if valid is not None:
        valid = _resize_like(valid.float(), depth_pred.shape[-2:], "nearest") > 0.5
    m = _valid_mask(depth_gt, valid)
    depth_gt = torch.where(m, depth_gt, torch.ones_like(depth_gt))
    lp = torch.log(depth_pred.clamp_min(_EPS))
    lg = torch.log(depth_gt)
    if scale_invariant:
        lp = lp - depth_log_scale(depth_pred, m)[:, None, None, None]
        lg = lg - depth_log_scale(depth_gt, m)[:, None, None, None]
    r = (lp - lg).abs()
    if conf is not None:
        c = _resize_like(conf.float(), depth_pred.shape[-2:], "bilinear").clamp_min(_EPS)
        per_px = c * r - conf_alpha * torch.log(c)
    else:
        per_px = r
    w = m.to(per_px.dtype)
    return (per_px * w).sum() / w.sum().clamp_min(1.0)


def pose_loss(
    T_pred: torch.Tensor,
    T_gt: torch.Tensor,
    scale_pred: torch.Tensor | None = None,
    scale_gt: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(translation L1, rotation geodesic) between (B,V,4,4) extrinsics, both taken relative to view 0.

    ``scale_*`` (B,) divide the translations (scale-invariant poses); None = metric.
    The first view (identity on both sides after re-expression) is excluded when V > 1.
    """
    Tp = relative_to_first(T_pred.float())
    Tg = relative_to_first(T_gt.float())
    tp, tg = Tp[..., :3, 3], Tg[..., :3, 3]
    if scale_pred is not None:
        tp = tp / scale_pred.float()[:, None, None]
    if scale_gt is not None:
        tg = tg / scale_gt.float()[:, None, None]
    sl = slice(1, None) if Tp.shape[1] > 1 else slice(None)
    lt = (tp[:, sl] - tg[:, sl]).abs().sum(-1).mean()
    lr = rotation_geodesic(Tp[:, sl, :3, :3], Tg[:, sl, :3, :3]).mean()
    return lt, lr


def intrinsics_loss(K_pred: torch.Tensor, K_gt: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """|log fx_p/fx_g| + |log fy_p/fy_g| + L1 of the principal point / image size, (B,V,3,3) intrinsics
    of an HxW image. Log ratios keep the loss bounded for wild (random-init) focal lengths."""
    H, W = hw
    Kp, Kg = K_pred.float(), K_gt.float()
    lf = (torch.log(Kp[..., 0, 0].abs().clamp_min(1e-3)) - torch.log(Kg[..., 0, 0].abs().clamp_min(1e-3))).abs()
    lf = lf + (torch.log(Kp[..., 1, 1].abs().clamp_min(1e-3)) - torch.log(Kg[..., 1, 1].abs().clamp_min(1e-3))).abs()
    lc = ((Kp[..., 0, 2] - Kg[..., 0, 2]) / W).abs() + ((Kp[..., 1, 2] - Kg[..., 1, 2]) / H).abs()
    return (lf + lc.clamp_max(10.0)).mean()


class GeometryLoss(torch.nn.Module):
    """Weighted sum of depth, pose and intrinsics losses on a FAST3DIS output dict.

    ``forward(outputs, batch)`` -> dict with ``loss_depth``, ``loss_trans``, ``loss_rot``, ``loss_K``
    (each already multiplied by its weight) and ``loss_geometry`` (their sum). ``batch`` needs
    ``depth (B,V,H,W)``, ``K (B,V,3,3)`` (for the model's image size) and ``T_cam_world (B,V,4,4)``;
    missing keys skip the corresponding term.
    """

    def __init__(
        self,
        w_depth: float = 1.0,
        w_trans: float = 1.0,
        w_rot: float = 1.0,
        w_K: float = 0.5,
        *,
        scale_invariant: bool = True,
        use_conf: bool = True,
        conf_alpha: float = 0.2,
    ) -> None:
        super().__init__()
        self.w_depth, self.w_trans, self.w_rot, self.w_K = w_depth, w_trans, w_rot, w_K
        self.scale_invariant = scale_invariant
        self.use_conf = use_conf
        self.conf_alpha = conf_alpha

    def forward(self, outputs: dict, batch: dict) -> dict[str, torch.Tensor]:
        dev = outputs["depth"].device
        zero = torch.zeros((), device=dev)
        out = {"loss_depth": zero, "loss_trans": zero, "loss_rot": zero, "loss_K": zero}
        depth_pred = outputs["depth"].float()
        hw = tuple(depth_pred.shape[-2:])
        sp = sg = None
        if batch.get("depth") is not None:
            dg = _resize_like(batch["depth"].float().to(dev), hw, "nearest")
            m = _valid_mask(dg, batch.get("valid"))
            dg_safe = torch.where(m, dg, torch.ones_like(dg))
            conf = outputs.get("depth_conf") if self.use_conf else None
            out["loss_depth"] = self.w_depth * depth_loss(
                depth_pred, dg_safe, conf, m, scale_invariant=self.scale_invariant, conf_alpha=self.conf_alpha
            )
            if self.scale_invariant:
                sp = torch.exp(depth_log_scale(depth_pred, m))
                sg = torch.exp(depth_log_scale(dg_safe, m))
        if batch.get("T_cam_world") is not None and outputs.get("extrinsics") is not None:
            lt, lr = pose_loss(outputs["extrinsics"], batch["T_cam_world"].to(dev), sp, sg)
            out["loss_trans"] = self.w_trans * lt
            out["loss_rot"] = self.w_rot * lr
        if batch.get("K") is not None and outputs.get("intrinsics") is not None and self.w_K > 0:
            img_hw = tuple(batch["images"].shape[-2:]) if batch.get("images") is not None else hw
            out["loss_K"] = self.w_K * intrinsics_loss(outputs["intrinsics"], batch["K"].to(dev), img_hw)
        out["loss_geometry"] = out["loss_depth"] + out["loss_trans"] + out["loss_rot"] + out["loss_K"]
        return out
