"""A plain-numpy transform tree for offline replay (no ROS): static and stamped edges, chain lookups.

Why: ``fast3dis-eval`` reads ``/tf`` and ``/tf_static`` from a bag to give the pipeline the geometry the
robot already has (known camera poses, rig extrinsics) without rclpy; the node uses tf2_ros (``ros/tf.py``)
for the same lookups. Each child has one parent (as in tf2). Stamped edges are looked up at the nearest
stamp within ``tolerance_ns`` (bag transforms are written at the image stamps; no interpolation needed).
``T_a_b`` maps points of frame b to frame a.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TransformTree", "TransformLookupError"]


class TransformLookupError(LookupError):
    """Unknown frame, no chain between two frames, or no stamped edge near the requested time."""


@dataclass
class _Edge:
    parent: str
    static: bool
    T: np.ndarray | None = None  # static
    stamps: list[int] = field(default_factory=list)  # sorted (stamped)
    mats: list[np.ndarray] = field(default_factory=list)


class TransformTree:
    def __init__(self) -> None:
        self._edges: dict[str, _Edge] = {}

    def add(self, parent: str, child: str, T: np.ndarray, stamp_ns: int = 0, static: bool = False) -> None:
        """Add ``T_parent_child``. A non-finite matrix is refused (ValueError); a new parent for a known child
        replaces that child's edge (as tf2 does)."""
        T = np.asarray(T, np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError(f"transform {parent} <- {child}: not a finite 4x4 matrix")
        parent, child = parent.strip("/"), child.strip("/")
        e = self._edges.get(child)
        if e is None or e.parent != parent or e.static != static:
            e = self._edges[child] = _Edge(parent, static)
        if static:
            e.T = T
            return
        i = bisect.bisect_left(e.stamps, int(stamp_ns))
        if i < len(e.stamps) and e.stamps[i] == int(stamp_ns):
            e.mats[i] = T
        else:
            e.stamps.insert(i, int(stamp_ns))
            e.mats.insert(i, T)

    @property
    def frames(self) -> set[str]:
        return set(self._edges) | {e.parent for e in self._edges.values()}

    def _edge_T(self, child: str, stamp_ns: int, tolerance_ns: int) -> np.ndarray:
        e = self._edges[child]
        if e.static:
            return e.T
        i = bisect.bisect_left(e.stamps, int(stamp_ns))
        best = min((j for j in (i - 1, i) if 0 <= j < len(e.stamps)), key=lambda j: abs(e.stamps[j] - stamp_ns))
        if abs(e.stamps[best] - stamp_ns) > tolerance_ns:
            raise TransformLookupError(f"{e.parent} <- {child}: nearest stamp {e.stamps[best]} is "
                                       f"{abs(e.stamps[best] - stamp_ns) / 1e6:.1f} ms from {stamp_ns}")
        return e.mats[best]

    def _chain(self, frame: str, static_only: bool = False) -> list[str]:
        out = [frame]
        while frame in self._edges and len(out) < 256:
            e = self._edges[frame]
            if static_only and not e.static:
                break
            frame = e.parent
            out.append(frame)
        return out

    def _to_root(self, chain: list[str], stamp_ns: int, tolerance_ns: int) -> np.ndarray:
        T = np.eye(4)
        for child in chain[:-1]:
            T = self._edge_T(child, stamp_ns, tolerance_ns) @ T
        return T  # T_chain[-1]_chain[0]

    def lookup(self, target: str, source: str, stamp_ns: int = 0, tolerance_ns: int = 0) -> np.ndarray:
        """``T_target_source`` at ``stamp_ns`` through the common ancestor of both frames."""
        target, source = target.strip("/"), source.strip("/")
        if target not in self.frames or source not in self.frames:
            raise TransformLookupError(f"unknown frame: {target if target not in self.frames else source}")
        ca, cb = self._chain(source), self._chain(target)
        common = next((f for f in ca if f in set(cb)), None)
        if common is None:
            raise TransformLookupError(f"no chain between {target} and {source}")
        a = self._to_root(ca[: ca.index(common) + 1], stamp_ns, tolerance_ns)  # T_common_source
        b = self._to_root(cb[: cb.index(common) + 1], stamp_ns, tolerance_ns)  # T_common_target
        return np.linalg.inv(b) @ a

    def static_root(self, frame: str) -> tuple[str, np.ndarray]:
        """(the top frame reached from ``frame`` over static edges only, ``T_top_frame``): for a camera optical
        frame on a robot this is (``base_link``, the camera's rig extrinsics). (frame, I) when ``frame`` has
        no static parent."""
        chain = self._chain(frame.strip("/"), static_only=True)
        return chain[-1], self._to_root(chain, 0, 0)
