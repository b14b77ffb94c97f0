"""Predictor.release_device / restore_device (lifecycle deactivate / activate): the model leaves the GPU
and comes back with the same outputs. CPU: both are no-ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fast3dis_ros.inference.predictor import Predictor
from fast3dis_ros.ros.lifecycle import warmup_window


def test_release_and_restore_are_no_ops_on_cpu():
    p = Predictor.random_tiny(seed=0, score_threshold=0.0)
    w = warmup_window(["a", "b"], 2, 64, 48)
    before = p.predict(w)
    p.release_device()
    p.restore_device()
    assert next(p.model.parameters()).device.type == "cpu"
    np.testing.assert_array_equal(p.predict(w).depth, before.depth)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_release_frees_gpu_memory_and_restore_gives_the_same_outputs():
    p = Predictor.random_tiny(seed=0, device="cuda", score_threshold=0.0)
    w = warmup_window(["a", "b"], 2, 64, 48)
    before = p.predict(w)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    assert held > 0
    p.release_device()
    assert next(p.model.parameters()).device.type == "cpu" and p.graphed is None
    assert torch.cuda.memory_allocated() < held / 10
    p.restore_device()
    assert next(p.model.parameters()).device.type == "cuda"
    after = p.predict(w)
    np.testing.assert_allclose(after.depth, before.depth, rtol=1e-3, atol=1e-3)
