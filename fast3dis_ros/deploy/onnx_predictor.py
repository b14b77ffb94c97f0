"""onnxruntime backend: an exported FAST3DIS graph behind the PyTorch `Predictor`'s pre/post-processing.

`OnnxForward` is an ``nn.Module`` with ``Fast3DIS.forward``'s signature that runs an onnxruntime session
and returns the same output dict (torch tensors), so `Predictor` (resize, normalise, K scaling, instance
postprocessing, ``WindowPrediction``) is reused unchanged: the backends differ only in the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fast3dis_ros.deploy.export import OUTPUTS, ExportMetadata, read_export_metadata


class WindowShapeMismatch(ValueError):
    """A window does not have the fixed shape (or conditioning) the engine was built for."""


def check_window(meta: ExportMetadata, images: torch.Tensor, K, T_cam_world, backend: str) -> None:
    """Clear errors instead of an engine's shape error deep inside a run (shared by ORT and TensorRT)."""
    _, V, _, H, W = images.shape
    s = meta.shape
    if (V, H, W) != (s.views, s.height, s.width):
        raise WindowShapeMismatch(
            f"{backend} engine was exported for {s.views} views at {s.height}x{s.width} (processing size), "
            f"got {V} views at {H}x{W}: re-export with fast3dis-export --views {V} --height {H} --width {W}"
        )
    if T_cam_world is not None:
        raise WindowShapeMismatch(
            f"{backend} engine has no known-pose input: use backend 'torch' for windows with poses "
            "(or drop the poses: the node's use_known_poses:=false)"
        )


class OnnxForward(nn.Module):
    """``forward(images, K=None, T_cam_world=None, return_aux=False)`` -> output dict, by onnxruntime."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:  # pinned in requirements/base.txt
            raise RuntimeError("backend 'onnxruntime' needs the onnxruntime package (requirements/base.txt)") from e
        self.path = Path(path)
        self.meta = read_export_metadata(self.path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers or ["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, images: torch.Tensor, K=None, T_cam_world=None, return_aux: bool = False) -> dict:
        check_window(self.meta, images, K, T_cam_world, "onnxruntime")
        feed = {"images": images.detach().float().cpu().numpy()}
        if "K" in self.input_names:  # unknown K: all NaN = every view keeps the network's estimate
            V = images.shape[1]
            k = np.full((1, V, 3, 3), np.nan, np.float32) if K is None else K.detach().float().cpu().numpy()
            feed["K"] = k
        elif K is not None and bool(torch.isfinite(K).any()):
            raise WindowShapeMismatch("onnxruntime engine was exported with --conditioning none but K was given")
        values = self.session.run(list(OUTPUTS), feed)
        out = {name: torch.from_numpy(v).to(images.device) for name, v in zip(OUTPUTS, values)}
        out["metric"] = torch.zeros(1, dtype=torch.bool, device=images.device)
        return out


def onnx_predictor(path: str | Path, threads: int | None = None, providers: list[str] | None = None, **kw):
    """A `Predictor` whose engine is onnxruntime on ``path`` (fp32, CPU tensors around the session)."""
    from fast3dis_ros.inference.predictor import Predictor

    engine = OnnxForward(path, providers=providers, threads=threads)
    kw.setdefault("process_size", max(engine.meta.shape.height, engine.meta.shape.width))
    return Predictor(engine, engine.meta.config, device="cpu", dtype="fp32", cuda_graphs=False, **kw)
