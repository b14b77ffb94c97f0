"""DA3Backbone: geometry pass == plain DA3 (bit-exact), LoRA behaviour, pass sharing, known cameras.

Tiny DA3 (DA3 classes, random weights) on CPU. DA3 facts pinned here: for >= 3 views and no known
cameras DA3 picks a reference view by content ('saddle_balanced'), so per-view depth is permutation
equivariant; for 1-2 views view 0 is the reference and it is not.
"""

import pytest
import torch

from fast3dis_ros.model.da3.backbone import DA3Backbone, build_da3_net
from fast3dis_ros.model.config import BackboneConfig

H, W = 42, 56


def make(first_lora_block=None, seed=0):
    torch.manual_seed(seed)
    bb = DA3Backbone(BackboneConfig(name="tiny", lora_rank=4, process_res=70, first_lora_block=first_lora_block))
    plain = build_da3_net(bb.cfg).eval()
    plain.load_state_dict(bb.da3_state_dict(), strict=True)
    return bb, plain


@pytest.fixture(scope="module")
def pair():
    return make()


def images(V, seed=1):
    return torch.randn(1, V, 3, H, W, generator=torch.Generator().manual_seed(seed))


def assert_geometry_equal(geo, ref):
    assert torch.equal(geo["depth"], ref["depth"])
    assert torch.equal(geo["depth_conf"], ref["depth_conf"])
    assert torch.equal(geo["intrinsics"], ref["intrinsics"])
    assert geo["extrinsics"].shape[-2:] == (4, 4) and ref["extrinsics"].shape[-2:] == (3, 4)
    assert torch.equal(geo["extrinsics"][..., :3, :], ref["extrinsics"])
    assert torch.equal(geo["extrinsics"][..., 3, :], torch.tensor([0.0, 0, 0, 1]).expand_as(geo["extrinsics"][..., 3, :]))


@pytest.mark.parametrize("V", [1, 2, 5, 9])  # 9 > DualDPT's chunk of 8 views
def test_geometry_bit_identical_to_plain_da3(pair, V):
    bb, plain = pair
    x = images(V)
    with torch.no_grad():
        ref = plain(x)
        geo = bb.forward_geometry(x)
        geo2, feats = bb.forward_both(x)
    assert ref["depth"].shape == (1, V, H, W)
    assert_geometry_equal(geo, ref)
    assert_geometry_equal(geo2, ref)
    assert [tuple(f.shape) for f in feats] == [(1, V, 192, H // 14, W // 14)] * 4


@pytest.mark.parametrize("first", [0, 5])
def test_sharing_split_points(first):
    bb, plain = make(first_lora_block=first)
    assert bb.lora_start == first
    assert all(int(n.split(".")[3]) >= first for n, _ in bb.net.named_parameters() if "lora_" in n)
    x = images(4)
    with torch.no_grad():
        for n, p in bb.net.named_parameters():  # make the adapters do something
            if "lora_B" in n:
                p.normal_(0, 0.1)
        ref = plain(x)
        geo, feats = bb.forward_both(x)
        feats_alone = bb.forward_features(x)
    assert_geometry_equal(geo, ref)
    for a, b in zip(feats, feats_alone):
        assert torch.equal(a, b)


def test_lora_zero_init_then_perturbed():
    bb, plain = make(seed=3)
    x = images(3)
    with torch.no_grad():
        f_lora = bb.forward_features(x)  # adapters on, lora_B == 0 (peft init)
        with bb.adapters(False):  # same trunk, adapters off
            st = bb._run_blocks(bb._stem(x, None, None), bb._last_block, bb.cfg.ref_view_strategy)
            f_off = bb._feature_outputs(st, H, W)
    for a, b in zip(f_lora, f_off):
        assert torch.equal(a, b)  # zero-initialised adapters are an exact no-op
    with torch.no_grad():
        for n, p in bb.net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        f_pert = bb.forward_features(x)
        geo = bb.forward_geometry(x)
        ref = plain(x)
    changed = [not torch.allclose(a, b) for a, b in zip(f_lora, f_pert)]
    lora_taps = [i >= bb.lora_start for i in bb.out_layers]
    assert changed == lora_taps  # taps before first_lora_block are shared, later ones change
    assert_geometry_equal(geo, ref)


def test_only_lora_trains_and_gets_gradients():
    bb, _ = make(seed=4)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n for n, p in bb.named_parameters() if "lora_" in n} == trainable
    with torch.no_grad():
        for n, p in bb.net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    geo, feats = bb.forward_both(images(3))
    assert not geo["depth"].requires_grad  # frozen geometry pass runs without autograd
    sum(f.square().mean() for f in feats).backward()
    for n, p in bb.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_known_cameras_feed_camera_encoder(pair):
    bb, plain = pair
    V = 3
    x = images(V)
    with torch.no_grad():
        free = bb.forward_geometry(x)
        K = free["intrinsics"].clone()
        T = free["extrinsics"].clone()
        T[:, 1:, :3, 3] += 0.3
        tok = bb.encode_cameras(K, T, (H, W))
        geo = bb.forward_geometry(x, K=K, T_cam_world=T)
        ref = plain(x, extrinsics=T, intrinsics=K)
        _, feats = bb.forward_both(x, K=K, T_cam_world=T)
        _, feats_free = bb.forward_both(x)
    assert tok.shape == (1, V, bb.vit.embed_dim)
    default_tok = torch.cat([bb.vit.camera_token[:, :1], bb.vit.camera_token[:, 1:].expand(1, V - 1, -1)], 1)
    assert not torch.allclose(tok, default_tok)
    assert_geometry_equal(geo, ref)  # same as DA3 given the same cameras
    assert not torch.allclose(geo["depth"], free["depth"])
    assert not torch.allclose(feats[-1], feats_free[-1])
    with pytest.raises(ValueError, match="intrinsics"):
        bb.forward_geometry(x, T_cam_world=T)


def test_view_permutation(pair):
    bb, _ = pair
    x = images(4, seed=7)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        a = bb.forward_geometry(x)
        b = bb.forward_geometry(x[:, perm])
        a2 = bb.forward_geometry(x[:, :2])
        b2 = bb.forward_geometry(x[:, [1, 0]])
    # >= 3 views: reference chosen by content -> per-view outputs permute with the views
    torch.testing.assert_close(b["depth"], a["depth"][:, perm], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["depth_conf"], a["depth_conf"][:, perm], rtol=1e-4, atol=1e-4)
    # relative poses are world-independent and permute too
    rel = lambda T, i, j: T[:, i] @ torch.linalg.inv(T[:, j])  # noqa: E731
    inv = torch.argsort(perm)
    torch.testing.assert_close(rel(b["extrinsics"], inv[0], inv[1]), rel(a["extrinsics"], 0, 1), rtol=1e-3, atol=1e-3)
    # 2 views: view 0 is DA3's reference view, so swapping changes the result
    assert not torch.allclose(b2["depth"], a2["depth"][:, [1, 0]], atol=1e-4)


def test_image_size_validation(pair):
    bb, _ = pair
    with pytest.raises(ValueError, match="multiple of 14"):
        bb.forward_geometry(torch.randn(1, 1, 3, 40, 56))


def test_fresh_tiny_net_has_live_fov_branch():
    """A from-scratch net must predict finite focal lengths with a gradient (DA3's FoV ReLU is dead at 0)."""
    import torch

    from fast3dis_ros.model.da3.backbone import build_da3_net
    from fast3dis_ros.model.config import Fast3disConfig

    cfg = Fast3disConfig.tiny()
    net = build_da3_net(cfg.backbone)
    fov_layer = net.cam_dec.fc_fov[0]
    feat = torch.randn(1, 3, fov_layer.in_features)
    fov = net.cam_dec.fc_fov(feat)
    assert torch.all(fov > 0.5) and torch.all(fov < 1.6), fov
    fov.sum().backward()
    assert fov_layer.bias.grad is not None and torch.all(fov_layer.bias.grad != 0)


@pytest.mark.parametrize("bf16", [False, True])
def test_dpt_position_embeddings_cached_and_identical(pair, bf16):
    """The DPT head's UV embeddings, computed once per image size, give DA3's sums to the bit."""
    from fast3dis_ros.model.da3.dpt_head import dualdpt_depth_only

    bb, _ = pair
    x = images(3)
    head = bb.net.head
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        st = bb._run_blocks(bb._stem(x, None, None), bb._last_block, bb.cfg.ref_view_strategy)
        feats = bb._finish_taps(st)
        pe = bb._dpt_pos_embeds(head, H, W, x.device)
        assert bb._dpt_pos_embeds(head, H, W, x.device) is pe  # cached
        assert [tuple(p.shape) for p in pe][-1] == (1, head.scratch.output_conv1.out_channels, H, W)
        ref = dualdpt_depth_only(head, feats, H, W)  # DA3's _add_pos_embed on every call
        out = dualdpt_depth_only(head, feats, H, W, pos_embeds=pe)
    assert ref["depth"].dtype == out["depth"].dtype
    assert torch.equal(out["depth"], ref["depth"]) and torch.equal(out["depth_conf"], ref["depth_conf"])
    with torch.no_grad():
        other = bb._dpt_pos_embeds(head, 2 * H, W, x.device)
    assert other is not pe and other[-1].shape[-2:] == (2 * H, W)
    assert bb._dpt_pos_embeds(head, H, W, x.device) is None  # autograd on: DA3's own, uncached


def test_dpt_embedding_folded_through_the_first_output_conv(pair):
    """``fold_dpt_pe`` (fast runner): conv(up + pe) computed as conv(up) + conv_nobias(pe); in fp32 the two
    agree to rounding, and the folded term is recomputed when the conv weight changes, never reused."""
    from fast3dis_ros.model.da3.dpt_head import dualdpt_depth_only
    from fast3dis_ros.model.fastpath.accelerate import FastRunner
    from fast3dis_ros.model.fastpath.dpt_head import fast_dualdpt_main

    bb, _ = pair
    x = images(3)
    head = bb.net.head
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        st = bb._run_blocks(bb._stem(x, None, None), bb._last_block, bb.cfg.ref_view_strategy)
        feats = bb._finish_taps(st)
        pe = bb._dpt_pos_embeds(head, H, W, x.device)
        assert FastRunner().pe_conv(head, H, W, pe) is None  # off unless asked for
        runner = FastRunner(fold_dpt_pe=True)
        pe_conv = runner.pe_conv(head, H, W, pe)
        assert pe_conv.shape == (1, head.scratch.output_conv2[0].out_channels, H, W)
        assert pe_conv.dtype == torch.float32 and pe_conv.abs().max() > 1e-3  # a real term, not zeros
        assert runner.pe_conv(head, H, W, pe) is pe_conv  # cached
        ref = dualdpt_depth_only(head, feats, H, W, pos_embeds=pe)
        out = dualdpt_depth_only(head, feats, H, W, impl=runner.dpt_chunk, pos_embeds=pe)
        for key in ("depth", "depth_conf"):
            rel = ((out[key] - ref[key]).abs() / ref[key].abs().clamp(min=1e-6)).max()
            assert 0 < rel < 1e-4, (key, float(rel))  # folded (rounds differently), and close
        # the fast path runs it compiled: one graph, no break, same values
        compiled = torch.compile(fast_dualdpt_main, backend="aot_eager", fullgraph=True, dynamic=False)
        flat = [f[0].reshape(-1, *f[0].shape[2:]) for f in feats]
        traced = compiled(head, flat, H, W, pe, pe_conv)
        torch.testing.assert_close(traced["depth"].reshape(out["depth"].shape), out["depth"])
        head.scratch.output_conv2[0].weight.mul_(2.0)  # new weights: a new folded term
        try:
            pe_conv2 = runner.pe_conv(head, H, W, pe)
            assert pe_conv2 is not pe_conv and torch.allclose(pe_conv2, 2 * pe_conv, rtol=1e-5, atol=1e-6)
        finally:
            head.scratch.output_conv2[0].weight.div_(2.0)


def test_dpt_head_with_channels_last_upsampling_inputs_is_the_same_head(pair):
    """``dpt_nhwc`` (fast runner) only changes memory layouts: same values, eager and traced in one graph."""
    from fast3dis_ros.model.da3.dpt_head import dualdpt_depth_only
    from fast3dis_ros.model.fastpath.accelerate import FastRunner
    from fast3dis_ros.model.fastpath.dpt_head import fast_dualdpt_main

    bb, _ = pair
    x = images(3)
    head = bb.net.head
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        st = bb._run_blocks(bb._stem(x, None, None), bb._last_block, bb.cfg.ref_view_strategy)
        feats = bb._finish_taps(st)
        pe = bb._dpt_pos_embeds(head, H, W, x.device)
        ref = dualdpt_depth_only(head, feats, H, W, pos_embeds=pe)
        out = dualdpt_depth_only(head, feats, H, W, impl=FastRunner(dpt_nhwc=True).dpt_chunk, pos_embeds=pe)
        flat = [f[0].reshape(-1, *f[0].shape[2:]) for f in feats]
        compiled = torch.compile(fast_dualdpt_main, backend="aot_eager", fullgraph=True, dynamic=False)
        traced = compiled(head, flat, H, W, pe, None, True)
    for key in ("depth", "depth_conf"):
        torch.testing.assert_close(out[key], ref[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(traced["depth"].reshape(ref["depth"].shape), ref["depth"], rtol=1e-5, atol=1e-6)


def test_shape_cache_keeps_the_recent_shapes():
    """Alternating window sizes must not free a tensor an older captured graph still reads."""
    from fast3dis_ros.model.da3.backbone import ShapeCache

    c = ShapeCache(size=3)
    tensors = {k: torch.zeros(1) for k in "abcd"}
    for k in "abc":
        assert c.put((k,), tensors[k]) is tensors[k]
    assert c.get(("a",)) is tensors["a"]  # a is now the most recent
    c.put(("d",), tensors["d"])  # evicts b, the least recently used
    assert c.get(("b",)) is None and len(c) == 3
    assert all(c.get((k,)) is tensors[k] for k in "acd")


def test_dpt_embeddings_survive_alternating_sizes(pair):
    bb, _ = pair
    head = bb.net.head
    with torch.no_grad():
        small = bb._dpt_pos_embeds(head, H, W, torch.device("cpu"))
        big = bb._dpt_pos_embeds(head, 2 * H, W, torch.device("cpu"))
        assert bb._dpt_pos_embeds(head, H, W, torch.device("cpu")) is small  # not recomputed (nor freed)
        assert bb._dpt_pos_embeds(head, 2 * H, W, torch.device("cpu")) is big
