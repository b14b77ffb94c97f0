"""Backend selection (issue 25): the factory's and the node's clear errors, without an exported model."""

from __future__ import annotations

import pytest
import torch

from fast3dis_ros.deploy.backends import engine_predictor
from fast3dis_ros.ros import params as P


def _node_params(**over) -> dict:
    p = {s.name: s.default for s in P.PARAMS}
    p.update(over)
    return p


def test_unknown_backend_and_missing_engine_are_clear_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        engine_predictor("openvino", "m.onnx")
    with pytest.raises(ValueError, match="needs an engine file"):
        engine_predictor("onnxruntime", "")


def test_backend_parameter_is_validated():
    assert P.validate("backend", "onnxruntime") is None
    assert P.validate("backend", "tvm") is not None


def test_node_routes_backend_to_the_engine_factory(tmp_path):
    from fast3dis_ros.ros.node import make_predictor

    with pytest.raises(FileNotFoundError):  # onnxruntime on a missing file: not the torch checkpoint path
        make_predictor(_node_params(backend="onnxruntime", engine=str(tmp_path / "absent.onnx")))
    pred, what = make_predictor(_node_params())
    assert type(pred.model).__name__ == "Fast3DIS" and "checkpoint" in what


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_tensorrt_without_gpu_says_so(tmp_path):
    from fast3dis_ros.deploy.tensorrt_engine import TensorRTUnavailable

    with pytest.raises(TensorRTUnavailable, match="needs a CUDA GPU"):
        engine_predictor("tensorrt", str(tmp_path / "m.engine"))
