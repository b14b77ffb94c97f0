"""Configuration dataclasses of the FAST3DIS network (backbone + instance head + losses).

``Fast3disConfig`` round-trips through JSON (``to_dict`` / ``from_dict``) and is stored as
``config.json`` in every FAST3DIS checkpoint folder (see ``checkpoint.py``).

Facts about Depth Anything 3 that the defaults below encode (read from the ``depth_anything_3``
package, version 0.1.1, ``configs/da3-*.yaml`` and ``model/dinov2``):

* DA3 any-view models are DINOv2 ViTs with patch 14. Blocks ``>= alt_start`` alternate between
  per-view ("local") attention (even index) and all-views ("global") attention (odd index).
* The DualDPT head taps 4 blocks (``out_layers``); every tap is ``cat([local tokens, norm(tokens)])``
  so each tap has ``2 * embed_dim`` channels.
* The camera decoder reads the camera token of the last tap.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fast3dis_ros.model.schedule import WarmupDecaySchedule

#: DA3's input normalisation (ImageNet mean/std, RGB in [0, 1]); the one definition for the model,
#: the dataset readers and the training transforms.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: DA3 sizes: registry name, ViT embed dim, depth, heads, tapped blocks, alt_start.
DA3_SPECS: dict[str, dict[str, Any]] = {
    "tiny": dict(registry=None, embed_dim=96, depth=6, num_heads=3, out_layers=[2, 3, 4, 5], alt_start=2),
    "small": dict(registry="da3-small", embed_dim=384, depth=12, num_heads=6, out_layers=[5, 7, 9, 11], alt_start=4),
    "base": dict(registry="da3-base", embed_dim=768, depth=12, num_heads=12, out_layers=[5, 7, 9, 11], alt_start=4),
    "large": dict(registry="da3-large", embed_dim=1024, depth=24, num_heads=16, out_layers=[11, 15, 19, 23], alt_start=8),
    "giant": dict(registry="da3-giant", embed_dim=1536, depth=40, num_heads=24, out_layers=[19, 27, 33, 39], alt_start=13),
}

#: Hub ids where the DA3 authors publish weights (safetensors + config.json).
DA3_HUB_IDS = {
    "small": "depth-anything/DA3-SMALL",
    "base": "depth-anything/DA3-BASE",
    "large": "depth-anything/DA3-LARGE",
    "giant": "depth-anything/DA3-GIANT",
}

DEFAULT_LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.w12", "mlp.w3")


@dataclass
class BackboneConfig:
    """DA3 backbone with LoRA on its late blocks.

    ``first_lora_block``: LoRA is injected only into ViT blocks with index ``>= first_lora_block``;
    blocks before it are computed once and shared by the geometry pass (adapters off) and the
    feature pass (adapters on). ``None`` = automatic: one past the first tapped block
    (small/base: 6 of 12, large: 12 of 24, giant: 20 of 40, tiny: 3 of 6).
    """

    name: str = "large"  # tiny | small | base | large | giant
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    first_lora_block: int | None = None
    process_res: int = 504  # long edge of the processing resolution (multiple of 14)
    ref_view_strategy: str = "saddle_balanced"  # DA3's reference-view choice (first|middle|saddle_*)
    pretrained: str | None = None  # DA3 weights: local folder or hub id (None = random init)
    # tiny-only overrides (ignored for the published sizes)
    tiny_embed_dim: int = 96
    tiny_depth: int = 6
    tiny_num_heads: int = 3
    tiny_head_features: int = 32

    def __post_init__(self) -> None:
        if self.name not in DA3_SPECS:
            raise ValueError(f"unknown DA3 size {self.name!r}; expected one of {sorted(DA3_SPECS)}")
        self.lora_targets = tuple(self.lora_targets)
        if self.process_res % 14:
            raise ValueError(f"process_res must be a multiple of 14, got {self.process_res}")

    @property
    def spec(self) -> dict[str, Any]:
        spec = dict(DA3_SPECS[self.name])
        if self.name == "tiny":
            spec.update(embed_dim=self.tiny_embed_dim, depth=self.tiny_depth, num_heads=self.tiny_num_heads)
            d = self.tiny_depth
            spec["out_layers"] = [d - 4, d - 3, d - 2, d - 1]
            spec["alt_start"] = max(1, d - 4)
        return spec

    @property
    def registry_name(self) -> str | None:
        return self.spec["registry"]

    @property
    def embed_dim(self) -> int:
        return int(self.spec["embed_dim"])

    @property
    def depth(self) -> int:
        return int(self.spec["depth"])

    @property
    def out_layers(self) -> list[int]:
        return list(self.spec["out_layers"])

    @property
    def feature_channels(self) -> list[int]:
        """Channels of the 4 taps handed to the instance head (local + normed global tokens)."""
        return [2 * self.embed_dim] * 4

    @property
    def lora_start(self) -> int:
        if self.first_lora_block is None:
            return min(self.out_layers[0] + 1, self.depth - 1)
        if not 0 <= self.first_lora_block < self.depth:
            raise ValueError(f"first_lora_block must be in [0, {self.depth}), got {self.first_lora_block}")
        return int(self.first_lora_block)


#: Key names of the loss section in checkpoints written before the two loss configs became one
#: (``LossWeights``), and the ``LossConfig`` field each one sets. Read explicitly, so a misspelt or
#: unknown key is an error rather than a silently dropped weight.
LEGACY_LOSS_KEYS = {"objectness": "weight_obj", "mask_bce": "weight_mask", "mask_dice": "weight_dice",
                    "contrastive": "weight_contrastive"}


@dataclass
class LossConfig:
    """The one configuration of the set criterion (``train/losses.py``) and its matcher.

    Names follow Mask2Former (``weight_*``: loss weights, ``cost_*``: matcher costs) + the FAST3DIS
    terms (anchor L1, multi-view contrastive, confidence-weighted overlap penalty with its schedule).
    Stored in every checkpoint's ``config.json`` (``Fast3disConfig.loss``).
    """

    weight_obj: float = 2.0
    weight_mask: float = 5.0
    weight_dice: float = 5.0
    weight_anchor: float = 1.0
    weight_contrastive: float = 1.0
    #: overlap-penalty weight over the steps; the training loop fits warm-up and length to the run
    #: (``train.loop.build_criterion``) and keeps ``max_weight``, ``floor`` and ``decay``.
    overlap: WarmupDecaySchedule = field(default_factory=WarmupDecaySchedule)
    overlap_on_aux: bool = True
    overlap_objectness_weighted: bool = False  # sum_q sigmoid(obj_q) * sigmoid(m_qp) instead of sum_q sigmoid(m_qp)
    # focal alpha 0.5 (= balanced): with ~10 instances for 16 queries positives are not rare, and RetinaNet's
    # 0.25 pushed objectness scores of matched queries below the 0.3-0.5 thresholds of validation/postprocess
    focal_alpha: float = 0.5
    focal_gamma: float = 2.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    contrastive_points: int = 1024
    contrastive_temperature: float = 0.1
    deep_supervision: bool = True
    # matcher costs
    cost_score: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    cost_anchor: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LossConfig":
        """Inverse of ``to_dict``; also reads the legacy ``LossWeights`` keys (``LEGACY_LOSS_KEYS``, a
        number for ``overlap`` = its peak weight with floor 10%, ``depth`` = 0). Unknown keys raise."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - set(LEGACY_LOSS_KEYS) - {"depth"})
        if unknown:
            raise ValueError(f"LossConfig has no fields {unknown} (known: {sorted(known)})")
        depth = d.pop("depth", 0.0)
        if depth:
            raise ValueError(f"loss.depth={depth}: depth distillation is TrainConfig.geometry_loss_weight, not a "
                             "loss config field")
        for old, new in LEGACY_LOSS_KEYS.items():
            if old in d:
                if new in d:
                    raise ValueError(f"loss config sets both {old!r} (legacy) and {new!r}")
                d[new] = d.pop(old)
        ov = d.get("overlap")
        if isinstance(ov, dict):
            d["overlap"] = WarmupDecaySchedule.from_dict(ov)
        elif isinstance(ov, (int, float)):
            d["overlap"] = WarmupDecaySchedule(max_weight=float(ov), floor=0.1 * float(ov))
        return cls(**d)


def _head_config_cls():
    from fast3dis_ros.model.head.config import InstanceHeadConfig

    return InstanceHeadConfig


def _default_head() -> Any:
    return make_head_config(BackboneConfig().feature_channels)


def make_head_config(in_channels: list[int], **overrides: Any) -> Any:
    """Build model B's ``InstanceHeadConfig`` with ``in_channels`` and any fields it has."""
    cls = _head_config_cls()
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"in_channels": list(in_channels)}
    kwargs.update({k: v for k, v in overrides.items() if k in names})
    return cls(**kwargs)


def head_config_from_dict(d: dict[str, Any]) -> Any:
    cls = _head_config_cls()
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"InstanceHeadConfig has no fields {unknown}")
    return cls(**d)


def _head_to_dict(head: Any) -> dict[str, Any]:
    if hasattr(head, "to_dict"):
        return head.to_dict()
    return dataclasses.asdict(head)


@dataclass
class Fast3disConfig:
    """The whole network: DA3 backbone + LoRA, instance head (model B's InstanceHeadConfig), losses."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: Any = field(default_factory=_default_head)
    loss: LossConfig = field(default_factory=LossConfig)
    train_backbone: bool = False  # True: every parameter trains (tiny end-to-end); False: LoRA + head
    score_threshold: float = 0.5  # postprocess: keep queries with score above this
    mask_threshold: float = 0.5  # postprocess: mask probability threshold

    # ------------------------------------------------------------------ constructors
    @classmethod
    def for_size(cls, name: str, **backbone_overrides: Any) -> "Fast3disConfig":
        if name == "tiny":
            return cls.tiny(**backbone_overrides)
        bb = BackboneConfig(name=name, **backbone_overrides)
        head = make_head_config(bb.feature_channels, hidden_dim=256, num_queries=80)
        return cls(backbone=bb, head=head)

    @classmethod
    def tiny(cls, **backbone_overrides: Any) -> "Fast3disConfig":
        """Random-init network that builds and runs in well under a second on CPU (tests, demo)."""
        kw = dict(name="tiny", lora_rank=4, lora_alpha=8.0, process_res=70)
        kw.update(backbone_overrides)
        bb = BackboneConfig(**kw)
        cls_head = _head_config_cls()
        if hasattr(cls_head, "tiny"):
            head = cls_head.tiny(bb.feature_channels)
        else:
            head = make_head_config(bb.feature_channels, hidden_dim=32, num_queries=16, num_heads=4)
        return cls(backbone=bb, head=head, train_backbone=True)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        bb = dataclasses.asdict(self.backbone)
        bb["lora_targets"] = list(bb["lora_targets"])
        return {
            "backbone": bb,
            "head": _head_to_dict(self.head),
            "loss": self.loss.to_dict(),
            "train_backbone": self.train_backbone,
            "score_threshold": self.score_threshold,
            "mask_threshold": self.mask_threshold,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fast3disConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Fast3disConfig has no fields {unknown}")
        kwargs: dict[str, Any] = {k: d[k] for k in ("train_backbone", "score_threshold", "mask_threshold") if k in d}
        bb = BackboneConfig(**d.get("backbone", {}))
        kwargs["backbone"] = bb
        kwargs["head"] = head_config_from_dict(d["head"]) if "head" in d else make_head_config(bb.feature_channels)
        kwargs["loss"] = LossConfig.from_dict(d.get("loss", {}))
        return cls(**kwargs)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "Fast3disConfig":
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(path_or_text)
        return cls.from_dict(json.loads(text))
