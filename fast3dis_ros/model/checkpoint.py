"""FAST3DIS checkpoints and DA3 weight loading.

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
from typing import Any

import torch
import torch.nn as nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "fast3dis-v1"


#: The small tiny-configuration checkpoint shipped inside the package (trained on synthetic scenes only).
BUNDLED_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "fast3dis_tiny"


class CheckpointMismatchError(RuntimeError):
    """Weights do not fit the network: lists missing / unexpected keys and shape mismatches."""

    def __init__(self, source: str, missing=(), unexpected=(), shapes=(), extra: str = "") -> None:
        self.source, self.missing, self.unexpected, self.shapes = source, list(missing), list(unexpected), list(shapes)
        lines = [f"weights from {source} do not match the network{': ' + extra if extra else ''}"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing[:20]) + (" ..." if len(self.missing) > 20 else ""))
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected[:20]) + (" ..." if len(self.unexpected) > 20 else ""))
        for k, want, got in self.shapes[:20]:
            lines.append(f"  shape mismatch {k}: network {tuple(want)} vs checkpoint {tuple(got)}")
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------- io
def resolve_path(path_or_id: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """Local path if it exists, else ``huggingface_hub.snapshot_download(repo_id)``."""
    p = Path(os.path.expanduser(str(path_or_id)))
    if p.exists():
        return p
    s = str(path_or_id)
    if s.count("/") != 1 or s.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{s}: no such file or folder (and not a hub id of the form org/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=s, allow_patterns=allow_patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth ...
        raise FileNotFoundError(f"{s}: not a local path and downloading it from the hub failed: {e}") from e


class UnreadableWeightsError(ValueError):
    """A weights file that exists but cannot be read (truncated, garbage, wrong format)."""


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; ``UnreadableWeightsError`` naming the file when it cannot be read."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - SafetensorError, UnpicklingError, EOFError ... all mean the same
        size = path.stat().st_size if path.exists() else 0
        raise UnreadableWeightsError(
            f"{path} ({size} bytes) cannot be read, truncated or not a weights file: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def _weights_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / f for f in files]
    for name in (WEIGHTS_NAME, "pytorch_model.bin", "model.pth", "model.pt"):
        if (folder / name).exists():
            return [folder / name]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(
        f"{folder}: no weights file (looked for {WEIGHTS_NAME}, model.safetensors.index.json, "
        f"pytorch_model.bin, model.pth, *.safetensors); found {sorted(x.name for x in folder.iterdir())}"
    )


def check_and_load(module: nn.Module, state: dict[str, torch.Tensor], source: str, expected: set[str] | None = None) -> None:
    """Strict load with a readable error. ``expected``: keys that must be present (default: all)."""
    own = module.state_dict()
    expected = set(own) if expected is None else expected
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [(k, own[k].shape, v.shape) for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(source, missing, unexpected, shapes)
    module.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------- DA3
def da3_state_dict_from(path_or_id: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """DA3 weights in ``DepthAnything3Net`` naming (no ``model.`` prefix) + the folder's config.json.

    A FAST3DIS checkpoint folder (config.json ``format`` fast3dis-v1, "full" contents) gives its DA3 part.
    """
    p = resolve_path(path_or_id, allow_patterns=["*.json", "*.safetensors"])
    cfg: dict[str, Any] = {}
    if p.is_dir():
        if (p / CONFIG_NAME).exists():
            cfg = json.loads((p / CONFIG_NAME).read_text())
        files = _weights_files(p)
    else:
        files = [p]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_tensors(f))
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
    from fast3dis_ros.model.config import DA3_SPECS

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
    from fast3dis_ros.model.config import Fast3disConfig

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
    from fast3dis_ros.model.fast3dis import Fast3DIS

    cfg, contents, folder = read_checkpoint_config(folder)
    wpath = folder / WEIGHTS_NAME
    if not wpath.exists():
        raise FileNotFoundError(f"{folder}: missing {WEIGHTS_NAME}")
    if contents == "full":
        cfg.backbone.pretrained = None  # every weight is in the file
    elif da3_weights is not None:
        cfg.backbone.pretrained = da3_weights
    model = Fast3DIS(cfg)
    state = _read_tensors(wpath)
    expected = set(model.state_dict()) if contents == "full" else set(model.trainable_state_dict())
    check_and_load(model, state, str(wpath), expected=expected)
    model.to(device).eval()
    return model, cfg
