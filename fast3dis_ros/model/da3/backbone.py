"""Depth Anything 3 backbone of FAST3DIS: frozen DA3 + LoRA, two passes sharing their common prefix.

Pass 1 (``forward_geometry``): LoRA adapters disabled -> depth, depth confidence, intrinsics and
extrinsics, bit-identical to ``DepthAnything3Net.forward`` with the same weights.
Pass 2 (``forward_features``): LoRA adapters enabled -> the 4 tapped token maps that DA3's DualDPT
head would consume, reshaped to ``(B, V, 2*D, H/14, W/14)``.

LoRA sits only in ViT blocks ``>= cfg.lora_start``; blocks before it give the same activations in
both passes, so ``forward_both`` runs them once and continues twice from the shared state.

The ViT loop below is a transcription of
``depth_anything_3.model.dinov2.vision_transformer.DinoVisionTransformer._get_intermediate_layers_not_chunked``
(v0.1.1) split at a block index; the only change is that the camera token is written with an
out-of-place ``torch.cat`` instead of ``x[:, :, 0] = cam_token`` (same values, but the shared state
must not be mutated by the first continuation).

Each ViT block, each tap's post-processing and each DPT head chunk runs through ``self.runner``
(``runner.py``): ``ExactRunner`` by default, DA3's own ops; ``model/fastpath/accelerate.py`` installs
the compiled / fused one. The backbone itself has no speed options and imports nothing of the fast path.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn as nn
from addict import Dict as ADict

from fast3dis_ros.model.da3.version import check_da3_version

check_da3_version()  # before reading DA3's internals: they are transcribed from the pinned version

from depth_anything_3.cfg import create_object, load_config
from depth_anything_3.model.dinov2.dinov2 import DinoV2
from depth_anything_3.model.dinov2.vision_transformer import DinoVisionTransformer
from depth_anything_3.model.dualdpt import DualDPT
from depth_anything_3.model.reference_view_selector import reorder_by_reference, select_reference_view
from depth_anything_3.registry import MODEL_REGISTRY
from depth_anything_3.utils.constants import THRESH_FOR_REF_SELECTION
from omegaconf import OmegaConf

from fast3dis_ros.model.config import BackboneConfig
from fast3dis_ros.model.da3 import internals
from fast3dis_ros.model.da3.camera_encoding import encode_cameras
from fast3dis_ros.model.da3.dpt_head import dpt_output_hw, dualdpt_depth_only, uv_pos_embed
from fast3dis_ros.model.da3.grid_rope import install_grid_rope, rope_table_len
from fast3dis_ros.model.da3.runner import ExactRunner, TrunkRunner, autocast_off
from fast3dis_ros.model.da3.weights import load_da3_weights, plain_da3_names

PATCH_SIZE = 14
from fast3dis_ros.model.config import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported)


def stage(name: str):
    """A named range for ``torch.profiler`` (``fast3dis-bench --profile``); near free when not profiling."""
    return torch.profiler.record_function(name)


class TinyDinoV2(nn.Module):
    """``DinoV2`` with free ViT dimensions (DA3's ``DinoV2`` only knows vits/b/l/g).

    Same submodule names as ``DinoV2`` (``pretrained`` = a DA3 ``DinoVisionTransformer``), so the
    state-dict layout and every DA3 code path are the real ones.
    """

    forward = DinoV2.forward

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        out_layers: list[int],
        alt_start: int = -1,
        qknorm_start: int = -1,
        rope_start: int = -1,
        cat_token: bool = True,
        name: str = "tiny",
    ) -> None:
        super().__init__()
        self.name = name
        self.out_layers = list(out_layers)
        self.alt_start, self.qknorm_start, self.rope_start = alt_start, qknorm_start, rope_start
        self.cat_token = cat_token
        self.pretrained = DinoVisionTransformer(
            img_size=518,
            patch_size=PATCH_SIZE,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4,
            ffn_layer="mlp",
            alt_start=alt_start,
            qknorm_start=qknorm_start,
            rope_start=rope_start,
            cat_token=cat_token,
        )


def tiny_da3_config(cfg: BackboneConfig) -> dict[str, Any]:
    """DA3 yaml-schema config of the tiny test network (DA3 classes, small dimensions)."""
    spec = cfg.spec
    d = spec["embed_dim"]
    f = cfg.tiny_head_features
    return {
        "__object__": {"path": "depth_anything_3.model.da3", "name": "DepthAnything3Net", "args": "as_params"},
        "net": {
            "__object__": {"path": "fast3dis_ros.model.da3.backbone", "name": "TinyDinoV2", "args": "as_params"},
            "embed_dim": d,
            "depth": spec["depth"],
            "num_heads": spec["num_heads"],
            "out_layers": spec["out_layers"],
            "alt_start": spec["alt_start"],
            "qknorm_start": spec["alt_start"],
            "rope_start": spec["alt_start"],
            "cat_token": True,
        },
        "head": {
            "__object__": {"path": "depth_anything_3.model.dualdpt", "name": "DualDPT", "args": "as_params"},
            "dim_in": 2 * d,
            "output_dim": 2,
            "features": f,
            "out_channels": [f * 3 // 4, f * 3 // 2, f * 3, f * 3],
        },
        "cam_enc": {
            "__object__": {"path": "depth_anything_3.model.cam_enc", "name": "CameraEnc", "args": "as_params"},
            "dim_out": d,
            "num_heads": spec["num_heads"],
            "trunk_depth": 2,
        },
        "cam_dec": {
            "__object__": {"path": "depth_anything_3.model.cam_dec", "name": "CameraDec", "args": "as_params"},
            "dim_in": 2 * d,
        },
    }


def da3_config(cfg: BackboneConfig):
    """The DA3 OmegaConf config for ``cfg.name`` (package yaml for real sizes, modified dict for tiny)."""
    if cfg.name == "tiny":
        return OmegaConf.create(tiny_da3_config(cfg))
    return load_config(MODEL_REGISTRY[cfg.registry_name])


def build_da3_net(cfg: BackboneConfig) -> nn.Module:
    """A plain, randomly initialised ``DepthAnything3Net`` of the configured size.

    DA3's camera decoder ends its field-of-view branch in a ReLU and the intrinsics clamp
    ``tan(fov/2)`` at 1e-6: from a random initialisation about half of the FoV outputs start at exactly
    0, where the ReLU passes no gradient, so a model trained from scratch (the tiny configuration)
    could never learn its focal lengths. We start the FoV bias at ~60 degrees so the branch is alive;
    loading real DA3 weights overwrites it.
    """
    net = create_object(da3_config(cfg))
    init_fov_branch(net)
    return net


def init_fov_branch(net: nn.Module, fov_rad: float = 1.05) -> None:
    """Give the camera decoder's FoV head a live (positive) starting point; see ``build_da3_net``."""
    cam_dec = getattr(net, "cam_dec", None)
    fc_fov = getattr(cam_dec, "fc_fov", None)
    if fc_fov is None:
        return
    linear = fc_fov[0]
    with torch.no_grad():
        linear.weight.mul_(0.01)
        linear.bias.fill_(fov_rad)


def to_homogeneous(T: torch.Tensor) -> torch.Tensor:
    """(..., 3, 4) -> (..., 4, 4) (no-op for 4x4)."""
    if T.shape[-2] == 4:
        return T
    bottom = torch.zeros_like(T[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([T, bottom], dim=-2)


class ShapeCache:
    """A small LRU of tensors that depend only on the input shape (position embeddings and the like).

    Why not one entry, cleared on a new shape: a captured CUDA graph reads such tensors by address, and
    ``GraphedForward`` keeps a graph for each of its last few window shapes (2 by default). A tensor
    freed while an older graph still reads it would hand that memory to the next allocation. Keeping
    the last ``size`` entries (more than the graphs kept) keeps every live graph's tensors alive.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple) -> Any:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: tuple, value: Any) -> Any:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True)
class _Tap:
    """A tapped block's tokens as the trunk left them; ``finish_tap`` turns them into DA3's ``feats``.

    Kept unconcatenated and in the trunk's view order so that the concatenation, the view-order
    restore, the norm, the token slice and (for the instance head) the channels-first transpose run
    in one pass at the end (one fused kernel when compiled) instead of four copies of the token map.
    """

    local_x: torch.Tensor | None  # tokens after the latest local block (DA3's ``cat_token``), else None
    x: torch.Tensor  # (B, S, N, D) tokens after the tapped block
    ref_idx: torch.Tensor | None  # restore the original view order with this (DA3's reordering), or None


def block_kind(alt_start: int, i: int) -> str:
    """DA3's attention kind of ViT block ``i``: global on odd blocks from ``alt_start`` on, else local."""
    return "global" if alt_start != -1 and i >= alt_start and i % 2 == 1 else "local"


def output_observed(alt_start: int, out_layers, i: int, end: int) -> bool:
    """Whether ``DA3Backbone._run_blocks`` (blocks up to ``end``) looks at block ``i``'s output tokens other
    than as the next block's input (the runner's ``observed``; a chained fast-path block then closes its
    own residual).
    Looked at: the end of the run, a tap, the reference-view reorder before block ``alt_start - 1``, the
    camera token at ``alt_start``, and a local block's tokens kept as the trunk's ``local_x`` through a
    following global block that is tapped (its tap concatenates them) or ends the run (the state keeps them)."""
    nxt = i + 1
    if nxt >= end or i in out_layers:
        return True
    if block_kind(alt_start, i) == "local" and block_kind(alt_start, nxt) == "global" and (
            nxt in out_layers or nxt + 1 >= end):
        return True
    return alt_start != -1 and nxt in (alt_start - 1, alt_start)


@dataclass
class _TrunkState:
    """Activations of the ViT trunk after some prefix of blocks (immutable by convention)."""

    x: torch.Tensor  # (B, S, N, D) tokens
    local_x: torch.Tensor | None  # tokens after the most recent local (per-view) block
    b_idx: torch.Tensor | None  # reference-view index per batch (DA3 view reordering) or None
    next_block: int
    pos: torch.Tensor | None
    pos_nodiff: torch.Tensor | None
    cam_token: torch.Tensor | None
    taps: dict[int, _Tap] = field(default_factory=dict)


class DA3Backbone(nn.Module):
    """Frozen DA3 network + LoRA adapters in blocks ``>= cfg.lora_start``.

    ``images``: float (B, V, 3, H, W), ImageNet-normalised RGB, H and W multiples of 14.
    ``K``: (B, V, 3, 3) pixel intrinsics at (H, W); ``T_cam_world``: (B, V, 4, 4) world-to-camera.
    As in DA3, cameras condition the network only when extrinsics are given (then K is required).
    """

    def __init__(self, cfg: BackboneConfig, net: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = net if net is not None else build_da3_net(cfg)
        if cfg.pretrained and net is None:
            load_da3_weights(self.net, cfg.pretrained, expected_model_name=cfg.registry_name)
        self.net.requires_grad_(False)
        self.net.eval()
        # An alias, not a second registration: as a registered child the ViT's every weight (and LoRA
        # tensor) would appear twice in state_dict(), and a full DA3-Large checkpoint would weigh 2.84 GiB
        # instead of 1.70 (checkpoint.drop_alias_keys reads checkpoints written that way).
        self.vit: DinoVisionTransformer
        object.__setattr__(self, "vit", self.net.backbone.pretrained)
        self.out_layers = list(self.net.backbone.out_layers)
        # RoPE table sized on the host: no device->host sync per block (see grid_rope.py)
        self._rope = install_grid_rope(self.vit)
        self._grid_cache: dict[tuple, torch.Tensor] = {}
        self._pos_embed_cache = ShapeCache()
        self.lora_start = cfg.lora_start
        # DA3 computes DualDPT's ray branch and then discards it when a camera decoder exists;
        # skipping it leaves depth/conf/cameras bit-identical and saves a large part of the head.
        self.skip_ray_branch = True
        self._dpt_pe_cache = ShapeCache()  # _dpt_pos_embeds
        # the one injection point: runs the blocks, taps and DPT chunks (model/fastpath installs a faster one)
        self.runner: TrunkRunner = ExactRunner()
        self.lora_merged = False
        self._lora_layers: list[nn.Module] = []
        if cfg.lora_rank > 0:
            self._inject_lora()

    # ------------------------------------------------------------------ LoRA
    def lora_target_names(self) -> list[str]:
        names = []
        for name, mod in self.net.named_modules():
            if not isinstance(mod, nn.Linear) or not name.startswith("backbone.pretrained.blocks."):
                continue
            parts = name.split(".")
            block = int(parts[3])
            sub = ".".join(parts[4:])
            if block >= self.lora_start and sub in self.cfg.lora_targets:
                names.append(name)
        return names

    def _inject_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        targets = self.lora_target_names()
        if not targets:
            raise ValueError(
                f"no LoRA target among {self.cfg.lora_targets} in blocks >= {self.lora_start} of DA3-{self.cfg.name}"
            )
        lcfg = LoraConfig(
            r=self.cfg.lora_rank,
            lora_alpha=self.cfg.lora_alpha,
            lora_dropout=self.cfg.lora_dropout,
            target_modules=targets,
            bias="none",
        )
        inject_adapter_in_model(lcfg, self.net)
        self._lora_layers = [m for m in self.net.modules() if isinstance(m, BaseTunerLayer)]
        for n, p in self.net.named_parameters():
            p.requires_grad_("lora_" in n)
        self.set_adapters(True)

    def lora_parameters(self) -> list[nn.Parameter]:
        if self.lora_merged:
            raise RuntimeError("LoRA adapters were merged for inference (replace_lora_layers)")
        return [p for n, p in self.net.named_parameters() if "lora_" in n]

    def set_adapters(self, enabled: bool) -> None:
        # Flip peft's flag directly: BaseTunerLayer.enable_adapters() would also toggle requires_grad.
        for m in self._lora_layers:
            internals.set_adapter_disabled(m, not enabled)

    @contextlib.contextmanager
    def adapters(self, enabled: bool):
        prev = [internals.adapter_disabled(m) for m in self._lora_layers]
        self.set_adapters(enabled)
        try:
            yield
        finally:
            for m, p in zip(self._lora_layers, prev):
                internals.set_adapter_disabled(m, p)

    def train(self, mode: bool = True):  # DA3 layers have no train-time behaviour we want
        super().train(mode)
        self.net.eval()
        return self

    def da3_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in plain ``DepthAnything3Net`` naming (LoRA removed, ``base_layer`` unwrapped)."""
        return plain_da3_names(self.net.state_dict())

    def replace_lora_layers(self, make: Callable[..., nn.Module]) -> int:
        """Put ``make(layer)`` in place of every LoRA layer (the fast path folds each adapter into a weight
        copy, ``fastpath/merged_lora.py``); returns how many. The replacements must keep peft's
        ``_disable_adapters`` flag, which ``adapters()`` keeps switching. Inference only: the adapters'
        own parameters leave the module tree, so ``lora_parameters()`` raises afterwards (load
        checkpoints first). A second call does nothing."""
        if self.lora_merged or not self._lora_layers:
            return 0
        replaced = []
        for name, mod in list(self.net.named_modules()):
            if mod not in self._lora_layers:
                continue
            parent_name, child = name.rsplit(".", 1)
            new = make(mod)
            setattr(self.net.get_submodule(parent_name), child, new)
            replaced.append(new)
        self._lora_layers = replaced
        self.lora_merged = True
        return len(replaced)

    # ------------------------------------------------------------------ trunk
    def encode_cameras(self, K: torch.Tensor, T_cam_world: torch.Tensor, image_hw) -> torch.Tensor:
        """DA3's camera encoder: (B, V, D) camera tokens from known intrinsics + extrinsics."""
        with autocast_off(K.device.type):
            # same arithmetic as self.net.cam_enc(...), without its host syncs (camera_encoding.py)
            return encode_cameras(self.net.cam_enc, T_cam_world.float(), K.float(), image_hw)

    def _stem(self, images: torch.Tensor, K, T_cam_world) -> _TrunkState:
        if images.ndim != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (B, V, 3, H, W), got {tuple(images.shape)}")
        B, S, _, H, W = images.shape
        if H % PATCH_SIZE or W % PATCH_SIZE:
            raise ValueError(f"image size {H}x{W} is not a multiple of {PATCH_SIZE}")
        cam_token = None
        if T_cam_world is not None:
            if K is None:
                raise ValueError("DA3's camera encoder needs intrinsics K together with T_cam_world")
            cam_token = self.encode_cameras(K, T_cam_world, images.shape[-2:])
        vit = self.vit
        x = self._prepare_tokens(images)
        pos, pos_nodiff = self._prepare_rope(B, S, H, W, images.device)
        return _TrunkState(x, None, None, 0, pos, pos_nodiff, cam_token)

    def _prepare_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``DinoVisionTransformer.prepare_tokens_with_masks`` (no masks) with a cached position embedding.

        DA3 re-interpolates its 37x37 position embedding (bicubic, 1024 channels for ViT-L) on every
        forward; PyTorch's bicubic kernel parallelises over output pixels only, so this one call took
        8.9 ms of an 8-view H100 forward. The embedding is frozen, so it is computed once per
        (size, dtype, device) and reused: same values, as long as ``pos_embed`` is unchanged (the
        cache key includes its version counter; with gradients on for it, no cache).
        """
        vit = self.vit
        B, S, _, h, w = images.shape
        x = vit.patch_embed(images.flatten(0, 1))
        cls_token = vit.prepare_cls_token(B, S)
        x = torch.cat((cls_token, x), dim=1)
        pe = vit.pos_embed
        if (torch.is_grad_enabled() and pe.requires_grad) or torch.compiler.is_exporting():  # export: no storage
            pos_embed = vit.interpolate_pos_encoding(x, h, w)
        else:
            key = (h, w, x.dtype, str(x.device), pe._version, pe.data_ptr())
            pos_embed = self._pos_embed_cache.get(key)
            if pos_embed is None:
                pos_embed = self._pos_embed_cache.put(key, vit.interpolate_pos_encoding(x, h, w))
        x = x + pos_embed
        if vit.register_tokens is not None:
            x = torch.cat((x[:, :1], vit.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x.view(B, S, *x.shape[1:])

    def _prepare_rope(self, B: int, S: int, H: int, W: int, device: torch.device):
        """``DinoVisionTransformer._prepare_rope`` with every tensor made on ``device``.

        DA3 builds the special-token positions on the CPU and copies them over, a synchronising
        host-to-device copy that also cannot be captured in a CUDA graph; the values are the same.
        """
        vit = self.vit
        if vit.rope is None:
            return None, None
        gh, gw = H // vit.patch_size, W // vit.patch_size
        self._rope.table_len = rope_table_len(gh, gw, vit.patch_start_idx)
        key = (gh, gw, str(device))
        grid = self._grid_cache.get(key)
        if grid is None:  # DA3's PositionGetter caches per grid size only, not per device
            grid = torch.cartesian_prod(torch.arange(gh, device=device), torch.arange(gw, device=device))
            if not torch.compiler.is_exporting():  # a traced (fake) tensor must not outlive the export
                self._grid_cache[key] = grid
        pos = grid.view(1, 1, gh * gw, 2).expand(B, S, -1, -1).clone()
        pos_nodiff = torch.zeros_like(pos)
        if vit.patch_start_idx > 0:
            special = torch.zeros(B, S, vit.patch_start_idx, 2, device=device, dtype=pos.dtype)
            pos = torch.cat([special, pos + 1], dim=2)
            pos_nodiff = torch.cat([special, pos_nodiff + 1], dim=2)
        return pos, pos_nodiff

    def _run_blocks(self, st: _TrunkState, end: int, ref_view_strategy: str, b_idx=None) -> _TrunkState:
        """Run ViT blocks ``st.next_block .. end-1`` (DA3 semantics, each block by ``self.runner``); returns a
        new state. Whatever stands for the tokens between blocks (a fast runner may leave a residual
        pending), the trunk reads tokens through ``runner.tokens``, so the state holds plain tokens."""
        vit = self.vit
        x, local_x, taps = st.x, st.local_x, dict(st.taps)
        ref_idx = st.b_idx  # set once DA3 has reordered the views (its `'b_idx' in locals()`)
        B, S = x.shape[:2]
        for i in range(st.next_block, end):
            if i < vit.rope_start or vit.rope is None:
                g_pos, l_pos = None, None
            else:
                g_pos, l_pos = st.pos_nodiff, st.pos
            if (
                vit.alt_start != -1
                and i == vit.alt_start - 1
                and S >= THRESH_FOR_REF_SELECTION
                and st.cam_token is None
            ):
                x, local_x = self._tokens_of_both(x, local_x)
                ref_idx = b_idx if b_idx is not None else select_reference_view(x, strategy=ref_view_strategy)
                x = reorder_by_reference(x, ref_idx)
                local_x = reorder_by_reference(local_x, ref_idx)
            if vit.alt_start != -1 and i == vit.alt_start:
                if st.cam_token is not None:
                    cam_token = st.cam_token
                else:
                    ref_token = vit.camera_token[:, :1].expand(B, -1, -1)
                    src_token = vit.camera_token[:, 1:].expand(B, S - 1, -1)
                    cam_token = torch.cat([ref_token, src_token], dim=1)
                x = self.runner.tokens(x)
                x = torch.cat([cam_token.to(x.dtype)[:, :, None], x[:, :, 1:]], dim=2)
            kind = block_kind(vit.alt_start, i)
            pos = g_pos if kind == "global" else l_pos
            x = self.runner.run_block(vit, i, x, kind, pos, output_observed(vit.alt_start, self.out_layers, i, end))
            if kind == "local":
                local_x = x
            if i in self.out_layers:
                x, local_x = self._tokens_of_both(x, local_x)
                restore = S >= THRESH_FOR_REF_SELECTION and vit.alt_start != -1 and ref_idx is not None
                taps[i] = _Tap(local_x if vit.cat_token else None, x, ref_idx if restore else None)
        x, local_x = self._tokens_of_both(x, local_x)
        return replace(st, x=x, local_x=local_x, b_idx=ref_idx, next_block=end, taps=taps)

    def _tokens_of_both(self, x, local_x):
        """``runner.tokens`` for the trunk's current and latest-local tokens, asked once when they are the
        same object (right after a local block), so the two stay one tensor as in DA3."""
        if local_x is x:
            x = self.runner.tokens(x)
            return x, x
        return self.runner.tokens(x), self.runner.tokens(local_x)

    def _finish_taps(self, st: _TrunkState, hw: tuple[int, int] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """DinoVisionTransformer.get_intermediate_layers post-processing -> DA3 ``feats`` (see ``finish_tap``)."""
        skip = 1 + self.vit.num_register_tokens
        return [self.runner.finish_tap(self.vit.norm, st.taps[i].local_x, st.taps[i].x, st.taps[i].ref_idx, skip, hw)
                for i in self.out_layers]

    def _dpt_pos_embeds(self, head: DualDPT, H: int, W: int, device: torch.device) -> list[torch.Tensor] | None:
        """The DPT head's 5 UV embeddings for an ``H x W`` image, cached per (size, dtype, device): they
        depend on nothing else. The maps' dtype is the conv output's (the autocast dtype when autocast is
        on). Call under the autocast state the head runs in. With autograd on (training the DA3 weights)
        it returns None and DA3 computes them itself, as a tensor cached under ``inference_mode`` must
        not enter a graph that autograd records."""
        if not head.pos_embed or torch.is_grad_enabled():
            return None
        conv = head.scratch.output_conv1
        dtype = conv.weight.dtype
        if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        key = (id(head), H, W, dtype, str(device))
        pe = self._dpt_pe_cache.get(key)
        if pe is None:
            ph, pw = H // head.patch_size, W // head.patch_size
            shapes = [(p.out_channels, ph, pw) for p in head.projects]
            shapes.append((conv.out_channels, *dpt_output_hw(head, H, W)))
            pe = self._dpt_pe_cache.put(key, [uv_pos_embed(c, h, w, H, W, dtype, device) for c, h, w in shapes])
        return pe

    def _geometry_head(self, feats, H: int, W: int, device_type: str) -> ADict:
        net = self.net
        with self.runner.head_context(device_type):
            if isinstance(net.head, DualDPT) and net.cam_dec is not None and self.skip_ray_branch:
                pe = self._dpt_pos_embeds(net.head, H, W, feats[0][0].device)
                output = dualdpt_depth_only(net.head, feats, H, W, impl=self.runner.dpt_chunk, pos_embeds=pe)
            else:
                output = internals.process_depth_head(net, feats, H, W)
            output = internals.process_camera_estimation(net, feats, H, W, output)
        output = internals.process_mono_sky_estimation(net, output)
        return output

    def _geometry_outputs(self, st: _TrunkState, H: int, W: int, device_type: str) -> dict[str, torch.Tensor]:
        feats = self._finish_taps(st)
        out = self._geometry_head(feats, H, W, device_type)
        res = {"depth": out["depth"], "depth_conf": out["depth_conf"]}
        if "extrinsics" in out:
            res["extrinsics"] = to_homogeneous(out["extrinsics"])
            res["intrinsics"] = out["intrinsics"]
        return res

    def _feature_outputs(self, st: _TrunkState, H: int, W: int) -> list[torch.Tensor]:
        return [tok for tok, _cam in self._finish_taps(st, hw=(H // PATCH_SIZE, W // PATCH_SIZE))]

    @property
    def _last_block(self) -> int:
        return max(self.out_layers) + 1

    # ------------------------------------------------------------------ public passes
    def forward_geometry(self, images, K=None, T_cam_world=None) -> dict[str, torch.Tensor]:
        """Pass 1, adapters off: depth (B,V,H,W), depth_conf, intrinsics (B,V,3,3), extrinsics (B,V,4,4)."""
        H, W = images.shape[-2:]
        with self.adapters(False), self.runner.scope():
            st = self._stem(images, K, T_cam_world)
            st = self._run_blocks(st, self._last_block, self.cfg.ref_view_strategy)
            return self._geometry_outputs(st, H, W, images.device.type)

    def forward_features(self, images, K=None, T_cam_world=None) -> list[torch.Tensor]:
        """Pass 2, adapters on: the 4 tapped token maps as (B, V, 2*D, H/14, W/14)."""
        H, W = images.shape[-2:]
        with self.adapters(True), self.runner.scope():
            st = self._stem(images, K, T_cam_world)
            st = self._run_blocks(st, self._last_block, self.cfg.ref_view_strategy)
            return self._feature_outputs(st, H, W)

    def forward_both(
        self, images, K=None, T_cam_world=None, geometry_grad: bool = False
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Both passes; blocks ``< lora_start`` run once and are shared.

        ``geometry_grad``: keep autograd for the adapter-free part (only useful when the DA3 weights
        train too); otherwise the shared prefix and pass 1 run under ``no_grad``.
        """
        H, W = images.shape[-2:]
        grad_geo = torch.is_grad_enabled() and geometry_grad
        split = min(self.lora_start, self._last_block)
        with self.runner.scope():
            return self._forward_both(images, K, T_cam_world, H, W, split, grad_geo)

    def _forward_both(self, images, K, T_cam_world, H: int, W: int, split: int, grad_geo: bool):
        with torch.set_grad_enabled(grad_geo):
            with self.adapters(False):
                with stage("f3d.stem+shared_blocks"):
                    st0 = self._stem(images, K, T_cam_world)
                    st0 = self._run_blocks(st0, split, self.cfg.ref_view_strategy)
                with stage("f3d.geometry_blocks"):
                    st1 = self._run_blocks(st0, self._last_block, self.cfg.ref_view_strategy)
                with stage("f3d.geometry_head"):
                    geometry = self._geometry_outputs(st1, H, W, images.device.type)
        with self.adapters(True), stage("f3d.feature_blocks"):
            # reuse pass 1's reference view so both passes see the same view order
            st2 = self._run_blocks(st0, self._last_block, self.cfg.ref_view_strategy, b_idx=st1.b_idx)
            features = self._feature_outputs(st2, H, W)
        return geometry, features

    def forward(self, images, K=None, T_cam_world=None):
        return self.forward_both(images, K, T_cam_world)


def normalize_images(images_uint8: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) uint8 or [0,1] float -> ImageNet-normalised float (what DA3 expects)."""
    x = images_uint8.float()
    if images_uint8.dtype == torch.uint8:
        x = x / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)  # host-ok: preprocessing, not the forward
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)  # host-ok
    return (x - mean) / std
