"""TensorRT backend: engine build from a ``fast3dis-export`` ONNX graph, and the engine as a forward.

``build_engine`` uses TensorRT's Python API (10.x: explicit batch, ``BuilderFlag.FP16`` / ``BF16``); the
engine file gets a ``<engine>.json`` sidecar with the ONNX metadata (window shape, conditioning, config),
so the runtime needs no checkpoint. TensorRT and a CUDA GPU are optional at run time: every entry point
checks for both first and says which one is missing (``TensorRTUnavailable``).

``python -m fast3dis_ros.deploy.tensorrt_engine model.onnx -o model.engine --precision fp16``
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from fast3dis_ros.deploy.export import OUTPUTS, ExportMetadata, check_onnx, read_export_metadata

PRECISIONS = ("fp32", "fp16", "bf16")


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the ``tensorrt`` Python package) or a CUDA GPU is missing where an engine is needed."""


def require_tensorrt():
    """The ``tensorrt`` module, or a clear error saying what to install and where it runs."""
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(
            "TensorRT needs a CUDA GPU and none is visible (torch.cuda.is_available() is False): build and run "
            "engines on the target (Jetson / GPU workstation); use backend 'onnxruntime' or 'torch' here"
        )
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(
            "backend 'tensorrt' needs the TensorRT Python package: JetPack ships it on a Jetson "
            "(python3-libnvinfer), on x86 `pip install tensorrt` matching the CUDA of torch"
        ) from e
    return trt


TOPK_MAX_K = 3840  # TensorRT's TopK layer: k <= 3840 (operator docs, TensorRT 10)


def topk_ks(onnx_path: str | Path) -> dict[str, int]:
    """``{node name: k}`` of every ``TopK`` in a saved graph whose k is a constant (reads no weights)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    return {node.name or node.output[0]: int(numpy_helper.to_array(consts[node.input[1]]).reshape(-1)[0])
            for node in model.graph.node
            if node.op_type == "TopK" and len(node.input) > 1 and node.input[1] in consts}


def tensorrt_blockers(onnx_path: str | Path) -> list[str]:
    """Graph features TensorRT's parser is known to reject, found without TensorRT (CPU-checkable).

    ``TopK`` with a constant k above `TOPK_MAX_K`. ``fast3dis-export`` graphs have none at any window:
    the order statistics over all points of a window (scene-normalisation medians, anchor quantiles),
    sorts in PyTorch, are exported as a sort-free selection (``model/median.py``). The guard stays for
    graphs a later change may bring (a sort over points exports as TopK with k = their number)."""
    return [f"TopK {name} with k={k} > {TOPK_MAX_K}" for name, k in topk_ks(onnx_path).items() if k > TOPK_MAX_K]


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(str(engine_path) + ".json")


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str = "fp16",
                 workspace_gib: float = 8.0) -> dict:
    """Parse ``onnx_path`` and serialise a TensorRT engine to ``engine_path``; returns build facts.

    The checks that need neither TensorRT nor a GPU (ONNX checker, fast3dis metadata) run first, so a
    broken export is reported as such even on a machine that cannot build."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    onnx_path = Path(onnx_path)
    check_onnx(onnx_path)
    meta = read_export_metadata(onnx_path)
    blockers = tensorrt_blockers(onnx_path)
    if blockers:
        raise RuntimeError(f"{onnx_path} cannot become a TensorRT engine as exported: {'; '.join(blockers)} "
                           "(export fewer views / a smaller window, or see docs/BENCHMARKS.md 'Issue 25')")
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT engine build failed for {onnx_path} ({precision}); see the log above")
    build_s = time.perf_counter() - t0
    Path(engine_path).write_bytes(bytes(serialized))
    facts = {"onnx": str(onnx_path), "engine": str(engine_path), "precision": precision,
             "build_s": round(build_s, 1), "tensorrt": trt.__version__}
    sidecar_path(engine_path).write_text(json.dumps({**facts, "metadata": _meta_dict(meta)}, indent=1))
    return facts


def _meta_dict(meta: ExportMetadata) -> dict:
    s = meta.shape
    return {"views": s.views, "height": s.height, "width": s.width, "conditioning": meta.conditioning,
            "outputs": list(meta.outputs), "config": json.loads(meta.config.to_json())}


def read_engine_metadata(engine_path: str | Path) -> ExportMetadata:
    from fast3dis_ros.deploy.export import WindowShape
    from fast3dis_ros.model.config import Fast3disConfig

    side = sidecar_path(engine_path)
    if not side.exists():
        raise FileNotFoundError(f"{side} missing: build engines with fast3dis_ros.deploy.tensorrt_engine")
    d = json.loads(side.read_text())["metadata"]
    return ExportMetadata(WindowShape(d["views"], d["height"], d["width"]), d["conditioning"],
                          tuple(d["outputs"]), Fast3disConfig.from_dict(d["config"]))


class TensorRTForward(nn.Module):
    """``Fast3DIS.forward``'s signature and output dict, executed by a TensorRT engine on CUDA tensors."""

    def __init__(self, engine_path: str | Path) -> None:
        super().__init__()
        trt = require_tensorrt()
        self.meta = read_engine_metadata(engine_path)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {engine_path} (built by another TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.device = torch.device("cuda")
        self.outputs = {
            name: torch.empty(tuple(self.engine.get_tensor_shape(name)), dtype=torch.float32, device=self.device)
            for name in OUTPUTS
        }
        for name, t in self.outputs.items():
            self.context.set_tensor_address(name, t.data_ptr())

    def forward(self, images: torch.Tensor, K=None, T_cam_world=None, return_aux: bool = False) -> dict:
        from fast3dis_ros.deploy.onnx_predictor import check_window

        check_window(self.meta, images, K, T_cam_world, "tensorrt")
        feed = {"images": images.to(self.device, torch.float32).contiguous()}
        if self.meta.conditioning == "intrinsics":
            V = images.shape[1]
            feed["K"] = (torch.full((1, V, 3, 3), float("nan"), device=self.device) if K is None
                         else K.to(self.device, torch.float32).contiguous())
        for name, t in feed.items():
            self.context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        out = {name: t.clone() for name, t in self.outputs.items()}  # the next window reuses the buffers
        out["metric"] = torch.zeros(1, dtype=torch.bool, device=self.device)
        return out


def tensorrt_predictor(engine_path: str | Path, **kw):
    """A `Predictor` whose engine is TensorRT (CUDA; fp32 tensors in and out of the engine)."""
    from fast3dis_ros.inference.predictor import Predictor

    engine = TensorRTForward(engine_path)
    kw.setdefault("process_size", max(engine.meta.shape.height, engine.meta.shape.width))
    return Predictor(engine, engine.meta.config, device="cuda", dtype="fp32", cuda_graphs=False, **kw)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build a TensorRT engine from a fast3dis-export ONNX model.")
    ap.add_argument("onnx")
    ap.add_argument("-o", "--output", required=True, help="engine file (+ <output>.json metadata)")
    ap.add_argument("--precision", choices=PRECISIONS, default="fp16")
    ap.add_argument("--workspace-gib", type=float, default=8.0)
    args = ap.parse_args(argv)
    try:
        facts = build_engine(args.onnx, args.output, args.precision, args.workspace_gib)
    except TensorRTUnavailable as e:
        print(f"fast3dis TensorRT build: ONNX checked ({args.onnx}), stopped before the build: {e}")
        return 2
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
