"""Window -> WindowPrediction: resize, normalise, FAST3DIS forward, instance postprocessing.

Processing resolution: the long edge of view 0 is resized to ``process_size`` (default
``cfg.backbone.process_res``), aspect kept, each side rounded to the nearest multiple of 14 (DA3's
``upper_bound_resize``). All views of a window are resized to that same size (DA3 needs one size per
batch); known intrinsics are rescaled per axis with the pixel-centre-consistent rule.
Known intrinsics are passed per view: a view with K (from CameraInfo) uses it, a view without keeps the
network's estimate (``extras["K_known"]`` says which; a camera without CameraInfo no longer turns a
whole window uncalibrated). Poses (``CameraFrame.T_world_cam``) are passed only when every view has a
pose and a K; then depth/extrinsics are in the poses' units and ``depth_scale_metric`` is True;
otherwise depth is in DA3 units (up to scale).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from fast3dis_ros.geometry.cameras import scale_K
from fast3dis_ros.model.da3.backbone import PATCH_SIZE, normalize_images
from fast3dis_ros.model.config import Fast3disConfig
from fast3dis_ros.core.frames import Window, WindowPrediction, known_poses_of, stack_known
from fast3dis_ros.inference.postprocess import instances_from_queries
from fast3dis_ros.geometry.rig import rig_extrinsics_of

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}


def processing_hw(h: int, w: int, long_edge: int) -> tuple[int, int]:
    """DA3 upper-bound resize: long edge -> ``long_edge``, then nearest multiple of 14 per side."""
    s = long_edge / float(max(h, w))
    nh, nw = max(1, round(h * s)), max(1, round(w * s))

    def nearest(x: int) -> int:
        down = (x // PATCH_SIZE) * PATCH_SIZE
        up = down + PATCH_SIZE
        return max(PATCH_SIZE, up if abs(up - x) <= abs(x - down) else down)

    return nearest(nh), nearest(nw)


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == tuple(hw):
        return np.ascontiguousarray(img)
    import cv2

    up = hw[0] > img.shape[0] or hw[1] > img.shape[1]
    return cv2.resize(img, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC if up else cv2.INTER_AREA)


class Predictor:
    """Runs FAST3DIS on windows. Not thread-safe; one instance per engine worker."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Fast3disConfig,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        process_size: int | None = None,
        score_threshold: float | None = None,
        mask_threshold: float | None = None,
        cuda_graphs: bool = True,
        compile: bool = False,
        keep_mask_features: bool = False,
    ) -> None:
        """``keep_mask_features``: also return the pixel decoder's per-view mask features of each window
        as ``extras['mask_features']`` (V, C, h, w) float32 (the HDBSCAN baseline clusters them)."""
        self.device = torch.device(device)
        if isinstance(dtype, str) or dtype is None:
            dtype = _DTYPES[dtype] if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.dtype = dtype
        self.cfg = cfg
        self.model = model.to(self.device).eval()
        self.process_size = int(process_size or cfg.backbone.process_res)
        # known poses (CameraFrame.T_world_cam) condition the network (DA3's camera encoder) when True; they
        # always travel to fusion in WindowPrediction.T_world_cam_known
        self.condition_on_poses = True
        self.score_threshold = cfg.score_threshold if score_threshold is None else float(score_threshold)
        self.mask_threshold = cfg.mask_threshold if mask_threshold is None else float(mask_threshold)
        self.keep_mask_features = bool(keep_mask_features)
        if compile:  # fused kernels; compiled at the first window of each shape (model/fast3dis.py)
            from fast3dis_ros.model.fast3dis import fast_path_weight_dtype

            self.model.compile_for_inference(weight_dtype=fast_path_weight_dtype(self.device, self.dtype))
        # On CUDA each window shape is captured once and replayed (model/cuda_graph.py): at robot-sized
        # windows the eager forward is bound by kernel launches, not arithmetic.
        self.cuda_graphs = bool(cuda_graphs)
        self.graphed = None
        self._new_graphs()

    def _new_graphs(self) -> None:
        if self.cuda_graphs and self.device.type == "cuda":
            from fast3dis_ros.model.fastpath.cuda_graph import GraphedForward

            self.graphed = GraphedForward(self._forward_no_aux, amp_dtype=self.dtype)

    # ------------------------------------------------------------------ device residency (lifecycle)
    def release_device(self) -> None:
        """Free accelerator memory while the node is inactive (lifecycle deactivate): the weights move to
        host memory (activating again needs no disk read), the captured CUDA graphs and the allocator's
        cache are dropped. No-op on CPU."""
        if self.device.type != "cuda":
            return
        self.graphed = None
        self.model.to("cpu")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def restore_device(self) -> None:
        """Undo ``release_device`` (lifecycle activate); graphs are recaptured at the first window."""
        if self.device.type != "cuda" or next(self.model.parameters()).device.type == "cuda":
            return
        self.model.to(self.device)
        self._new_graphs()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", dtype: str | torch.dtype | None = None, **kw) -> "Predictor":
        from fast3dis_ros.model.checkpoint import load_checkpoint

        da3 = kw.pop("da3_weights", None)
        model, cfg = load_checkpoint(path, device=device, da3_weights=da3)
        return cls(model, cfg, device=device, dtype=dtype, **kw)

    @classmethod
    def random_tiny(cls, seed: int = 0, device: str = "cpu", **kw) -> "Predictor":
        """Random-weight tiny network (tests, demo fallback when no checkpoint is available)."""
        from fast3dis_ros.model.fast3dis import Fast3DIS

        torch.manual_seed(seed)
        cfg = Fast3disConfig.tiny()
        return cls(Fast3DIS(cfg), cfg, device=device, **kw)

    # ------------------------------------------------------------------ inference
    def _forward_no_aux(self, images, K=None, T_cam_world=None) -> dict:
        return self.model(images, K=K, T_cam_world=T_cam_world, return_aux=False)

    def predict(self, window: Window) -> WindowPrediction:
        views = window.views
        Ks = [v.K for v in views]
        poses = [v.T_world_cam for v in views]
        K = stack_known(Ks, (3, 3))  # unknown views: NaN, the network estimates their K
        all_K = all(k is not None for k in Ks)
        T_world_cam = np.stack(poses) if all_K and all(p is not None for p in poses) else None
        known = known_poses_of(views)
        if not self.condition_on_poses:
            T_world_cam = None
        pred = self._predict(
            [v.image for v in views],
            K,
            None if T_world_cam is None else np.linalg.inv(T_world_cam),
            window_index=window.index,
            stamp_ns=window.stamp_ns,
            cameras=[v.camera for v in views],
            frame_ids=[v.frame_id for v in views],
            view_stamps_ns=[int(v.stamp_ns) for v in views],
        )
        pred.T_world_cam_known = known
        # known rig extrinsics: DA3 conditions on full camera poses only (every view, across time), which a
        # rig alone does not give; they go to fusion (metric scale, relative poses inside a frame set)
        pred.T_rig_cam_known = rig_extrinsics_of(views)
        return pred

    def predict_arrays(
        self, images: np.ndarray | Sequence[np.ndarray], K: np.ndarray | None = None, poses: np.ndarray | None = None
    ) -> WindowPrediction:
        """``images (V,H,W,3) uint8``; ``K (V,3,3)`` at input resolution; ``poses (V,4,4)`` T_world_cam."""
        images = list(images)
        V = len(images)
        T_cam_world = None if poses is None else np.linalg.inv(np.asarray(poses, dtype=np.float64))
        if T_cam_world is not None and (K is None or not np.isfinite(np.asarray(K, dtype=np.float64)).all()):
            raise ValueError("poses need K of every view as well")
        return self._predict(
            images, None if K is None else np.asarray(K, dtype=np.float64), T_cam_world,
            window_index=0, stamp_ns=0, cameras=[f"cam{i}" for i in range(V)], frame_ids=[""] * V,
            view_stamps_ns=[0] * V,
        )

    def _predict(self, images, K, T_cam_world, **meta) -> WindowPrediction:
        t0 = time.perf_counter()
        H0, W0 = images[0].shape[:2]
        hw = processing_hw(H0, W0, self.process_size)
        imgs = np.stack([_resize(np.asarray(im, dtype=np.uint8), hw) for im in images])  # (V,H,W,3)
        K_proc = None
        if K is not None:
            K_proc = np.stack([scale_K(k, im.shape[:2], hw) for k, im in zip(K, images)])
        dev = self.device
        x = torch.from_numpy(imgs).to(dev, non_blocking=True).permute(0, 3, 1, 2)
        x = normalize_images(x)[None]  # (1,V,3,H,W)
        K_t = None if K_proc is None else torch.from_numpy(K_proc).float().to(dev)[None]
        T_t = None if T_cam_world is None else torch.from_numpy(np.asarray(T_cam_world)).float().to(dev)[None]
        use_amp = self.dtype != torch.float32
        with torch.inference_mode(), torch.autocast(dev.type, dtype=self.dtype, enabled=use_amp):
            if self.graphed is not None:  # static outputs: read below, before the next window
                out = self.graphed(x, K=K_t, T_cam_world=T_t)
            else:
                out = self._forward_no_aux(x, K=K_t, T_cam_world=T_t)
            labels, scores, qidx = instances_from_queries(
                out["pred_logits"][0], out["pred_masks"][0], hw, self.score_threshold, self.mask_threshold
            )
        K_out = out["intrinsics"][0].double().cpu().numpy()
        K_known = np.zeros(len(images), bool)
        if K_proc is not None:  # given K in float64 (the network's copy is float32)
            K_known = np.isfinite(K_proc).reshape(len(images), -1).all(1)
            K_out[K_known] = K_proc[K_known]
        pred = WindowPrediction(
            images=imgs,
            depth=out["depth"][0].float().cpu().numpy(),
            depth_conf=out["depth_conf"][0].float().cpu().numpy(),
            K=K_out.astype(np.float64),
            T_cam_world=(
                np.asarray(T_cam_world, dtype=np.float64) if T_cam_world is not None
                else out["extrinsics"][0].double().cpu().numpy()
            ),
            labels=labels.cpu().numpy().astype(np.int32),
            scores=scores.float().cpu().numpy().astype(np.float32),
            depth_scale_metric=T_cam_world is not None,
            extras={"query_index": qidx.cpu().numpy(), "process_hw": hw, "K_known": K_known},
            **meta,
        )
        if self.keep_mask_features:  # read from the (possibly graph-static) outputs before the next window
            pred.extras["mask_features"] = out["mask_features"][0].float().cpu().numpy()
        pred.engine_ms = (time.perf_counter() - t0) * 1000.0
        return pred
