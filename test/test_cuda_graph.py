"""GraphedForward: a captured CUDA graph replays the same forward as eager.

The CUDA cases need a GPU (CI has none; they run through the lent device, see docs/BENCHMARKS.md);
on CPU GraphedForward must simply be the eager forward.
"""

import pytest
import torch

from fast3dis_ros.model.config import Fast3disConfig
from fast3dis_ros.model.fastpath.cuda_graph import GraphedForward
from fast3dis_ros.model.fast3dis import Fast3DIS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (hardware)")


def _model(device):
    torch.manual_seed(0)
    return Fast3DIS(Fast3disConfig.tiny()).eval().to(device)


def _fwd(model):
    return lambda x, K=None, T_cam_world=None: model(x, K=K, T_cam_world=T_cam_world, return_aux=False)


def test_cpu_inputs_run_eagerly():
    model = _model("cpu")
    g = GraphedForward(_fwd(model), amp_dtype=None)
    x = torch.randn(1, 3, 3, 70, 98)
    out = g(x)
    with torch.no_grad():
        ref = model(x, return_aux=False)
    assert torch.equal(out["pred_masks"], ref["pred_masks"]) and torch.equal(out["depth"], ref["depth"])
    assert g.captures == 0 and g.replays == 0


@cuda
@pytest.mark.parametrize("known_pose", [False, True])
def test_replay_matches_eager(known_pose):
    dev = torch.device("cuda")
    model = _model(dev)
    g = GraphedForward(_fwd(model), amp_dtype=None)  # fp32: eager and graph use the same kernels
    V = 4
    K = torch.tensor([[60.0, 0, 49], [0, 60, 35], [0, 0, 1]], device=dev).expand(1, V, 3, 3)
    T = torch.eye(4, device=dev).repeat(1, V, 1, 1)
    T[:, :, 0, 3] = torch.arange(V, device=dev) * 0.2
    kw = {"K": K, "T_cam_world": T} if known_pose else {}
    for seed in (1, 2, 3):  # first call captures, the others replay with new inputs
        x = torch.randn(1, V, 3, 70, 98, generator=torch.Generator().manual_seed(seed)).to(dev)
        out = {k: v.clone() for k, v in g(x, **kw).items() if torch.is_tensor(v)}
        with torch.inference_mode():
            ref = model(x, return_aux=False, **kw)
        for key in ("depth", "extrinsics", "pred_logits", "pred_masks"):
            torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4)
    assert g.captures == 1 and g.replays == 3 and not g.failures


@cuda
def test_one_graph_per_shape_with_lru_eviction():
    dev = torch.device("cuda")
    g = GraphedForward(_fwd(_model(dev)), amp_dtype=torch.bfloat16, max_graphs=2)
    for V in (2, 3, 2, 4, 3):
        out = g(torch.randn(1, V, 3, 70, 98, device=dev))
        assert out["pred_masks"].shape[2] == V
    # 2 and 3 captured, 2 replayed, 4 captured (evicts 3), 3 captured again
    assert g.captures == 4 and g.replays == 5 and len(g._graphs) == 2


@cuda
def test_compiled_and_graphed_close_to_eager():
    dev = torch.device("cuda")
    model = _model(dev)
    x = torch.randn(1, 3, 3, 70, 98, device=dev)
    with torch.inference_mode():
        ref = model(x, return_aux=False)
    model.compile_for_inference()
    g = GraphedForward(_fwd(model), amp_dtype=None)
    out = g(x)
    assert g.captures == 1 and not g.failures
    for key in ("depth", "pred_logits", "pred_masks"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-3, atol=1e-3)


@cuda
@pytest.mark.parametrize("chain", [False, True])
def test_fast_path_bf16_close_to_eager(chain):
    """What ``Predictor(compile=True)`` runs on a GPU: bf16 weights, fc1 + GELU in one cuBLASLt GEMM (tanh
    GELU), q/k norm + RoPE in one pass, compiled taps, graphed; ``chain``: also the opt-in chained
    residuals. Against the eager bf16 forward."""
    from fast3dis_ros.model.fastpath.fast_attention import FusedNormRopeAttention
    from fast3dis_ros.model.fastpath.fused_mlp import FusedGeluMlp

    dev = torch.device("cuda")
    model = _model(dev)
    x = torch.randn(1, 4, 3, 70, 98, device=dev)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = model(x, return_aux=False)
    runner = model.compile_for_inference(weight_dtype=torch.bfloat16, chain=chain)
    assert model.backbone.runner is runner
    blocks = model.backbone.vit.blocks
    assert all(isinstance(b.mlp, FusedGeluMlp) for b in blocks)
    assert any(isinstance(b.attn, FusedNormRopeAttention) for b in blocks)
    assert (runner.chained is not None) == chain
    assert all(b.mlp.fc1.weight.dtype == torch.bfloat16 for b in blocks)
    g = GraphedForward(_fwd(model), amp_dtype=torch.bfloat16)
    out = g(x)
    assert g.captures == 1 and not g.failures
    rel = (out["depth"].float() - ref["depth"].float()).abs() / ref["depth"].float().abs().clamp_min(1e-6)
    assert float(rel.median()) < 1e-2
    agree = ((out["pred_masks"].float() > 0) == (ref["pred_masks"].float() > 0)).float().mean()
    assert float(agree) > 0.95
