"""DA3 weights: read a DA3 checkpoint (hub folder, raw training file, or a FAST3DIS checkpoint's DA3 part)
into plain ``DepthAnything3Net`` naming and load it into a network with or without LoRA layers.

The DA3 authors publish ``model.safetensors`` + ``config.json`` (``{"model_name": "da3-large", ...}``)
saved from ``depth_anything_3.api.DepthAnything3``, whose network attribute is ``model``, so tensor names
start with ``model.``; raw training checkpoints (``module.``/``.net.`` names) are converted with DA3's own
``convert_general_state_dict``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn as nn

from fast3dis_ros.model.config import DA3_SPECS
from fast3dis_ros.model.weights_io import (
    CONFIG_NAME,
    FORMAT,
    CheckpointMismatchError,
    check_and_load,
    read_tensors,
    resolve_path,
    weights_files,
)


def da3_state_dict_from(path_or_id: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """DA3 weights in ``DepthAnything3Net`` naming (no ``model.`` prefix) + the folder's config.json.

    A FAST3DIS checkpoint folder (config.json ``format`` fast3dis-v1, "full" contents) gives its DA3 part.
    """
    p = resolve_path(path_or_id, allow_patterns=["*.json", "*.safetensors"])
    cfg: dict[str, Any] = {}
    if p.is_dir():
        if (p / CONFIG_NAME).exists():
            cfg = json.loads((p / CONFIG_NAME).read_text())
        files = weights_files(p)
    else:
        files = [p]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_tensors(f))
    if cfg.get("format") == FORMAT:
        return fast3dis_da3_part(state, cfg, str(path_or_id))
    if any(k.startswith("module.") or ".net." in k for k in state):
        from depth_anything_3.utils.model_loading import convert_general_state_dict

        state = convert_general_state_dict(state)
    if any(k.startswith("model.da3.") for k in state):
        raise CheckpointMismatchError(str(path_or_id), extra="nested (any-view + metric) DA3 checkpoints are not supported")
    if all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return state, cfg


def plain_da3_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA-injected ``DepthAnything3Net`` state in plain DA3 naming: LoRA tensors dropped, peft's
    ``.base_layer.`` unwrapped."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def fast3dis_da3_part(state: dict[str, torch.Tensor], meta: dict[str, Any], source: str
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The frozen DA3 weights inside a FAST3DIS checkpoint, in ``DepthAnything3Net`` naming.

    Why: a FAST3DIS checkpoint can stand in for "pretrained DA3" (the LoRA split study starts fresh
    adapters + head on the bundled tiny model's DA3 part). These are the weights the adapter-free
    geometry pass runs on: ``backbone.net.*`` without the LoRA tensors, ``.base_layer.`` unwrapped.
    A "trainable" checkpoint holds no DA3 weights (they come from its ``backbone.pretrained``).
    """
    if meta.get("contents") != "full":
        raise CheckpointMismatchError(source, extra="this FAST3DIS checkpoint stores LoRA + head only; its DA3 "
                                      f"weights are {meta.get('backbone', {}).get('pretrained')!r}")
    prefix = "backbone.net."
    da3 = plain_da3_names({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    name = meta.get("backbone", {}).get("name")
    return da3, {"model_name": DA3_SPECS.get(name, {}).get("registry")}


def load_da3_weights(net: nn.Module, path_or_id: str | os.PathLike, expected_model_name: str | None = None) -> None:
    """Load DA3 weights into a ``DepthAnything3Net`` (with or without injected LoRA layers).

    Raises ``CheckpointMismatchError`` naming missing / unexpected keys and shape mismatches, or when the
    folder's config.json names another model than ``expected_model_name`` (e.g. 'da3-large').
    """
    state, cfg = da3_state_dict_from(path_or_id)
    name = cfg.get("model_name")
    if expected_model_name and name and name != expected_model_name:
        raise CheckpointMismatchError(str(path_or_id), extra=f"config.json says model_name={name!r}, network is {expected_model_name!r}")
    own = net.state_dict()
    # After LoRA injection nn.Linear weights live under '.base_layer.'; map DA3 names onto them.
    rename = {k.replace(".base_layer.", "."): k for k in own if "lora_" not in k}
    mapped = {rename.get(k, k): v for k, v in state.items()}
    expected = set(rename.values())
    check_and_load(net, mapped, str(path_or_id), expected=expected)
