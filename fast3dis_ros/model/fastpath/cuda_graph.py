"""Replay the whole FAST3DIS forward as captured CUDA graphs, one per window shape.

Why: at robot-sized windows (8 views) the forward is a few thousand small kernels; launching them
one by one from Python costs more than running them. A node sees the same few window shapes over
and over, so each shape is captured once and replayed with a single launch.

What makes it possible: the forward has no host synchronisation or data-dependent shape (DA3's RoPE
and camera encoder replaced, see ``model/da3/grid_rope.py`` / ``model/da3/camera_encoding.py``; ``test_sync_free.py``
proves it on the ``meta`` device). Autocast runs with ``cache_enabled=False``, as graph capture needs.

Contract: the returned dict holds the graph's static output tensors; they are overwritten by the
next call with the same shape. Read or copy what you need first (``Predictor`` copies to the host).
Any capture failure falls back to eager for that shape, once, with a warning.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


def _signature(images: torch.Tensor, K: torch.Tensor | None, T: torch.Tensor | None) -> tuple:
    def sig(t):
        return None if t is None else (tuple(t.shape), t.dtype)

    return (sig(images), sig(K), sig(T), str(images.device))


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor | None], outputs: Any) -> None:
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class GraphedForward:
    """``f(images, K=None, T_cam_world=None)`` with one CUDA graph per input signature (LRU of ``max_graphs``).

    ``model`` is any module with that call signature (``Fast3DIS``; or a bound method such as
    ``DA3Backbone.forward_geometry`` wrapped in a lambda). ``amp_dtype``: autocast dtype or None for fp32.
    Non-CUDA inputs run eagerly.
    """

    def __init__(self, model: Callable, amp_dtype: torch.dtype | None = torch.bfloat16, max_graphs: int = 2,
                 warmup: int = 3) -> None:
        self.model = model
        self.amp_dtype = amp_dtype
        self.max_graphs = max(1, int(max_graphs))
        self.warmup = max(1, int(warmup))
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._eager_only: set[tuple] = set()
        self.captures = 0
        self.replays = 0
        self.failures: list[str] = []

    def _autocast(self, device_type: str):
        enabled = self.amp_dtype is not None and self.amp_dtype != torch.float32
        return torch.autocast(device_type, dtype=self.amp_dtype or torch.float32, enabled=enabled, cache_enabled=False)

    def _eager(self, images, K, T):
        with torch.inference_mode(), self._autocast(images.device.type):
            return self.model(images, K=K, T_cam_world=T)

    def _capture(self, images, K, T) -> _Graph:
        static = [t.clone() if t is not None else None for t in (images, K, T)]
        side = torch.cuda.Stream(device=images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side), torch.inference_mode(), self._autocast("cuda"):
            for _ in range(self.warmup):  # lazy inits, cuDNN/cuBLAS autotuning, caches
                self.model(static[0], K=static[1], T_cam_world=static[2])
        torch.cuda.current_stream(images.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), self._autocast("cuda"), torch.cuda.graph(graph):
            outputs = self.model(static[0], K=static[1], T_cam_world=static[2])
        return _Graph(graph, static, outputs)

    def __call__(self, images: torch.Tensor, K: torch.Tensor | None = None, T_cam_world: torch.Tensor | None = None):
        if images.device.type != "cuda":
            return self._eager(images, K, T_cam_world)
        key = _signature(images, K, T_cam_world)
        if key in self._eager_only:
            return self._eager(images, K, T_cam_world)
        g = self._graphs.get(key)
        if g is None:
            try:
                g = self._capture(images, K, T_cam_world)
            except Exception as e:  # noqa: BLE001 -- any capture problem: run this shape eagerly
                msg = f"CUDA graph capture failed for {key}: {type(e).__name__}: {e}"
                log.warning("%s; running this window shape eagerly", msg)
                self.failures.append(msg)
                self._eager_only.add(key)
                torch.cuda.synchronize(images.device)
                return self._eager(images, K, T_cam_world)
            self.captures += 1
            self._graphs[key] = g
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)  # frees that graph's memory pool
        else:
            self._graphs.move_to_end(key)
        for dst, src in zip(g.inputs, (images, K, T_cam_world)):
            if dst is not None:
                dst.copy_(src, non_blocking=True)
        g.graph.replay()
        self.replays += 1
        return g.outputs
