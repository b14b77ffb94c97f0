"""Build the fast path's runner and install it in a ``DA3Backbone`` (its one injection point, ``backbone.runner``).

``accelerate(backbone, FastPathOptions(...))`` changes the backbone's modules in place where an option
needs it (LoRA merged into weight copies, block weights stored in bf16, fc1 + GELU and q/k norm + RoPE
fused, blocks compiled) and installs a ``FastRunner`` that runs the blocks (optionally chained), the
taps and the DPT head chunks compiled. Outputs equal the exact path's up to rounding (measured in
docs/BENCHMARKS.md 14-17); with every option off the runner gives the exact path's values to the bit.
Inference only: load weights first, do not train afterwards.

Why at all: at robot-sized windows a DA3-Large block is bound by memory traffic, not arithmetic (about
67 kernels, most of them fp32 element-wise passes over the token stream; ``fast3dis-bench --profile``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.nn as nn

from fast3dis_ros.model.da3.backbone import DA3Backbone, ShapeCache
from fast3dis_ros.model.da3.runner import ExactRunner, finish_tap
from fast3dis_ros.model.fastpath.chained_blocks import ChainedBlock, run_chained, tokens_of
from fast3dis_ros.model.fastpath.dpt_head import dpt_pe_conv, fast_dualdpt_main
from fast3dis_ros.model.fastpath.fast_attention import fuse_block_attention
from fast3dis_ros.model.fastpath.fused_mlp import fuse_block_mlps
from fast3dis_ros.model.fastpath.merged_lora import MergedLoraLinear
from fast3dis_ros.model.fastpath.weight_dtype import store_weights_in


@dataclass(frozen=True)
class FastPathOptions:
    """What ``accelerate`` changes; the defaults change nothing (the runner then computes the exact path).

    ``compile_blocks``: ``torch.compile`` every ViT block in place, and the tap post-processing (one
    kernel per tap instead of four copies); blocks of the same structure share one graph. ``compile_dpt``:
    ``torch.compile`` DA3's DPT head chunk. ``mode``: the compile mode. ``merge_lora``: fold each LoRA
    adapter into a second weight copy (one GEMM per linear in pass 2, about 3 ms of an 8-view
    DA3-Large forward). ``block_dtype``: the autocast dtype the forward will run under; the blocks'
    linear weights are stored in it, so autocast stops re-casting 300 M weights per forward
    (``weight_dtype.py``). ``fuse`` (default: on when ``block_dtype`` is given): fc1 + GELU as one GEMM
    (``fused_mlp.py``, tanh GELU) and the q/k norm + RoPE as one pass (``fast_attention.py``).
    ``chain``: each block leaves its last residual add to the next (``chained_blocks.py``; compiled
    when ``compile_blocks``). ``head_autocast``: DA3's DPT head and camera decoder run under the
    caller's autocast instead of fp32; ``head_dtype`` (needs it): store their weights in that dtype.
    ``fold_dpt_pe`` / ``dpt_nhwc``: the DPT head's layout options (``fastpath/dpt_head.py``).
    """

    compile_blocks: bool = False
    compile_dpt: bool = False
    mode: str | None = None
    merge_lora: bool = False
    block_dtype: torch.dtype | None = None
    fuse: bool | None = None
    chain: bool = False
    head_autocast: bool = False
    head_dtype: torch.dtype | None = None
    fold_dpt_pe: bool = False
    dpt_nhwc: bool = False


class FastRunner(ExactRunner):
    """A ``TrunkRunner`` that runs chained blocks, compiled taps and the fast DPT chunk.

    ``chained``: one ``ChainedBlock`` per ViT block, or None (the blocks themselves, compiled in place
    or not). ``tap_fn`` / ``dpt_fn``: compiled ``finish_tap`` / ``fast_dualdpt_main``, or None (eager).
    ``compiled``: forwards raise Dynamo's recompile limits while they run (``scope``).
    """

    def __init__(self, chained: list[ChainedBlock] | None = None, tap_fn=None, dpt_fn=None,
                 head_autocast: bool = False, fold_dpt_pe: bool = False, dpt_nhwc: bool = False,
                 compiled: bool = False) -> None:
        self.chained = chained
        self.tap_fn = tap_fn
        self.dpt_fn = dpt_fn
        self.head_autocast = head_autocast
        self.fold_dpt_pe = fold_dpt_pe
        self.dpt_nhwc = dpt_nhwc
        self.compiled = compiled
        self._pe_conv_cache = ShapeCache()

    def scope(self) -> ContextManager:
        """Dynamo's recompile limits raised to 64 while the compiled parts run (one graph per block
        structure and window shape, more than Dynamo's default of 8), only for the duration of the
        forward: nothing global changes at import, construction or compile time."""
        if not self.compiled:
            return contextlib.nullcontext()
        import torch._dynamo

        cfg = torch._dynamo.config
        limits = {k: max(getattr(cfg, k), 64) for k in ("cache_size_limit", "recompile_limit") if hasattr(cfg, k)}
        return cfg.patch(**limits)

    def unchain(self) -> None:
        """Back to one plain (compiled, if it was) block per ViT block: the chain's A/B in the benchmark."""
        self.chained = None

    def run_block(self, vit: nn.Module, i: int, x: Any, kind: str, pos: torch.Tensor | None, observed: bool) -> Any:
        """A chained block leaves its last residual add pending unless the trunk reads its output."""
        if self.chained is None:
            return super().run_block(vit, i, x, kind, pos, observed)
        return run_chained(self.chained[i], x, kind, pos, close=observed)

    def tokens(self, x: Any) -> torch.Tensor:
        return tokens_of(x)

    def finish_tap(self, norm, tap_local, tap_x, ref_idx, skip_tokens, hw):
        return (self.tap_fn or finish_tap)(norm, tap_local, tap_x, ref_idx, skip_tokens, hw)

    def pe_conv(self, head: nn.Module, H: int, W: int, pos_embeds: list[torch.Tensor] | None) -> torch.Tensor | None:
        """``dpt_pe_conv`` of the cached full-resolution embedding when ``fold_dpt_pe`` is on, cached by the
        embedding and by the conv weight's storage and version: loading or casting weights after a
        forward makes a new entry instead of reusing a stale one."""
        if not self.fold_dpt_pe or pos_embeds is None:
            return None
        weight = head.scratch.output_conv2[0].weight
        pe_full = pos_embeds[-1]
        key = (id(head), H, W, pe_full.dtype, str(pe_full.device), weight.data_ptr(), weight._version, weight.dtype)
        pe_conv = self._pe_conv_cache.get(key)
        if pe_conv is None:
            pe_conv = self._pe_conv_cache.put(key, dpt_pe_conv(head, pe_full))
        return pe_conv

    def dpt_chunk(self, head, feats, H, W, pos_embeds):
        fn = self.dpt_fn or fast_dualdpt_main
        return fn(head, feats, H, W, pos_embeds, self.pe_conv(head, H, W, pos_embeds), self.dpt_nhwc)


def merge_lora(backbone: DA3Backbone) -> int:
    """Fold every LoRA adapter of ``backbone`` into a second weight copy (``MergedLoraLinear``); pass 1
    keeps the frozen weight. Returns how many layers (0 on a second call)."""
    return backbone.replace_lora_layers(MergedLoraLinear)


def cast_block_linears(backbone: DA3Backbone, dtype: torch.dtype) -> int:
    """Store every linear layer of the ViT blocks (and merged LoRA copies) in ``dtype``; returns how many.
    Under autocast the GEMMs already run in ``dtype``, so this only removes the per-forward weight
    casts; norms, layer scales and the residual stream keep fp32."""
    return store_weights_in(backbone.vit.blocks, dtype, extra_types=(MergedLoraLinear,))


def cast_head_weights(backbone: DA3Backbone, dtype: torch.dtype) -> int:
    """Store DA3's DPT head and camera decoder weights in ``dtype``; only when the installed runner runs
    them under the caller's autocast (DA3's own fp32 heads would meet bf16 weights). The camera
    encoder always runs in fp32 and is left alone."""
    if not backbone.runner.head_autocast:
        raise RuntimeError("cast_head_weights needs a runner with head_autocast=True (DA3 runs its heads in fp32)")
    n = store_weights_in(backbone.net.head, dtype)
    if getattr(backbone.net, "cam_dec", None) is not None:
        n += store_weights_in(backbone.net.cam_dec, dtype)
    return n


def accelerate(backbone: DA3Backbone, options: FastPathOptions) -> FastRunner:
    """Apply ``options`` to ``backbone`` (see ``FastPathOptions``) and install the runner; returns it.

    The in-place changes stay (a later call builds its runner from its own options alone)."""
    if options.head_dtype is not None and not options.head_autocast:
        raise ValueError("head_dtype needs head_autocast=True (DA3 runs its heads in fp32)")
    if options.merge_lora:
        merge_lora(backbone)
    blocks = backbone.vit.blocks
    if options.block_dtype is not None:
        cast_block_linears(backbone, options.block_dtype)
    if options.fuse if options.fuse is not None else options.block_dtype is not None:
        fuse_block_mlps(blocks)
        fuse_block_attention(blocks)
    chained = [ChainedBlock(blk) for blk in blocks] if options.chain else None
    tap_fn = dpt_fn = None
    if options.compile_blocks:
        for module in list(blocks) + (chained or []):
            module.compile(mode=options.mode, dynamic=False)
        tap_fn = torch.compile(finish_tap, mode=options.mode, dynamic=False)
    if options.compile_dpt:
        dpt_fn = torch.compile(fast_dualdpt_main, mode=options.mode, dynamic=False)
    runner = FastRunner(chained, tap_fn, dpt_fn, options.head_autocast, options.fold_dpt_pe, options.dpt_nhwc,
                        compiled=options.compile_blocks or options.compile_dpt)
    backbone.runner = runner
    if options.head_dtype is not None:
        cast_head_weights(backbone, options.head_dtype)
    return runner
