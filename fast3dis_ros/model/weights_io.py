"""Reading weight files and loading them strictly with a readable error (shared by DA3 and FAST3DIS loading).

Local paths first; a hub id (``org/name``) is downloaded with ``huggingface_hub`` only when no such local
path exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "fast3dis-v1"


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


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
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


def weights_files(folder: Path) -> list[Path]:
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
