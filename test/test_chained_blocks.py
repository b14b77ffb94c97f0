"""Chained ViT blocks: each block's last residual add is done by the next block (``chained_blocks.py``).

CPU, tiny DA3 (DA3 classes, random weights). Eager, the chained trunk must be DA3's to the bit (the same
adds and multiplies in the same order); traced by ``torch.compile`` it must not break the graph.
"""

import torch
import torch._dynamo

from fast3dis_ros.model.da3.backbone import DA3Backbone, block_kind, output_observed
from fast3dis_ros.model.da3.runner import ExactRunner
from fast3dis_ros.model.fastpath.accelerate import FastPathOptions, FastRunner, accelerate, merge_lora
from fast3dis_ros.model.fastpath.chained_blocks import ChainedBlock, PendingTokens, run_chained, tokens_of
from fast3dis_ros.model.config import BackboneConfig


def _backbone(seed=0, lora=True, depth=6):
    torch.manual_seed(seed)
    bb = DA3Backbone(BackboneConfig(name="tiny", lora_rank=4 if lora else 0, process_res=70, tiny_depth=depth))
    with torch.no_grad():
        for p in bb.lora_parameters() if lora else []:
            p.normal_(0, 0.05)
        for blk in bb.vit.blocks:  # layer scales that are not all ones, so a dropped one would show
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.ls2.gamma.uniform_(0.5, 1.5)
    return bb


def test_pending_tokens_add_up_like_da3():
    x_mid, delta, gamma = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8), torch.rand(8)
    p = PendingTokens(x_mid, delta, gamma)
    assert torch.equal(p.tokens(), x_mid + delta * gamma)
    assert torch.equal(tokens_of(PendingTokens(x_mid, delta, None)), x_mid + delta)
    assert tokens_of(x_mid) is x_mid and tokens_of(None) is None


def test_chained_trunk_is_bit_identical_in_both_passes():
    bb = _backbone()
    x = torch.randn(1, 5, 3, 42, 56)  # >= 3 views: the reorder and the camera token happen mid-trunk
    with torch.no_grad():
        geo_ref, feats_ref = bb.forward_both(x)
        runner = accelerate(bb, FastPathOptions(chain=True))
        assert bb.runner is runner and runner.chained is not None
        geo, feats = bb.forward_both(x)
        feats_alone = bb.forward_features(x)
    for key in ("depth", "depth_conf", "extrinsics", "intrinsics"):
        assert torch.equal(geo[key], geo_ref[key]), key
    for a, b, c in zip(feats, feats_ref, feats_alone):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_chained_trunk_never_adds_up_outside_the_blocks(monkeypatch):
    """Every output the trunk looks at comes from a closing block: no pending pair is added up eagerly
    (on the H100 those eager adds cost more than the fusion saved)."""
    bb = _backbone(3, depth=10)  # taps 6-9, alternation from 6: blocks 0-3 hand their residual on
    x = torch.randn(1, 5, 3, 42, 56)
    with torch.no_grad():
        ref_geo, ref_feats = bb.forward_both(x)
        accelerate(bb, FastPathOptions(chain=True))
        eager_adds = []
        monkeypatch.setattr(PendingTokens, "tokens", lambda self: eager_adds.append(self) or 1 / 0)
        geo, feats = bb.forward_both(x)
        feats_alone = bb.forward_features(x)
    assert eager_adds == []
    assert torch.equal(geo["depth"], ref_geo["depth"])
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(feats, ref_feats, feats_alone))
    # and the chain still hands pending residuals on where nothing looks (else there is nothing to gain)
    assert [i for i in range(10) if not output_observed(bb.vit.alt_start, bb.out_layers, i, 10)] == [0, 1, 2, 3]


def test_large_trunk_closes_only_where_da3_looks():
    """DA3-Large's layout (taps 11/15/19/23, alternation from 8): 14 of the geometry pass's 23 block
    boundaries and 6 of the feature pass's (from block 12) hand the residual on."""
    taps = [11, 15, 19, 23]

    def observed(start, end):
        return [i for i in range(start, end) if output_observed(8, taps, i, end)]

    assert observed(0, 24) == [6, 7, 10, 11, 14, 15, 18, 19, 22, 23]
    assert observed(12, 24) == [14, 15, 18, 19, 22, 23]
    assert observed(0, 12) == [6, 7, 10, 11]
    assert observed(0, 10) == [6, 7, 8, 9]  # 8 (local) stays local_x through 9 (global), which ends the run
    assert [block_kind(8, i) for i in (7, 8, 9)] == ["local", "local", "global"]


def test_chained_block_output_is_the_block_output():
    bb = _backbone(1, lora=False)
    blk = bb.vit.blocks[0]
    chained = ChainedBlock(blk)
    x = torch.randn(1, 2, 5, bb.vit.embed_dim)
    with torch.no_grad():
        ref = bb.vit.process_attention(x, blk, "local", pos=None)
        out = run_chained(chained, x, "local", None)
        assert isinstance(out, PendingTokens) and torch.equal(out.tokens(), ref)
        # fed on to the next block without adding up, the result is still DA3's
        nxt = bb.vit.blocks[1]
        ref2 = bb.vit.process_attention(ref, nxt, "local", pos=None)
        out2 = run_chained(ChainedBlock(nxt), out, "local", None)
        assert torch.equal(out2.tokens(), ref2)


def test_chained_block_traces_as_one_graph():
    bb = _backbone(2, lora=False)
    chained = ChainedBlock(bb.vit.blocks[0])
    x = torch.randn(2, 5, bb.vit.embed_dim)
    delta, gamma = torch.randn_like(x), bb.vit.blocks[0].ls2.gamma
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(chained)(x, delta, gamma)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    with torch.no_grad():
        compiled = torch.compile(chained, backend="aot_eager", dynamic=False)(x, delta, gamma)
        eager = chained(x, delta, gamma)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compiled_chained_runner_matches_eager():
    """The fast runner with merged LoRA, chained blocks compiled in place and compiled taps (Inductor,
    CPU) against the exact runner. (The compiled DPT head is left to the GPU tests: about 70 s more here.)"""
    bb = _backbone(3)
    assert merge_lora(bb) > 0 and merge_lora(bb) == 0
    x = torch.randn(1, 3, 3, 42, 56)
    with torch.no_grad():
        geo_ref, feats_ref = bb.forward_both(x)
        runner = accelerate(bb, FastPathOptions(chain=True, compile_blocks=True))
        assert runner.compiled and runner.tap_fn is not None and runner.dpt_fn is None
        geo, feats = bb.forward_both(x)
    torch.testing.assert_close(geo["depth"], geo_ref["depth"], rtol=1e-4, atol=1e-5)
    for a, b in zip(feats, feats_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_runner_swap_is_the_only_switch():
    """The backbone has one injection point: a fast runner with every option off computes the exact
    path to the bit (its own DPT chunk included), a chained one too (eagerly), and putting the
    ``ExactRunner`` back gives DA3's path again."""
    bb = _backbone(4)
    x = torch.randn(1, 5, 3, 42, 56)
    with torch.no_grad():
        geo_ref, feats_ref = bb.forward_both(x)
        outputs = {}
        for name, options in (("plain", FastPathOptions()), ("chained", FastPathOptions(chain=True))):
            assert isinstance(accelerate(bb, options), FastRunner)
            outputs[name] = bb.forward_both(x)
        bb.runner = ExactRunner()
        outputs["exact again"] = bb.forward_both(x)
    for name, (geo, feats) in outputs.items():
        for key in ("depth", "depth_conf", "extrinsics", "intrinsics"):
            assert torch.equal(geo[key], geo_ref[key]), (name, key)
        assert all(torch.equal(a, b) for a, b in zip(feats, feats_ref)), name
