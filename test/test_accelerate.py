"""``Fast3DIS.compile_for_inference`` -> ``fastpath.accelerate``: which runner and module changes each option gives.

CPU, tiny model. Compilation is lazy, so the compiled wiring is checked without running it (the compiled
forward runs in ``test_chained_blocks.py`` on the CPU and in ``test_cuda_graph.py`` on a GPU); the
uncompiled fast runner runs here against the exact path.
"""

from collections import Counter

import torch

from fast3dis_ros.model.config import Fast3disConfig
from fast3dis_ros.model.da3.runner import ExactRunner
from fast3dis_ros.model.fast3dis import Fast3DIS
from fast3dis_ros.model.fastpath.accelerate import FastRunner
from fast3dis_ros.model.fastpath.fast_attention import FusedNormRopeAttention
from fast3dis_ros.model.fastpath.fused_mlp import FusedGeluMlp
from fast3dis_ros.model.fastpath.merged_lora import MergedLoraLinear


def _model(seed: int = 0) -> Fast3DIS:
    torch.manual_seed(seed)
    model = Fast3DIS(Fast3disConfig.tiny()).eval()
    with torch.no_grad():
        for p in model.backbone.lora_parameters():  # adapters that change pass 2
            p.normal_(0, 0.05)
    return model


class _CountingRunner(ExactRunner):
    """DA3's runner that counts what the backbone hands it."""

    def __init__(self) -> None:
        self.calls = Counter()

    def run_block(self, vit, i, x, kind, pos, observed):
        self.calls["block"] += 1
        return super().run_block(vit, i, x, kind, pos, observed)

    def finish_tap(self, *args):
        self.calls["tap"] += 1
        return super().finish_tap(*args)

    def dpt_chunk(self, *args):
        self.calls["dpt"] += 1
        return super().dpt_chunk(*args)


def test_every_block_tap_and_dpt_chunk_goes_through_the_runner():
    """The injection point is the only way: a runner swapped in sees every block of both passes (the
    shared prefix once), every tap, every DPT chunk, and the outputs stay DA3's."""
    model = _model()
    bb = model.backbone
    assert type(bb.runner) is ExactRunner  # the default
    x = torch.randn(1, 3, 3, 70, 98)
    with torch.no_grad():
        ref_geo, ref_feats = bb.forward_both(x)
        bb.runner = counting = _CountingRunner()
        geo, feats = bb.forward_both(x)
    last = max(bb.out_layers) + 1
    split = min(bb.lora_start, last)
    assert 0 < split < last
    assert counting.calls["block"] == last + (last - split)
    assert counting.calls["tap"] == 2 * len(bb.out_layers) and counting.calls["dpt"] == 1
    assert torch.equal(geo["depth"], ref_geo["depth"]) and all(torch.equal(a, b) for a, b in zip(feats, ref_feats))


def test_compile_for_inference_installs_the_compiled_bf16_runner():
    """What ``Predictor(compile=True)`` asks for on a GPU (``weight_dtype=bf16``)."""
    model = _model()
    runner = model.compile_for_inference(weight_dtype=torch.bfloat16)
    bb = model.backbone
    assert bb.runner is runner and isinstance(runner, FastRunner)
    assert runner.compiled and runner.tap_fn is not None and runner.dpt_fn is not None
    assert runner.chained is not None and len(runner.chained) == len(bb.vit.blocks)
    assert runner.head_autocast and runner.fold_dpt_pe and runner.dpt_nhwc
    assert bb.lora_merged and any(isinstance(m, MergedLoraLinear) for m in bb.modules())
    assert all(isinstance(b.mlp, FusedGeluMlp) for b in bb.vit.blocks)
    assert any(isinstance(b.attn, FusedNormRopeAttention) for b in bb.vit.blocks)
    assert all(b.mlp.fc2.weight.dtype == torch.bfloat16 for b in bb.vit.blocks)
    assert bb.net.head.scratch.output_conv2[0].weight.dtype == torch.bfloat16  # DPT head: dpt_bf16
    assert all(p.dtype == torch.float32 for p in bb.net.cam_enc.parameters())  # runs in fp32, left alone
    assert any(p.dtype == torch.bfloat16 for p in model.head.parameters())  # the instance head too


def test_compile_for_inference_without_blocks_keeps_them_as_they_are():
    model = _model()
    runner = model.compile_for_inference(blocks=False, head=False, weight_dtype=torch.bfloat16)
    bb = model.backbone
    assert not runner.compiled and runner.tap_fn is None and runner.dpt_fn is None
    assert runner.chained is None  # chain needs the blocks
    assert all(b.mlp.fc2.weight.dtype == torch.float32 for b in bb.vit.blocks)
    assert not any(isinstance(b.mlp, FusedGeluMlp) for b in bb.vit.blocks)
    assert bb.net.head.scratch.output_conv2[0].weight.dtype == torch.bfloat16  # the heads still cast


def test_uncompiled_fast_runner_is_the_exact_forward_up_to_rounding():
    """Merged LoRA, folded DPT embedding and channels-last upsampling (fp32, eager): rounding-level only;
    putting the ``ExactRunner`` back gives the exact depth to the bit (the merge keeps pass 1's weights)."""
    model = _model(1)
    x = torch.randn(1, 3, 3, 70, 98, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x, return_aux=False)
        runner = model.compile_for_inference(blocks=False, head=False, dpt_bf16=False)
        assert runner.fold_dpt_pe and runner.dpt_nhwc and model.backbone.lora_merged
        out = model(x, return_aux=False)
        model.backbone.runner = ExactRunner()
        back = model(x, return_aux=False)
    assert not torch.equal(out["depth"], ref["depth"])  # the folded embedding rounds differently ...
    torch.testing.assert_close(out["depth"], ref["depth"], rtol=1e-4, atol=1e-5)  # ... and only that
    torch.testing.assert_close(out["pred_masks"], ref["pred_masks"], rtol=1e-3, atol=1e-3)
    assert torch.equal(back["depth"], ref["depth"])
