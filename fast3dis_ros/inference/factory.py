"""The one way to build a :class:`Predictor` (the node, replay, demo, eval and held-out runs all use it).

Why one: the node and the offline tools must run the same network with the same defaults, or an offline
score says nothing about the robot. What can differ is spelled out in :class:`PredictorSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fast3dis_ros.inference.predictor import Predictor
from fast3dis_ros.model.checkpoint import BUNDLED_CHECKPOINT

#: ``PredictorSpec.checkpoint`` value for the tiny checkpoint shipped inside the package.
BUNDLED = "bundled"
#: ``PredictorSpec.checkpoint`` value for a random-weight tiny network (plumbing tests only).
RANDOM = ""


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU. Asking for CUDA without it is an error, not a
    silent fall back to the CPU (a robot configured for the GPU must not run 50x slower unnoticed)."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but no CUDA device is usable here "
                           "(torch.cuda.is_available() is False); use device 'cpu' or 'auto'")
    return torch.device(name)


@dataclass
class PredictorSpec:
    """What to build. Defaults are the node's parameter defaults (``config/fast3dis.yaml``)."""

    checkpoint: str = BUNDLED  # BUNDLED, a FAST3DIS checkpoint folder or hub id, or RANDOM
    weights: str = ""  # DA3 weights for a LoRA + head checkpoint (overrides its backbone.pretrained)
    model_size: str = "tiny"  # only "tiny" exists without a checkpoint
    seed: int = 0  # random tiny network's seed
    device: str = "auto"
    score_threshold: float | None = None  # None: the checkpoint's
    process_size: int | None = None  # long edge in pixels; None: the checkpoint's process_res
    cuda_graphs: bool = True
    compile: bool = False
    keep_mask_features: bool = False  # WindowPrediction.extras['mask_features'] (HDBSCAN baseline)
    backend: str = "torch"  # torch | onnxruntime | tensorrt (deploy/backends.py): the network from ``engine``
    engine: str = ""  # a fast3dis-export .onnx (onnxruntime) or a built TensorRT engine


def _is_checkpoint(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def build_predictor(spec: PredictorSpec) -> tuple[Predictor, dict]:
    """``(predictor, info)``; ``info``: device, weights ('bundled' | 'checkpoint' | 'random'), checkpoint
    path, random_weights, and a one-line ``description`` for logs.

    Errors (clear, before anything runs): a local path that is not a checkpoint folder, the bundled
    (tiny) checkpoint for another model size, or no checkpoint for anything but the random tiny network.
    """
    if spec.backend != "torch":  # the same Predictor pre/post-processing around an exported engine
        from fast3dis_ros.deploy.backends import engine_predictor

        if spec.keep_mask_features:
            raise ValueError(f"backend '{spec.backend}' has no mask-feature output: the HDBSCAN baseline needs "
                             "'torch'")
        kw = {"score_threshold": spec.score_threshold} if spec.score_threshold is not None else {}
        if spec.process_size:
            kw["process_size"] = spec.process_size
        pred = engine_predictor(spec.backend, spec.engine, **kw)
        return pred, {"device": str(pred.device), "weights": spec.backend, "checkpoint": None,
                      "engine": spec.engine, "random_weights": False,
                      "description": f"{spec.backend} engine {spec.engine}"}
    device = resolve_device(spec.device)
    kw = {"score_threshold": spec.score_threshold, "process_size": spec.process_size,
          "cuda_graphs": spec.cuda_graphs, "compile": spec.compile, "keep_mask_features": spec.keep_mask_features}
    info: dict = {"device": str(device)}
    checkpoint = spec.checkpoint
    if checkpoint == BUNDLED:
        if spec.model_size != "tiny":
            raise ValueError(f"model_size '{spec.model_size}' needs a FAST3DIS checkpoint: the bundled one is the "
                             "tiny configuration")
        checkpoint = str(BUNDLED_CHECKPOINT)
        info["weights"] = "bundled"
    elif checkpoint != RANDOM:
        info["weights"] = "checkpoint"
        local = Path(checkpoint).expanduser()
        if local.exists() and not _is_checkpoint(local):
            raise FileNotFoundError(f"{local}: not a FAST3DIS checkpoint folder (needs config.json + model.safetensors)")
    if checkpoint != RANDOM:
        pred = Predictor.from_checkpoint(checkpoint, device=device, da3_weights=spec.weights or None, **kw)
        info.update(checkpoint=str(Path(checkpoint).resolve()) if Path(checkpoint).exists() else checkpoint,
                    random_weights=False, description=f"checkpoint {checkpoint}")
        return pred, info
    if spec.model_size != "tiny" or spec.weights:
        raise ValueError(f"model_size '{spec.model_size}'{' with weights ' + spec.weights if spec.weights else ''} "
                         "needs a FAST3DIS checkpoint: DA3 weights alone have no instance head")
    pred = Predictor.random_tiny(seed=spec.seed, device=device, **kw)
    info.update(weights="random", checkpoint=None, random_weights=True,
                description=f"RANDOM tiny model (seed {spec.seed}): outputs are meaningless, for plumbing/tests only")
    return pred, info
