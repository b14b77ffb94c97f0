"""Checkpoint folders (config.json + model.safetensors), DA3 weight loading, mismatch errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fast3dis_ros.model.da3.backbone import DA3Backbone
from fast3dis_ros.model.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    save_checkpoint,
)
from fast3dis_ros.model.da3.weights import load_da3_weights
from fast3dis_ros.model.config import BackboneConfig, Fast3disConfig
from fast3dis_ros.model.fast3dis import Fast3DIS


def x(V=3):
    return torch.randn(1, V, 3, 42, 56, generator=torch.Generator().manual_seed(0))


def perturb(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)


def assert_same(a, b):
    for k in ("depth", "depth_conf", "intrinsics", "extrinsics", "pred_logits", "pred_masks", "anchors"):
        assert torch.equal(a[k], b[k]), k


def test_config_json_roundtrip(tmp_path):
    for cfg in (Fast3disConfig.tiny(), Fast3disConfig.for_size("large", first_lora_block=10)):
        text = cfg.to_json(tmp_path / "c.json")
        back = Fast3disConfig.from_json(tmp_path / "c.json")
        assert back == cfg and json.loads(text)["backbone"]["name"] == cfg.backbone.name
    assert Fast3disConfig.for_size("large").head.in_channels == [2048] * 4
    assert BackboneConfig(name="large").lora_start == 12
    with pytest.raises(ValueError, match="unknown DA3 size"):
        BackboneConfig(name="huge")


def test_full_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = Fast3DIS(Fast3disConfig.tiny()).eval()  # tiny trains end to end -> full checkpoint
    perturb(m)
    save_checkpoint(m, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["contents"] == "full"
    m2, cfg2 = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert_same(m(x()), m2(x()))


def _da3_folder(backbone, folder):
    """A DA3 weights folder laid out as the authors publish it on the hub."""
    folder.mkdir()
    save_file({"model." + k: v.contiguous().clone() for k, v in backbone.da3_state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_name": "tiny-test"}))
    return folder


def test_trainable_checkpoint_with_da3_folder(tmp_path):
    torch.manual_seed(0)
    cfg = Fast3disConfig.tiny()
    cfg.train_backbone = False
    m = Fast3DIS(cfg).eval()
    perturb(m)
    da3 = _da3_folder(m.backbone, tmp_path / "da3")
    m.cfg.backbone.pretrained = str(da3)
    save_checkpoint(m, tmp_path / "ck")
    keys = load_file(str(tmp_path / "ck" / "model.safetensors")).keys()
    assert all(k.startswith("head.") or "lora_" in k for k in keys)
    m2, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert_same(m(x()), m2(x()))


def test_da3_weights_into_backbone(tmp_path):
    torch.manual_seed(0)
    src = DA3Backbone(BackboneConfig(name="tiny", lora_rank=4))
    da3 = _da3_folder(src, tmp_path / "da3")
    torch.manual_seed(1)
    dst = DA3Backbone(BackboneConfig(name="tiny", lora_rank=4, pretrained=str(da3)))  # loads before LoRA
    torch.manual_seed(2)
    late = DA3Backbone(BackboneConfig(name="tiny", lora_rank=4))
    load_da3_weights(late.net, da3)  # loads after LoRA injection (base_layer names)
    with torch.no_grad():
        ref = src.forward_geometry(x())
        for bb in (dst, late):
            assert torch.equal(bb.forward_geometry(x())["depth"], ref["depth"])
    with pytest.raises(CheckpointMismatchError, match="model_name='tiny-test'"):
        load_da3_weights(late.net, da3, expected_model_name="da3-large")


def test_mismatch_errors_name_keys_and_shapes(tmp_path):
    torch.manual_seed(0)
    m = Fast3DIS(Fast3disConfig.tiny())
    ck = save_checkpoint(m, tmp_path / "ck")
    sd = load_file(str(ck / "model.safetensors"))
    dropped = "head.query_feat.weight" if "head.query_feat.weight" in sd else sorted(k for k in sd if k.startswith("head."))[0]
    del sd[dropped]
    reshaped = "backbone.net.backbone.pretrained.cls_token"
    sd[reshaped] = torch.zeros(1, 1, 7)
    sd["head.bogus.weight"] = torch.zeros(3)
    save_file(sd, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as ei:
        load_checkpoint(ck)
    msg = str(ei.value)
    assert dropped in msg and "missing keys (1)" in msg
    assert "head.bogus.weight" in msg and "unexpected keys (1)" in msg
    assert reshaped in msg and "(1, 1, 96)" in msg and "(1, 1, 7)" in msg
    assert ei.value.missing == [dropped]


def test_missing_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_da3_weights(torch.nn.Linear(1, 1), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_checkpoint(tmp_path / "does-not-exist")  # absolute path: never tried on the hub


def test_full_checkpoint_stores_each_vit_tensor_once(tmp_path):
    """The ViT is reachable as ``backbone.vit`` but registered once: no tensor is written twice."""
    torch.manual_seed(0)
    model = Fast3DIS(Fast3disConfig.tiny()).eval()
    save_checkpoint(model, tmp_path / "ck", full=True)
    keys = list(load_file(str(tmp_path / "ck" / "model.safetensors")))
    assert not [k for k in keys if k.startswith("backbone.vit.")]
    vit_keys = [k for k in keys if k.startswith("backbone.net.backbone.pretrained.")]
    assert len(vit_keys) == len(model.backbone.vit.state_dict()) > 0
    assert len(keys) == len(model.state_dict())
    assert model.backbone.vit is model.backbone.net.backbone.pretrained


def _with_alias_keys(folder):
    """Rewrite a checkpoint the way older releases wrote it: every ViT tensor also under ``backbone.vit.``."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    prefix = "backbone.net.backbone.pretrained."
    twins = {"backbone.vit." + k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix)}
    assert twins
    save_file({**state, **twins}, str(path), metadata={"format": "fast3dis-v1", "contents": "full"})
    return twins


def test_older_checkpoints_with_alias_keys_still_load(tmp_path):
    torch.manual_seed(0)
    model = Fast3DIS(Fast3disConfig.tiny()).eval()
    perturb(model)
    save_checkpoint(model, tmp_path / "ck", full=True)
    _with_alias_keys(tmp_path / "ck")
    back, _ = load_checkpoint(tmp_path / "ck")
    with torch.no_grad():
        assert_same(model(x()), back(x()))


def test_alias_twin_that_differs_is_an_error(tmp_path):
    torch.manual_seed(0)
    model = Fast3DIS(Fast3disConfig.tiny()).eval()
    save_checkpoint(model, tmp_path / "ck", full=True)
    path = tmp_path / "ck" / "model.safetensors"
    twins = _with_alias_keys(tmp_path / "ck")
    state = load_file(str(path))
    key = sorted(twins)[0]
    state[key] = state[key] + 1.0
    save_file(state, str(path), metadata={"format": "fast3dis-v1", "contents": "full"})
    with pytest.raises(CheckpointMismatchError, match="differs from its twin"):
        load_checkpoint(tmp_path / "ck")


def test_training_init_refuses_weights_that_do_not_fit(tmp_path):
    """``fast3dis-train --init`` / resume: an unknown key used to be skipped silently."""
    from fast3dis_ros.train.loop import load_model_weights

    torch.manual_seed(0)
    model = Fast3DIS(Fast3disConfig.tiny()).eval()
    perturb(model)
    save_checkpoint(model, tmp_path / "ck", full=True)
    fresh = Fast3DIS(Fast3disConfig.tiny()).eval()
    load_model_weights(fresh, tmp_path / "ck")
    with torch.no_grad():
        assert_same(model(x()), fresh(x()))
    path = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(path))
    state["head.not_a_layer.weight"] = torch.zeros(3)
    save_file(state, str(path), metadata={"format": "fast3dis-v1", "contents": "full"})
    with pytest.raises(CheckpointMismatchError, match="head.not_a_layer.weight"):
        load_model_weights(fresh, tmp_path / "ck")
