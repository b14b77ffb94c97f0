"""Which engine runs the FAST3DIS forward: ``torch`` (default), ``onnxruntime`` or ``tensorrt``.

The node, ``fast3dis-eval`` and the demo all get their `Predictor` here for the non-torch backends, so
the pipeline after the engine (postprocessing, fusion, tracking) is the same code for every backend.
"""

from __future__ import annotations

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def engine_predictor(backend: str, engine: str, **kw):
    """`Predictor` for ``backend`` on ``engine`` (a ``fast3dis-export`` .onnx, or a built TensorRT engine).

    ``kw``: Predictor options (``process_size``, ``score_threshold``, ``mask_threshold``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        raise ValueError("backend 'torch' builds its Predictor from a checkpoint, not from an engine file")
    if not engine:
        raise ValueError(f"backend '{backend}' needs an engine file (.onnx from fast3dis-export"
                         f"{', then a TensorRT engine' if backend == 'tensorrt' else ''})")
    if backend == "onnxruntime":
        from fast3dis_ros.deploy.onnx_predictor import onnx_predictor

        return onnx_predictor(engine, **kw)
    from fast3dis_ros.deploy.tensorrt_engine import tensorrt_predictor

    return tensorrt_predictor(engine, **kw)
