"""The DA3 transcription's guards: the pinned version, the RoPE module replacement, scoped dynamo limits,
and private DA3/peft members used only through ``model/da3/internals.py``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fast3dis_ros.model.config import Fast3disConfig
from fast3dis_ros.model.da3.backbone import DA3Backbone
from fast3dis_ros.model.da3.version import DA3_VERSION, DA3VersionError, check_da3_version
from fast3dis_ros.model.da3.grid_rope import GridRope

ROOT = Path(__file__).resolve().parents[1] / "fast3dis_ros"


def test_installed_da3_is_the_pinned_version_and_another_one_is_refused():
    assert check_da3_version() == DA3_VERSION == "0.1.1"
    with pytest.raises(DA3VersionError, match=r"depth-anything-3 0\.2\.0 is installed.*==0\.1\.1"):
        check_da3_version("0.2.0")


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return DA3Backbone(Fast3disConfig.tiny().backbone)


def test_rope_is_replaced_by_a_new_module_not_a_class_swap(backbone):
    from depth_anything_3.model.dinov2.layers.rope import RotaryPositionEmbedding2D

    vit = backbone.vit
    assert type(vit.rope) is GridRope and backbone._rope is vit.rope
    users = [m for m in vit.modules() if isinstance(getattr(m, "rope", None), RotaryPositionEmbedding2D)]
    assert len(users) > 1 and all(m.rope is vit.rope for m in users)  # every attention shares the new one
    assert "__class__" not in (ROOT / "model" / "da3" / "grid_rope.py").read_text()


def test_compile_changes_no_global_dynamo_setting(backbone):
    import torch._dynamo

    from fast3dis_ros.model.fastpath.accelerate import FastRunner

    before = torch._dynamo.config.cache_size_limit
    with backbone.runner.scope(), FastRunner().scope():
        assert torch._dynamo.config.cache_size_limit == before  # exact, or not compiled: nothing raised
    with FastRunner(compiled=True).scope():
        assert torch._dynamo.config.cache_size_limit == max(before, 64)
    assert torch._dynamo.config.cache_size_limit == before
    src = "\n".join(p.read_text() for p in ROOT.rglob("*.py"))
    assert not re.search(r"_dynamo\.config\.\w+\s*=", src)


def test_private_da3_and_peft_members_only_in_the_adapter_module():
    pattern = re.compile(r"\.(_process_depth_head|_process_camera_estimation|_process_mono_sky_estimation|"
                         r"_add_pos_embed|_apply_activation_single|_compute_frequency_components)\(|"
                         r"\w\._disable_adapters\b")
    allowed = {ROOT / "model" / "da3" / "internals.py", ROOT / "model" / "da3" / "grid_rope.py",
               ROOT / "model" / "fastpath" / "merged_lora.py"}  # a subclass's own / our own attribute
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in ROOT.rglob("*.py") if p not in allowed
           for m in pattern.finditer(p.read_text())]
    assert not bad, bad


def test_adapters_switch_through_the_adapter_module(backbone):
    layers = backbone._lora_layers
    assert layers
    with backbone.adapters(False):
        assert all(m.disable_adapters for m in layers)
    assert not any(m.disable_adapters for m in layers)
    assert all(p.requires_grad for p in backbone.lora_parameters())  # enable_adapters would have touched it
