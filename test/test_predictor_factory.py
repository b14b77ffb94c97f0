"""The one predictor factory (``inference/factory.py``): the node's parameters and the offline tools get
the same network, errors are clear, and the mask features come from the predictor itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fast3dis_ros.inference.factory import BUNDLED, RANDOM, PredictorSpec, build_predictor, resolve_device
from fast3dis_ros.inference.predictor import Predictor
from fast3dis_ros.model.checkpoint import BUNDLED_CHECKPOINT

from test_predictor import make_window


def test_auto_device_is_the_cpu_without_cuda_and_cuda_without_it_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_device("cuda")


def test_node_parameters_and_offline_tools_build_the_same_predictor():
    """ros/node.py's make_predictor goes through the factory: same checkpoint, thresholds, process size."""
    from fast3dis_ros.ros import params as P  # plain Python (no rclpy import)
    from fast3dis_ros.ros.node import make_predictor

    defaults = {s.name: s.default for s in P.PARAMS}
    node_pred, what = make_predictor({**defaults, "device": "cpu"})
    tool_pred, info = build_predictor(PredictorSpec(device="cpu"))
    assert info["weights"] == "bundled" and what == f"checkpoint {BUNDLED_CHECKPOINT}"
    for attr in ("process_size", "score_threshold", "mask_threshold", "dtype", "keep_mask_features"):
        assert getattr(node_pred, attr) == getattr(tool_pred, attr), attr
    assert node_pred.process_size == node_pred.cfg.backbone.process_res == 196
    assert node_pred.score_threshold == defaults["score_threshold"] == 0.5
    a = dict(node_pred.model.state_dict())
    for k, v in tool_pred.model.state_dict().items():
        assert torch.equal(a[k], v), k


def test_clear_errors():
    with pytest.raises(ValueError, match="bundled one is the tiny"):
        build_predictor(PredictorSpec(model_size="large", device="cpu"))
    with pytest.raises(ValueError, match="no instance head"):
        build_predictor(PredictorSpec(checkpoint=RANDOM, model_size="large", device="cpu"))
    with pytest.raises(FileNotFoundError, match="not a FAST3DIS checkpoint"):
        build_predictor(PredictorSpec(checkpoint=str(BUNDLED_CHECKPOINT.parent), device="cpu"))


def test_random_network_only_when_asked_and_says_so():
    pred, info = build_predictor(PredictorSpec(checkpoint=RANDOM, seed=3, device="cpu"))
    assert info["random_weights"] and "RANDOM" in info["description"] and isinstance(pred, Predictor)
    assert build_predictor(PredictorSpec(checkpoint=BUNDLED, device="cpu"))[1]["random_weights"] is False


def test_mask_features_come_from_the_forward_itself():
    """keep_mask_features returns the pixel decoder's features of the same forward (no hook, no patch)."""
    pred, _ = build_predictor(PredictorSpec(device="cpu", keep_mask_features=True, score_threshold=0.0))
    assert "predict" not in vars(pred)  # the class's own method, not a monkey-patched one
    w = make_window(n_sets=2)
    p = pred.predict(w)
    feats = p.extras["mask_features"]
    H, W = p.process_hw if hasattr(p, "process_hw") else p.extras["process_hw"]
    x = torch.from_numpy(p.images).permute(0, 3, 1, 2)
    from fast3dis_ros.model.da3.backbone import normalize_images

    with torch.inference_mode():
        out = pred.model(normalize_images(x)[None], K=torch.from_numpy(p.K).float()[None], return_aux=False)
    ref = out["mask_features"][0].float().numpy()
    assert feats.shape == ref.shape and feats.shape[0] == 4 and feats.dtype == np.float32
    np.testing.assert_allclose(feats, ref, rtol=1e-5, atol=1e-5)
    plain, _ = build_predictor(PredictorSpec(device="cpu"))
    assert "mask_features" not in plain.predict(w).extras
