"""ONNX export of the whole FAST3DIS forward for one fixed window shape (``fast3dis-export``).

The exported graph is the exact inference path (``Fast3DIS.forward(..., return_aux=False)``, no
``compile_for_inference``) traced by ``torch.onnx.export(dynamo=True, opset_version=18)``; nothing here
depends on the configuration's size, so the tiny model and DA3-Large go through the same code.

Inputs (batch 1, shapes fixed at export time):

* ``images``  ``(1, V, 3, H, W)`` float32, ImageNet-normalised RGB (``model.backbone.normalize_images``),
  H and W multiples of 14 (the processing resolution the Predictor resizes to);
* ``K``       ``(1, V, 3, 3)`` float32 intrinsics in pixels of (H, W), only with ``conditioning="intrinsics"``;
  a view whose K is all NaN keeps the network's estimate (as in PyTorch).

Outputs (names and layouts are ``OUTPUTS``; all float32):

* ``depth``       ``(1, V, H, W)``    camera z, DA3 units;
* ``depth_conf``  ``(1, V, H, W)``    DA3 confidence;
* ``intrinsics``  ``(1, V, 3, 3)``    K in pixels of (H, W) (the given K where finite);
* ``extrinsics``  ``(1, V, 4, 4)``    ``T_cam_world``, world = view 0's camera;
* ``pred_logits`` ``(1, Q)``          objectness logit per query;
* ``pred_masks``  ``(1, Q, V, Hm, Wm)`` mask logits per query and view (Hm, Wm = the head's mask size).

Known poses (``T_cam_world``) are not an export option: the PyTorch forward validates them with a
data-dependent check (a host sync) that a static graph cannot express; run the torch backend for them.
The window shape, conditioning, output names and the network's config are stored in the ONNX
``metadata_props`` (``read_export_metadata``), so a runtime needs only the .onnx file (+ its .data).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from fast3dis_ros.model.da3.backbone import PATCH_SIZE
from fast3dis_ros.model.config import Fast3disConfig

OPSET = 18
OUTPUTS = ("depth", "depth_conf", "intrinsics", "extrinsics", "pred_logits", "pred_masks")
CONDITIONINGS = ("none", "intrinsics")
META_PREFIX = "fast3dis."


@dataclass(frozen=True)
class WindowShape:
    """The fixed shape an exported model accepts: ``views`` images of ``height x width`` pixels."""

    views: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        for name, v in (("height", self.height), ("width", self.width)):
            if v < PATCH_SIZE or v % PATCH_SIZE:
                raise ValueError(f"{name} must be a positive multiple of {PATCH_SIZE} (DA3 patch), got {v}")


@dataclass(frozen=True)
class ExportMetadata:
    """What ``metadata_props`` of an exported model say (written by `export_onnx`)."""

    shape: WindowShape
    conditioning: str
    outputs: tuple[str, ...]
    config: Fast3disConfig


class InferenceGraph(nn.Module):
    """``Fast3DIS`` as a graph with positional inputs and a tuple of the `OUTPUTS` (what ONNX needs)."""

    def __init__(self, model: nn.Module, conditioning: str) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        self.model = model
        self.conditioning = conditioning

    def forward(self, images: torch.Tensor, K: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        out = self.model(images, K=K, return_aux=False)
        return tuple(out[name].float() for name in OUTPUTS)


def example_inputs(shape: WindowShape, conditioning: str) -> tuple[torch.Tensor, ...]:
    """Inputs of the export trace (values only matter for the sanity check against PyTorch)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(1, shape.views, 3, shape.height, shape.width, generator=g)
    if conditioning == "none":
        return (images,)
    f = 0.9 * max(shape.height, shape.width)
    K = torch.tensor([[f, 0.0, (shape.width - 1) / 2], [0.0, f, (shape.height - 1) / 2], [0.0, 0.0, 1.0]])
    return images, K.expand(1, shape.views, 3, 3).contiguous()


def export_onnx(
    model: nn.Module,
    cfg: Fast3disConfig,
    shape: WindowShape,
    path: str | Path,
    conditioning: str = "intrinsics",
    external_data: bool = False,
) -> ExportMetadata:
    """Write ``path`` (ONNX opset 18) for ``model`` (a ``Fast3DIS`` in fp32 on the CPU or a GPU).

    ``external_data``: weights in ``<path>.data`` beside the graph (needed above protobuf's 2 GB, i.e.
    for DA3-Large with its LoRA pass; either form loads the same in onnxruntime and TensorRT).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = InferenceGraph(model.eval(), conditioning).eval()
    device = next(model.parameters()).device
    args = tuple(a.to(device) for a in example_inputs(shape, conditioning))
    input_names = ["images"] if conditioning == "none" else ["images", "K"]
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=input_names,
            output_names=list(OUTPUTS),
            optimize=True,
            verify=False,
        )
    meta = ExportMetadata(shape=shape, conditioning=conditioning, outputs=OUTPUTS, config=cfg)
    program.model.metadata_props.update(_metadata_props(meta))
    program.save(str(path), external_data=external_data)
    return meta


def _metadata_props(meta: ExportMetadata) -> dict[str, str]:
    return {
        META_PREFIX + "views": str(meta.shape.views),
        META_PREFIX + "height": str(meta.shape.height),
        META_PREFIX + "width": str(meta.shape.width),
        META_PREFIX + "conditioning": meta.conditioning,
        META_PREFIX + "outputs": ",".join(meta.outputs),
        META_PREFIX + "config": meta.config.to_json(),
    }


def read_export_metadata(path: str | Path) -> ExportMetadata:
    """The `ExportMetadata` of an exported model (reads the graph only, not external weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in ("views", "height", "width", "conditioning", "outputs", "config") if META_PREFIX + k not in props]
    if missing:
        raise ValueError(f"{path} is not a fast3dis-export model (metadata lacks {', '.join(missing)})")
    shape = WindowShape(int(props[META_PREFIX + "views"]), int(props[META_PREFIX + "height"]), int(props[META_PREFIX + "width"]))
    return ExportMetadata(
        shape=shape,
        conditioning=props[META_PREFIX + "conditioning"],
        outputs=tuple(props[META_PREFIX + "outputs"].split(",")),
        config=Fast3disConfig.from_json(props[META_PREFIX + "config"]),
    )


def check_onnx(path: str | Path) -> None:
    """``onnx.checker`` on the saved model (by path, so external weights > 2 GB are fine)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def main(argv: list[str] | None = None) -> int:
    """``fast3dis-export``: checkpoint -> ONNX for one window shape, checked by ``onnx.checker``."""
    import argparse

    from fast3dis_ros.model.checkpoint import BUNDLED_CHECKPOINT, load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(BUNDLED_CHECKPOINT), help="FAST3DIS checkpoint folder or hub id")
    ap.add_argument("--da3-weights", default=None, help="DA3 weights for a 'trainable' checkpoint")
    ap.add_argument("--views", type=int, required=True, help="views per window (fixed in the graph)")
    ap.add_argument("--height", type=int, required=True, help="processing height, multiple of 14")
    ap.add_argument("--width", type=int, required=True, help="processing width, multiple of 14")
    ap.add_argument("--conditioning", choices=CONDITIONINGS, default="intrinsics",
                    help="'intrinsics': a K input (NaN views = unknown); 'none': images only")
    ap.add_argument("--device", default="cpu", help="where to trace (cuda is faster for DA3-Large)")
    ap.add_argument("--external-data", action="store_true", help="weights in <output>.data (required > 2 GB)")
    ap.add_argument("-o", "--output", required=True, help="path of the .onnx file")
    args = ap.parse_args(argv)
    shape = WindowShape(args.views, args.height, args.width)
    model, cfg = load_checkpoint(args.checkpoint, device=args.device, da3_weights=args.da3_weights)
    t0 = time.perf_counter()
    export_onnx(model, cfg, shape, args.output, args.conditioning, external_data=args.external_data)
    check_onnx(args.output)
    print(json.dumps({"output": args.output, "config": cfg.backbone.name, "views": shape.views, "height": shape.height,
                      "width": shape.width, "conditioning": args.conditioning, "outputs": list(OUTPUTS),
                      "export_s": round(time.perf_counter() - t0, 1), "onnx_checker": "passed"}))
    return 0
