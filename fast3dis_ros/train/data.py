"""Training data plumbing: sample standardisation, resize, augmentation, deterministic sampling.

Samples from ``fast3dis_ros.data.datasets`` are dicts with ``images`` (V,H,W,3 uint8 or V,3,H,W float),
``depth (V,H,W)``, ``instance (V,H,W)`` (ids consistent across views), ``K (V,3,3)`` and
``T_cam_world (V,4,4)``. ``TrainSampleDataset`` wraps any such map-style dataset and returns, for a key
``(index, aug_seed)``, a fixed-size torch sample:

* ``images (V,3,H,W)`` float32, normalised with the ImageNet mean/std that DA3 expects,
* ``depth (V,H,W)`` float32 (0 = invalid), ``instance (V,H,W)`` int64,
* ``K (V,3,3)`` rescaled to the output size, ``T_cam_world (V,4,4)``.

Augmentation (training only) is seeded by ``aug_seed`` alone, so an interrupted run that resumes at step
``k`` sees exactly the same data as an uninterrupted one: colour jitter per view and a random view order
(geometry ground truth is permuted with the images; poses stay ``T_cam_world`` of the permuted views).

``ResumableSampler`` yields ``(index, aug_seed)`` keys for positions ``start, start+1, ...`` of an
endless stream of per-epoch permutations (seeded by ``seed`` and the epoch), so the data position of a
resumed run is a pure function of the step.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "standardise_sample",
    "resize_sample",
    "augment_sample",
    "TrainSampleDataset",
    "eval_windows",
    "ResumableSampler",
    "collate",
    "TargetCollate",
]

from fast3dis_ros.model.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402  (one definition)


def _t(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(x))
    return t.to(dtype) if dtype is not None else t


def standardise_sample(s: dict) -> dict[str, torch.Tensor]:
    """Any dataset sample -> torch dict with images (V,3,H,W) float in [0,1] (not yet normalised)."""
    imgs = _t(s["images"])
    if imgs.dim() == 3:  # one view
        imgs = imgs[None]
    if imgs.shape[-1] == 3 and imgs.shape[1] != 3:  # V,H,W,3 -> V,3,H,W
        imgs = imgs.permute(0, 3, 1, 2)
    if imgs.dtype == torch.uint8:
        imgs = imgs.float() / 255.0
    else:
        imgs = imgs.float()
        if bool(s.get("normalized", False)):
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            imgs = imgs * std + mean
        elif imgs.max() > 1.5:
            imgs = imgs / 255.0
    V, _, H, W = imgs.shape
    out: dict[str, torch.Tensor] = {"images": imgs.contiguous()}
    inst = s.get("instance", s.get("instances"))
    out["instance"] = _t(inst).long().reshape(V, H, W) if inst is not None else torch.zeros(V, H, W, dtype=torch.long)
    if s.get("depth") is not None:
        d = _t(s["depth"], torch.float32).reshape(V, H, W)
        out["depth"] = torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    if s.get("depth_valid") is not None and "depth" in out:
        out["depth"] = torch.where(_t(s["depth_valid"]).bool().reshape(V, H, W), out["depth"],
                                   torch.zeros_like(out["depth"]))
    if s.get("K") is not None:
        out["K"] = _t(s["K"], torch.float32).reshape(V, 3, 3)
    T = s.get("T_cam_world")
    if T is None and s.get("T_world_cam") is not None:
        T = torch.linalg.inv(_t(s["T_world_cam"], torch.float64))
    if T is not None:
        out["T_cam_world"] = _t(T, torch.float32).reshape(V, 4, 4)
    return out


def resize_sample(s: dict[str, torch.Tensor], hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Resize all per-pixel fields to ``hw`` (images bilinear+antialias, depth/instance nearest)."""
    H0, W0 = s["images"].shape[-2:]
    H, W = int(hw[0]), int(hw[1])
    if (H0, W0) == (H, W):
        return s
    out = dict(s)
    out["images"] = F.interpolate(s["images"], size=(H, W), mode="bilinear", align_corners=False, antialias=True)
    out["instance"] = F.interpolate(s["instance"][:, None].float(), size=(H, W), mode="nearest")[:, 0].long()
    if "depth" in s:
        out["depth"] = F.interpolate(s["depth"][:, None], size=(H, W), mode="nearest")[:, 0]
    if "K" in s:
        K = s["K"].clone()
        sx, sy = W / W0, H / H0
        K[:, 0, :] *= sx
        K[:, 1, :] *= sy
        # pixel-centre convention: c' = (c + 0.5) * s - 0.5
        K[:, 0, 2] += 0.5 * sx - 0.5
        K[:, 1, 2] += 0.5 * sy - 0.5
        out["K"] = K
    return out


def augment_sample(
    s: dict[str, torch.Tensor], rng: np.random.Generator, *, jitter: float = 0.2, shuffle_views: bool = True
) -> dict[str, torch.Tensor]:
    """Colour jitter (brightness, contrast, saturation per view) + random view order."""
    out = dict(s)
    imgs = s["images"]
    V = imgs.shape[0]
    if jitter > 0:
        b = torch.as_tensor(rng.uniform(1 - jitter, 1 + jitter, V), dtype=imgs.dtype).view(V, 1, 1, 1)
        c = torch.as_tensor(rng.uniform(1 - jitter, 1 + jitter, V), dtype=imgs.dtype).view(V, 1, 1, 1)
        sat = torch.as_tensor(rng.uniform(1 - jitter, 1 + jitter, V), dtype=imgs.dtype).view(V, 1, 1, 1)
        imgs = imgs * b
        mean = imgs.mean(dim=(1, 2, 3), keepdim=True)
        imgs = (imgs - mean) * c + mean
        gray = (0.299 * imgs[:, 0:1] + 0.587 * imgs[:, 1:2] + 0.114 * imgs[:, 2:3])
        imgs = (imgs - gray) * sat + gray
        imgs = imgs.clamp(0.0, 1.0)
    out["images"] = imgs
    if shuffle_views and V > 1:
        perm = torch.as_tensor(rng.permutation(V))
        for k in ("images", "instance", "depth", "K", "T_cam_world"):
            if k in out:
                out[k] = out[k][perm]
    return out


def normalise_images(imgs: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=imgs.dtype, device=imgs.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=imgs.dtype, device=imgs.device).view(3, 1, 1)
    return (imgs - mean) / std


class TrainSampleDataset(Dataset):
    """Wrap a dataset of samples; ``ds[(index, aug_seed)]`` -> fixed-size, normalised torch sample."""

    def __init__(
        self,
        base: Sequence[dict] | Dataset,
        hw: tuple[int, int],
        *,
        augment: bool = True,
        jitter: float = 0.2,
        shuffle_views: bool = True,
        num_views: int | None = None,
    ) -> None:
        self.base = base
        self.hw = (int(hw[0]), int(hw[1]))
        self.augment = augment
        self.jitter = jitter
        self.shuffle_views = shuffle_views
        self.num_views = num_views

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        idx, aug_seed = (key, None) if isinstance(key, (int, np.integer)) else key
        s = standardise_sample(self.base[int(idx)])
        if self.num_views is not None and s["images"].shape[0] > self.num_views:
            s = {k: v[: self.num_views] for k, v in s.items()}
        s = resize_sample(s, self.hw)
        if self.augment and aug_seed is not None:
            s = augment_sample(s, np.random.default_rng(int(aug_seed)), jitter=self.jitter,
                               shuffle_views=self.shuffle_views)
        s["images"] = normalise_images(s["images"])
        return s


class ResumableSampler(Sampler):
    """Endless stream of ``(index, aug_seed)`` from per-epoch permutations, starting at ``start``."""

    def __init__(self, n: int, seed: int = 0, start: int = 0, length: int | None = None, shuffle: bool = True):
        if n <= 0:
            raise ValueError("empty dataset")
        self.n, self.seed, self.start, self.length, self.shuffle = n, int(seed), int(start), length, shuffle
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def key(self, pos: int) -> tuple[int, int]:
        epoch, i = divmod(int(pos), self.n)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._perm_epoch = epoch
        aug_seed = int(np.random.default_rng([self.seed, 7919, int(pos)]).integers(0, 2**31 - 1))
        return int(self._perm[i]), aug_seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = self.start
        while self.length is None or pos < self.start + self.length:
            yield self.key(pos)
            pos += 1

    def __len__(self) -> int:
        return self.length if self.length is not None else 2**62


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    keys = set(samples[0])
    for s in samples[1:]:
        keys &= set(s)
    return {k: torch.stack([s[k] for s in samples]) for k in sorted(keys)}


class TargetCollate:
    """``collate`` + set-prediction targets built in the DataLoader worker (picklable).

    Adds ``tgt_masks (B, G, V, Hm, Wm)`` bool (padded to the largest instance count G of the batch),
    ``tgt_valid (B, G)`` bool and ``tgt_count (B,)`` int64 -- `fast3dis_ros.train.targets.build_targets`
    at the decoder's mask resolution ``mask_hw`` -- so the training process does no per-sample target
    work and the criterion runs on padded, batched tensors (no host syncs for target handling).
    """

    def __init__(self, mask_hw: tuple[int, int], max_instances: int | None = None, min_cover: float = 0.5) -> None:
        self.mask_hw = (int(mask_hw[0]), int(mask_hw[1]))
        self.max_instances = max_instances
        self.min_cover = float(min_cover)

    def __call__(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from fast3dis_ros.train.targets import build_targets

        batch = collate(samples)
        with torch.no_grad():
            tl = build_targets(batch["instance"], self.mask_hw, max_instances=self.max_instances,
                               min_cover=self.min_cover)
        B = len(tl)
        V = batch["instance"].shape[1]
        G = max([int(t["ids"].numel()) for t in tl] + [0])
        masks = torch.zeros((B, G, V, *self.mask_hw), dtype=torch.bool)
        valid = torch.zeros((B, G), dtype=torch.bool)
        count = torch.zeros((B,), dtype=torch.int64)
        for b, t in enumerate(tl):
            g = int(t["ids"].numel())
            masks[b, :g] = t["masks"]
            valid[b, :g] = True
            count[b] = g
        batch.update(tgt_masks=masks, tgt_valid=valid, tgt_count=count)
        return batch


class SceneWindowDataset(Dataset):
    """Windows of ``frames_per_sample`` consecutive frames x all cameras from in-memory synthetic scenes.

    Views are ordered frame-major (f0: cam0..camC-1, f1: ...). Works on ``SyntheticScene`` objects of
    fast3dis_ros.data.synthetic (``scene.frames[frame][camera]`` with rgb/depth/instance/K/T_world_cam).
    Arrays are packed per scene once (uint8 rgb, float32 depth, int32 instance).
    """

    def __init__(self, scenes: Sequence[Any], frames_per_sample: int = 2, frame_stride: int = 1,
                 window_step: int = 1) -> None:
        self.packed: list[dict[str, np.ndarray]] = []
        self.index: list[tuple[int, int]] = []
        F_ = int(frames_per_sample)
        for si, sc in enumerate(scenes):
            fr = sc.frames
            rgb = np.stack([[v.rgb for v in f] for f in fr])  # (F,C,H,W,3)
            depth = np.stack([[v.depth for v in f] for f in fr]).astype(np.float32)
            inst = np.stack([[v.instance for v in f] for f in fr]).astype(np.int32)
            K = np.stack([[v.K for v in f] for f in fr]).astype(np.float32)
            T = np.stack([[np.linalg.inv(v.T_world_cam) for v in f] for f in fr]).astype(np.float64)
            self.packed.append(dict(rgb=rgb, depth=depth, instance=inst, K=K, T_cam_world=T))
            span = (F_ - 1) * frame_stride + 1
            for start in range(0, max(len(fr) - span, 0) + 1, max(window_step, 1)):
                if start + span <= len(fr):
                    self.index.append((si, start))
        self.F, self.stride = F_, int(frame_stride)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        si, start = self.index[int(i)]
        p = self.packed[si]
        sel = np.arange(start, start + self.F * self.stride, self.stride)

        def g(k: str) -> np.ndarray:
            a = p[k][sel]
            return a.reshape(-1, *a.shape[2:])

        return {"images": g("rgb"), "depth": g("depth"), "instance": g("instance"), "K": g("K"),
                "T_cam_world": g("T_cam_world")}


def eval_windows(scenes: Sequence[Any], frames: int, hw: tuple[int, int]) -> TrainSampleDataset:
    """Evaluation windows (training's validation set, the LoRA split study's test set): one window of
    ``frames`` frame sets (all cameras) per scene start, non-overlapping, unaugmented, at ``hw``."""
    return TrainSampleDataset(SceneWindowDataset(scenes, frames_per_sample=frames, window_step=frames), hw,
                              augment=False)
