"""The fast path's block changes: fc1 + GELU as one op, bf16 block weights, compiled tap post-processing.

CPU, tiny DA3 (DA3 classes, random weights). The GPU side (cuBLASLt's GELU epilogue inside compiled,
graph-captured blocks) is ``test_cuda_graph.py::test_fast_path_bf16_close_to_eager`` and the benchmark.
"""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from depth_anything_3.model.dinov2.layers.mlp import Mlp

from fast3dis_ros.model.da3.backbone import DA3Backbone
from fast3dis_ros.model.da3.runner import ExactRunner, finish_tap
from fast3dis_ros.model.fastpath.accelerate import (
    FastPathOptions,
    accelerate,
    cast_block_linears,
    cast_head_weights,
    merge_lora,
)
from fast3dis_ros.model.fastpath.merged_lora import MergedLoraLinear
from fast3dis_ros.model.config import BackboneConfig
from fast3dis_ros.model.fastpath.fused_mlp import FusedGeluMlp, active_weight, fuse_block_mlps, linear_gelu_tanh

# max |gelu_erf(x) - gelu_tanh(x)| over the reals (4.73e-4 at x = +-2.70)
GELU_TANH_MAX_ERR = 4.8e-4


def _mlp(seed=0, d=32, hidden=128):
    torch.manual_seed(seed)
    return Mlp(d, hidden).eval()


def test_linear_gelu_tanh_is_addmm_then_tanh_gelu():
    torch.manual_seed(1)
    x, w, b = torch.randn(2, 5, 16), torch.randn(24, 16), torch.randn(24)
    out = linear_gelu_tanh(x, w, b)
    assert out.shape == (2, 5, 24)
    torch.testing.assert_close(out, F.gelu(x @ w.t() + b, approximate="tanh"), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(linear_gelu_tanh, (x, w, b))  # fake impl, schema and dispatch agree


def test_fused_mlp_matches_da3_mlp_within_the_gelu_approximation():
    mlp = _mlp()
    x = torch.randn(3, 7, 32) * 2
    with torch.no_grad():
        ref = mlp(x)
        fused = FusedGeluMlp(mlp)(x)
        hidden = mlp.fc1(x)
        bound = GELU_TANH_MAX_ERR * mlp.fc2.weight.abs().sum(dim=1)  # the erf/tanh gap through fc2, per output
    err = (fused - ref).abs()
    assert torch.all(err <= bound + 1e-6)
    assert err.max() > 0  # it is the tanh form, not a silent fallback to DA3's erf GELU
    exact_tanh = mlp.fc2(F.gelu(hidden, approximate="tanh"))
    torch.testing.assert_close(fused, exact_tanh, rtol=1e-5, atol=1e-5)


def test_fused_mlp_traces_as_one_op():
    """torch.compile keeps the custom op (no graph break), the compiled result equals eager."""
    mlp = FusedGeluMlp(_mlp(2))
    x = torch.randn(4, 32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(mlp)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    with torch.no_grad():
        compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)(x)
        torch.testing.assert_close(compiled, mlp(x), rtol=1e-6, atol=1e-6)


def test_rejects_non_gelu_mlp():
    mlp = _mlp()
    mlp.act = torch.nn.ReLU()
    with pytest.raises(ValueError, match="GELU"):
        FusedGeluMlp(mlp)


def _backbone(seed=0):
    torch.manual_seed(seed)
    bb = DA3Backbone(BackboneConfig(name="tiny", lora_rank=4, process_res=70))
    with torch.no_grad():
        for p in bb.lora_parameters():
            p.normal_(0, 0.05)  # adapters that change pass 2
    return bb


def test_fused_backbone_close_to_unfused_in_both_passes():
    bb = _backbone()
    x = torch.randn(1, 4, 3, 42, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        merge_lora(bb)
        geo_ref, feats_ref = bb.forward_both(x)
        n = fuse_block_mlps(bb.vit.blocks)
        geo, feats = bb.forward_both(x)
    assert n == len(bb.vit.blocks) and all(isinstance(b.mlp, FusedGeluMlp) for b in bb.vit.blocks)
    assert fuse_block_mlps(bb.vit.blocks) == 0  # idempotent
    torch.testing.assert_close(geo["depth"], geo_ref["depth"], rtol=2e-3, atol=2e-3)
    for a, b in zip(feats, feats_ref):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    # the merged LoRA weight is used in pass 2 only: the adapters still change the LoRA taps
    lora_taps = [i >= bb.lora_start for i in bb.out_layers]
    with torch.no_grad(), bb.adapters(False):
        st = bb._run_blocks(bb._stem(x, None, None), bb._last_block, bb.cfg.ref_view_strategy)
        feats_off = bb._feature_outputs(st, 42, 56)
    assert [not torch.allclose(a, b, atol=1e-4) for a, b in zip(feats, feats_off)] == lora_taps
    # a merged-LoRA MLP traces without graph breaks in either pass (one graph per adapter state)
    mlp = bb.vit.blocks[-1].mlp
    assert isinstance(mlp.fc1, MergedLoraLinear)
    tokens = torch.randn(5, mlp.fc1.weight.shape[1])
    for on in (True, False):
        with bb.adapters(on):
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(mlp)(tokens)
            assert explanation.graph_break_count == 0
            with torch.no_grad():
                torch.testing.assert_close(torch.compile(mlp, backend="aot_eager")(tokens), mlp(tokens))


def test_active_weight_follows_the_adapter_flag():
    bb = _backbone(1)
    merge_lora(bb)
    merged = next(m for m in bb.modules() if isinstance(m, MergedLoraLinear))
    with bb.adapters(True):
        assert active_weight(merged) is merged.merged_weight
    with bb.adapters(False):
        assert active_weight(merged) is merged.weight
    plain = torch.nn.Linear(3, 4)
    assert active_weight(plain) is plain.weight


def test_cast_block_linears_leaves_norms_and_stream_in_fp32():
    bb = _backbone(2)
    merge_lora(bb)
    n = cast_block_linears(bb, torch.bfloat16)
    assert n == 4 * len(bb.vit.blocks)  # qkv, proj, fc1, fc2
    for name, p in bb.vit.blocks.named_parameters():
        expect = torch.float32 if ("norm" in name or ".ls" in name) else torch.bfloat16
        assert p.dtype == expect, name
    merged = [m for m in bb.modules() if isinstance(m, MergedLoraLinear)]
    assert merged and all(m.merged_weight.dtype == torch.bfloat16 for m in merged)
    x = torch.randn(1, 3, 3, 42, 56)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        geo, feats = bb.forward_both(x)
    assert torch.isfinite(geo["depth"]).all() and all(torch.isfinite(f).all() for f in feats)


def test_feature_outputs_are_the_channels_first_taps():
    bb = _backbone(3)
    x = torch.randn(1, 5, 3, 42, 56)  # >= 3 views: DA3 reorders the views, so the taps are restored
    with torch.no_grad():
        st = bb._run_blocks(bb._stem(x, None, None), bb._last_block, bb.cfg.ref_view_strategy)
        assert st.b_idx is not None
        toks = [tok for tok, _ in bb._finish_taps(st)]
        feats = bb._feature_outputs(st, 42, 56)
    for tok, f in zip(toks, feats):
        B, S, N, C = tok.shape
        assert torch.equal(f, tok.transpose(-1, -2).reshape(B, S, C, 3, 4))


def test_compiled_finish_tap_equals_eager():
    bb = _backbone(4)
    x = torch.randn(1, 5, 3, 42, 56)
    with torch.no_grad():
        st = bb._run_blocks(bb._stem(x, None, None), bb._last_block, bb.cfg.ref_view_strategy)
        compiled = torch.compile(finish_tap, backend="aot_eager", dynamic=False)
        skip = 1 + bb.vit.num_register_tokens
        for i in bb.out_layers:
            t = st.taps[i]
            for hw in (None, (3, 4)):
                a = finish_tap(bb.vit.norm, t.local_x, t.x, t.ref_idx, skip, hw)
                b = compiled(bb.vit.norm, t.local_x, t.x, t.ref_idx, skip, hw)
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_weights_stored_in_bf16_run_under_autocast_like_fp32_weights():
    """compile_for_inference's casts (blocks, both heads) change nothing autocast did not already do."""
    from fast3dis_ros.model.config import Fast3disConfig
    from fast3dis_ros.model.fast3dis import Fast3DIS
    from fast3dis_ros.model.fastpath.weight_dtype import store_weights_in

    torch.manual_seed(5)
    model = Fast3DIS(Fast3disConfig.tiny()).eval()
    with pytest.raises(ValueError, match="head_autocast"):  # bf16 weights under DA3's fp32 heads
        accelerate(model.backbone, FastPathOptions(head_dtype=torch.bfloat16))
    accelerate(model.backbone, FastPathOptions(head_autocast=True))
    x = torch.randn(1, 3, 3, 70, 98)
    K = torch.tensor([[60.0, 0, 49], [0, 60, 35], [0, 0, 1]]).expand(1, 3, 3, 3)
    T = torch.eye(4).repeat(1, 3, 1, 1)
    T[:, :, 0, 3] = torch.arange(3) * 0.2
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x, return_aux=False)
        ref_posed = model(x, K=K, T_cam_world=T, return_aux=False)
        n_head = store_weights_in(model.head, torch.bfloat16)
        n_dpt = cast_head_weights(model.backbone, torch.bfloat16)
        n_blocks = cast_block_linears(model.backbone, torch.bfloat16)
        out = model(x, return_aux=False)
    assert n_head > 10 and n_dpt > 10 and n_blocks >= 4 * len(model.backbone.vit.blocks)  # + unmerged LoRA A/B
    assert all(m.weight.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, torch.nn.Conv2d)
               and m is not model.backbone.vit.patch_embed.proj)
    assert model.backbone.net.cam_enc is None or all(
        p.dtype == torch.float32 for p in model.backbone.net.cam_enc.parameters())  # runs in fp32
    for key in ("depth", "pred_logits", "pred_masks"):
        torch.testing.assert_close(out[key].float(), ref[key].float(), rtol=2e-2, atol=2e-2)
    # known cameras: DA3's camera encoder keeps fp32 weights and runs outside autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        posed = model(x, K=K, T_cam_world=T, return_aux=False)
    for key in ("depth", "pred_masks"):
        torch.testing.assert_close(posed[key].float(), ref_posed[key].float(), rtol=2e-2, atol=2e-2)
    model.backbone.runner = ExactRunner()  # DA3's fp32 heads again
    with pytest.raises(RuntimeError, match="head_autocast"):
        cast_head_weights(model.backbone, torch.bfloat16)


def test_unmerged_lora_blocks_are_not_fused():
    """An unmerged peft fc1 would lose its adapter inside the fused op: those blocks keep DA3's Mlp."""
    bb = _backbone(6)  # LoRA on, not merged
    lora_fc1 = [i for i, b in enumerate(bb.vit.blocks) if type(b.mlp.fc1) is not torch.nn.Linear]
    assert lora_fc1, "the tiny config puts LoRA on fc1 of the later blocks"
    x = torch.randn(1, 3, 3, 42, 56)
    with torch.no_grad():
        ref = bb.forward_features(x)
        n = fuse_block_mlps(bb.vit.blocks)
        out = bb.forward_features(x)
    assert n == len(bb.vit.blocks) - len(lora_fc1)
    assert all(not isinstance(bb.vit.blocks[i].mlp, FusedGeluMlp) for i in lora_fc1)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="merged-LoRA"):
        FusedGeluMlp(bb.vit.blocks[lora_fc1[0]].mlp)


def test_fast_path_weight_dtype_only_for_reduced_precision_on_a_gpu():
    """The one rule Predictor(compile=True) and fast3dis-bench both use for compile_for_inference."""
    from fast3dis_ros.model.fast3dis import fast_path_weight_dtype

    assert fast_path_weight_dtype("cuda", torch.bfloat16) is torch.bfloat16
    assert fast_path_weight_dtype(torch.device("cuda", 0), torch.float16) is torch.float16
    assert fast_path_weight_dtype("cuda", torch.float32) is None
    assert fast_path_weight_dtype("cuda", None) is None
    assert fast_path_weight_dtype("cpu", torch.bfloat16) is None
