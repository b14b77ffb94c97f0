"""FAST3DIS checkpoints (DA3 weight loading: ``model/da3/weights.py``).

A FAST3DIS checkpoint is a folder::

    config.json        Fast3disConfig.to_dict()  (+ "format": "fast3dis-v1", "contents")
    model.safetensors  LoRA adapters + instance head ("trainable"), or the whole network ("full",
                       always for cfg.train_backbone, e.g. the tiny model)

For a "trainable" checkpoint the frozen DA3 weights come from ``cfg.backbone.pretrained`` (or the
``da3_weights`` argument): a local folder / file or a Hugging Face hub id such as
``depth-anything/DA3-LARGE``. The DA3 authors publish ``model.safetensors`` + ``config.json``
(``{"model_name": "da3-large", ...}``) saved from ``depth_anything_3.api.DepthAnything3``, whose
network attribute is ``model`` -- so tensor names start with ``model.`` (``model.backbone.pretrained.
blocks.0.attn.qkv.weight``, ``model.head...``, ``model.cam_enc...``, ``model.cam_dec...``). Raw training
checkpoints (``module.``/``.net.`` names) are converted with DA3's own ``convert_general_state_dict``.
The hub is only contacted when the given path does not exist locally.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from fast3dis_ros.model.config import Fast3disConfig
from fast3dis_ros.model.fast3dis import Fast3DIS
from fast3dis_ros.model.weights_io import (  # noqa: F401 (CheckpointMismatchError: the error callers catch)
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    CheckpointMismatchError,
    check_and_load,
    read_tensors,
    resolve_path,
)

#: The small tiny-configuration checkpoint shipped inside the package (trained on synthetic scenes only).
BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "fast3dis_tiny"


#: Older releases registered the DA3 ViT twice (``backbone.vit`` beside ``backbone.net.backbone.pretrained``),
#: so their checkpoints hold every ViT tensor under both names.
_ALIAS_PREFIX = "backbone.vit."
_CANONICAL_PREFIX = "backbone.net.backbone.pretrained."


def drop_alias_keys(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` without the duplicate ``backbone.vit.*`` names of older checkpoints.

    Why: the same tensor was stored twice; loading both names against a model that registers the ViT
    once would report them as unexpected. A twin that differs from its canonical copy means the file
    was edited by hand, and which one the network should use is unknowable, so that is an error.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(_ALIAS_PREFIX):
            out[key] = value
            continue
        canonical = _CANONICAL_PREFIX + key[len(_ALIAS_PREFIX):]
        twin = state.get(canonical)
        if twin is None:
            out[canonical] = value
        elif not torch.equal(twin, value):
            raise CheckpointMismatchError(source, [], [key], [],
                                          extra=f"{key} differs from its twin {canonical}")
    return out


# ---------------------------------------------------------------------------------------------- FAST3DIS
def save_checkpoint(model: nn.Module, folder: str | os.PathLike, full: bool | None = None, extra: dict | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (trainable weights, or everything when ``full``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    full = cfg.train_backbone if full is None else full
    state = model.state_dict() if full else model.trainable_state_dict()
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = cfg.to_dict()
    meta["format"] = FORMAT
    meta["contents"] = "full" if full else "trainable"
    if extra:
        meta["extra"] = extra
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": FORMAT, "contents": meta["contents"]})
    return folder


def read_checkpoint_config(folder: str | os.PathLike):
    folder = resolve_path(folder, allow_patterns=["*.json", "*.safetensors"])
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder}: missing {CONFIG_NAME} (a FAST3DIS checkpoint holds {CONFIG_NAME} + {WEIGHTS_NAME})")
    meta = json.loads(cfg_path.read_text())
    contents = meta.pop("contents", "trainable")
    meta.pop("format", None)
    meta.pop("extra", None)
    return Fast3disConfig.from_dict(meta), contents, folder


def load_checkpoint(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    da3_weights: str | None = None,
):
    """Build ``Fast3DIS`` from a checkpoint folder (or hub id). Returns ``(model, cfg)``.

    ``da3_weights`` overrides ``cfg.backbone.pretrained`` for "trainable" checkpoints.
    """
    cfg, contents, folder = read_checkpoint_config(folder)
    wpath = folder / WEIGHTS_NAME
    if not wpath.exists():
        raise FileNotFoundError(f"{folder}: missing {WEIGHTS_NAME}")
    if contents == "full":
        cfg.backbone.pretrained = None  # every weight is in the file
    elif da3_weights is not None:
        cfg.backbone.pretrained = da3_weights
    model = Fast3DIS(cfg)
    state = drop_alias_keys(read_tensors(wpath), str(wpath))
    expected = set(model.state_dict()) if contents == "full" else set(model.trainable_state_dict())
    check_and_load(model, state, str(wpath), expected=expected)
    model.to(device).eval()
    return model, cfg
