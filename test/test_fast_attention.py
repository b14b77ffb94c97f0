"""The fast path's attention: q/k LayerNorm + 2D RoPE written as one pass (``fast_attention.py``).

CPU, tiny DA3 (DA3 classes, random weights): the fused form must compute DA3's values (fp32, up to
rounding order), fall back to DA3's own forward where it does not apply, and trace without graph
breaks. Whether Inductor then emits one kernel per q/k is a GPU question: BENCHMARKS.md 16.
"""

import pytest
import torch
import torch._dynamo

from fast3dis_ros.model.da3.backbone import DA3Backbone
from fast3dis_ros.model.config import BackboneConfig
from fast3dis_ros.model.fastpath.accelerate import merge_lora
from fast3dis_ros.model.fastpath.fast_attention import (
    FusedNormRopeAttention,
    fuse_block_attention,
    is_fusable_attention,
    norm_rope,
    partner_perm,
    rope_signs,
    rope_tables,
)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return DA3Backbone(BackboneConfig(name="tiny", lora_rank=0, process_res=70))


def _positions(batch: int, h: int, w: int) -> torch.Tensor:
    grid = torch.cartesian_prod(torch.arange(h), torch.arange(w)).view(1, h * w, 2).expand(batch, -1, -1)
    return torch.cat([torch.zeros(batch, 1, 2, dtype=torch.long), grid + 1], dim=1)  # camera token first


def test_partner_perm_and_signs_are_da3_rotation():
    """signs * partner_perm(t) == DA3's rotate_features applied to each half of the head dim."""
    from depth_anything_3.model.dinov2.layers.rope import RotaryPositionEmbedding2D

    t = torch.randn(2, 3, 64)
    vertical, horizontal = t.chunk(2, dim=-1)
    da3 = torch.cat([RotaryPositionEmbedding2D._rotate_features(vertical),
                     RotaryPositionEmbedding2D._rotate_features(horizontal)], dim=-1)
    assert torch.equal(rope_signs(64, t.device) * partner_perm(t), da3)


@pytest.mark.parametrize("with_norm", [True, False])
def test_norm_rope_equals_da3_norm_then_rope(backbone, with_norm):
    rope = backbone._rope
    rope.table_len = 6
    B, H, Dh = 2, 3, 32
    pos = _positions(B, 3, 5)
    t = torch.randn(B, pos.shape[1], H, Dh) * 3 + 0.5
    norm = torch.nn.LayerNorm(Dh, eps=1e-6) if with_norm else torch.nn.Identity()
    if with_norm:
        with torch.no_grad():
            norm.weight.normal_(1, 0.3)
            norm.bias.normal_(0, 0.3)
    cos, sin = rope_tables(rope, pos, Dh)
    ours = norm_rope(t, norm, cos, sin, rope_signs(Dh, t.device))
    with torch.no_grad():
        da3 = rope(norm(t.transpose(1, 2)), pos).transpose(1, 2)  # DA3: (B, H, N, Dh)
    torch.testing.assert_close(ours, da3, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, norm(t), atol=1e-3)  # the rotation did something


def test_fused_attention_matches_da3_attention_and_falls_back(backbone):
    vit = backbone.vit
    blk = next(b for b in vit.blocks if b.attn.rope is not None and isinstance(b.attn.q_norm, torch.nn.LayerNorm))
    fused = FusedNormRopeAttention(blk.attn)
    backbone._rope.table_len = 5
    pos = _positions(2, 3, 4)
    x = torch.randn(2, pos.shape[1], vit.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, pos=pos), blk.attn(x, pos=pos), rtol=1e-5, atol=1e-5)
        assert torch.equal(fused(x), blk.attn(x))  # no positions: DA3's own forward
        mask = torch.ones(2, pos.shape[1], pos.shape[1], dtype=torch.bool)
        assert torch.equal(fused(x, pos=pos, attn_mask=mask), blk.attn(x, pos=pos, attn_mask=mask))
        backbone._rope.table_len = None  # unknown grid: DA3's own (host-synchronising) table size
        assert torch.equal(fused(x, pos=pos), blk.attn(x, pos=pos))
    backbone._rope.table_len = 5
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fused)(x, pos=pos)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_fused_backbone_matches_da3_in_both_passes():
    torch.manual_seed(1)
    bb = DA3Backbone(BackboneConfig(name="tiny", lora_rank=4, process_res=70))
    with torch.no_grad():
        for p in bb.lora_parameters():
            p.normal_(0, 0.05)
    merge_lora(bb)
    x = torch.randn(1, 5, 3, 42, 56)  # >= 3 views: DA3 reorders the views
    with torch.no_grad():
        geo_ref, feats_ref = bb.forward_both(x)
        n = fuse_block_attention(bb.vit.blocks)
        geo, feats = bb.forward_both(x)
    with_rope = [b for b in bb.vit.blocks if isinstance(b.attn, FusedNormRopeAttention)]
    assert n == len(with_rope) == sum(i >= bb.vit.rope_start for i in range(len(bb.vit.blocks))) > 0
    assert fuse_block_attention(bb.vit.blocks) == 0
    torch.testing.assert_close(geo["depth"], geo_ref["depth"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(geo["extrinsics"], geo_ref["extrinsics"], rtol=1e-4, atol=1e-5)
    for a, b in zip(feats, feats_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_only_da3_attention_with_grid_rope_is_fused(backbone):
    blk = backbone.vit.blocks[-1]
    assert is_fusable_attention(blk.attn)
    assert not is_fusable_attention(torch.nn.MultiheadAttention(32, 4))
    with pytest.raises(ValueError, match="GridRope"):
        FusedNormRopeAttention(torch.nn.Linear(3, 3))
