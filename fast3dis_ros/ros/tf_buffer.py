"""A small TF buffer for where ``tf2_ros`` is not importable (the PyPI venv); ``tf2_ros`` is preferred.

``TfBuffer`` keeps, per child frame, its parent and a bounded, time-sorted history of
``T_parent_child`` (translation + unit quaternion): at most ``max_history`` entries and nothing older
than ``cache_time_s`` before the newest one (tf2's default cache is 10 s). Static transforms
(``/tf_static``) keep one entry, valid at every time. As in tf2, a frame has one parent: a transform
that names a different parent for a known child replaces that child's history (counted in
``parent_changes``).

``lookup(target, source, stamp_ns, tolerance_ns) -> T_target_source`` (4x4, maps points of ``source``
to ``target``) walks both frames up to their common ancestor, so chains and inverse edges work;
every dynamic edge is interpolated at ``stamp_ns`` (linear translation, quaternion slerp). A stamp
outside an edge's history is accepted within ``tolerance_ns`` of its oldest/newest entry (that entry
is used); beyond it, or for unknown / unconnected frames, ``TfLookupError`` (a ``LookupError``) says
which edge and by how much. ``stamp_ns=0`` means the latest time all dynamic edges of the path share.

``TfListener(node, buffer)`` subscribes ``/tf`` (reliable, volatile) and ``/tf_static`` (reliable,
transient local: late joiners still get the latched static transforms). ``make_tf_lookup(node)``
returns a ``TfLookup`` with the same ``lookup`` on top of ``tf2_ros.Buffer`` + ``TransformListener``
when tf2_ros is importable, else on top of ``TfBuffer`` + ``TfListener``.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

import numpy as np

from fast3dis_ros.geometry.rotations import matrix_from_quat_xyzw
from fast3dis_ros.ros.tf import HAVE_TF2_ROS

__all__ = ["TfLookupError", "TfBuffer", "TfListener", "TfLookup", "make_tf_lookup", "slerp"]


class TfLookupError(LookupError):
    """A transform that cannot be given: unknown frame, no path, or extrapolation beyond the tolerance."""


def slerp(q0: np.ndarray, q1: np.ndarray, a: float) -> np.ndarray:
    """Spherical interpolation of unit quaternions (x, y, z, w) at ``a`` in [0, 1] (shortest arc)."""
    q0 = np.asarray(q0, np.float64)
    q1 = np.asarray(q1, np.float64)
    d = float(np.dot(q0, q1))
    if d < 0.0:
        q1, d = -q1, -d
    if d > 0.9995:  # nearly identical: normalised lerp
        q = q0 + a * (q1 - q0)
        return q / np.linalg.norm(q)
    th = np.arccos(min(1.0, d))
    s = np.sin(th)
    return (np.sin((1 - a) * th) * q0 + np.sin(a * th) * q1) / s


def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _msg_fields(t):
    """(parent, child, stamp_ns, translation (3,), quaternion xyzw (4,)) of a TransformStamped(-like)."""
    tr, r = t.transform.translation, t.transform.rotation
    q = np.array([r.x, r.y, r.z, r.w], np.float64)
    n = float(np.linalg.norm(q))
    if not np.isfinite(n) or n < 1e-9:
        raise ValueError(f"transform {t.header.frame_id} -> {t.child_frame_id}: invalid quaternion {q}")
    p = np.array([tr.x, tr.y, tr.z], np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"transform {t.header.frame_id} -> {t.child_frame_id}: non-finite translation")
    return t.header.frame_id.lstrip("/"), t.child_frame_id.lstrip("/"), _stamp_ns(t.header.stamp), p, q / n


@dataclass
class _Edge:
    parent: str
    static: bool
    stamps: list = field(default_factory=list)  # sorted int ns
    trans: list = field(default_factory=list)  # (3,) per stamp
    quats: list = field(default_factory=list)  # (4,) per stamp

    def insert(self, stamp: int, p: np.ndarray, q: np.ndarray, max_history: int, cache_ns: int) -> None:
        if self.static:
            self.stamps, self.trans, self.quats = [stamp], [p], [q]
            return
        i = bisect.bisect_left(self.stamps, stamp)
        if i < len(self.stamps) and self.stamps[i] == stamp:  # same stamp: newest data wins
            self.trans[i], self.quats[i] = p, q
        else:
            self.stamps.insert(i, stamp)
            self.trans.insert(i, p)
            self.quats.insert(i, q)
        # bounded: drop what is older than the cache time before the newest, then cap the count
        cut = bisect.bisect_left(self.stamps, self.stamps[-1] - cache_ns)
        cut = max(cut, len(self.stamps) - max_history)
        if cut > 0:
            del self.stamps[:cut], self.trans[:cut], self.quats[:cut]

    def at(self, stamp: int, tolerance_ns: int, child: str) -> np.ndarray:
        if self.static:
            i0 = i1 = 0
            a = 0.0
        else:
            st = self.stamps
            if stamp < st[0] or stamp > st[-1]:
                end = 0 if stamp < st[0] else len(st) - 1
                gap = abs(stamp - st[end])
                if gap > tolerance_ns:
                    where = "past (older than the oldest" if stamp < st[0] else "future (newer than the newest"
                    raise TfLookupError(
                        f"extrapolation into the {where} transform {self.parent} -> {child} by "
                        f"{gap / 1e6:.1f} ms > tolerance {tolerance_ns / 1e6:.1f} ms; history "
                        f"[{st[0]}, {st[-1]}] ns, {len(st)} entries; requested {stamp}")
                i0 = i1 = end
                a = 0.0
            else:
                i1 = bisect.bisect_left(st, stamp)
                if st[i1] == stamp:
                    i0, a = i1, 0.0
                else:
                    i0 = i1 - 1
                    a = (stamp - st[i0]) / (st[i1] - st[i0])
        if i0 == i1:
            p, q = self.trans[i0], self.quats[i0]
        else:
            p = (1 - a) * self.trans[i0] + a * self.trans[i1]
            q = slerp(self.quats[i0], self.quats[i1], a)
        T = np.eye(4)
        T[:3, :3] = matrix_from_quat_xyzw(q)
        T[:3, 3] = p
        return T


class TfBuffer:
    """Thread-safe TF store with tree lookups and time interpolation (see the module docstring)."""

    def __init__(self, cache_time_s: float = 10.0, max_history: int = 1000, max_depth: int = 64):
        self.cache_ns = int(cache_time_s * 1e9)
        self.max_history = int(max_history)
        self.max_depth = int(max_depth)
        self._edges: dict[str, _Edge] = {}  # child -> edge to its parent
        self._lock = threading.Lock()
        self.parent_changes = 0
        self.rejected = 0

    # ------------------------------------------------------------------ input
    def set_transform(self, t, static: bool = False) -> bool:
        """Store one TransformStamped(-like); False (counted in ``rejected``) when it is unusable."""
        try:
            parent, child, stamp, p, q = _msg_fields(t)
        except (ValueError, AttributeError):
            self.rejected += 1
            return False
        if not parent or not child or parent == child:
            self.rejected += 1
            return False
        with self._lock:
            e = self._edges.get(child)
            if e is None or e.parent != parent or e.static != static:
                if e is not None and e.parent != parent:
                    self.parent_changes += 1
                e = self._edges[child] = _Edge(parent, static)
            e.insert(stamp, p, q, self.max_history, self.cache_ns)
        return True

    def set_matrix(self, T: np.ndarray, parent: str, child: str, stamp_ns: int, static: bool = False) -> bool:
        from fast3dis_ros.ros.tf import matrix_to_transform

        return self.set_transform(matrix_to_transform(T, parent, child, stamp_ns), static)

    def add_message(self, msg, static: bool = False) -> int:
        """All transforms of a TFMessage(-like); returns how many were stored."""
        return sum(self.set_transform(t, static) for t in msg.transforms)

    # ------------------------------------------------------------------ queries
    def frames(self) -> set[str]:
        with self._lock:
            return set(self._edges) | {e.parent for e in self._edges.values()}

    def history_len(self, child: str) -> int:
        with self._lock:
            e = self._edges.get(child)
            return 0 if e is None else len(e.stamps)

    def _chain(self, frame: str) -> list[str]:
        """frame, parent, grandparent, ... up to the root."""
        out = [frame]
        while frame in self._edges:
            frame = self._edges[frame].parent
            if frame in out or len(out) > self.max_depth:
                raise TfLookupError(f"TF loop or tree deeper than {self.max_depth} at '{frame}'")
            out.append(frame)
        return out

    def lookup(self, target_frame: str, source_frame: str, stamp_ns: int = 0, tolerance_ns: int = 0) -> np.ndarray:
        """``T_target_source`` at ``stamp_ns`` (0: latest common time). Raises ``TfLookupError``."""
        target_frame, source_frame = target_frame.lstrip("/"), source_frame.lstrip("/")
        with self._lock:
            known = set(self._edges) | {e.parent for e in self._edges.values()}
            for f in (target_frame, source_frame):
                if f not in known:
                    raise TfLookupError(f"frame '{f}' does not exist (known: {sorted(known)[:20]})")
            if target_frame == source_frame:
                return np.eye(4)
            up_s, up_t = self._chain(source_frame), self._chain(target_frame)
            common = next((f for f in up_s if f in set(up_t)), None)
            if common is None:
                raise TfLookupError(f"no TF path between '{target_frame}' and '{source_frame}': they are in "
                                    f"different trees (roots '{up_t[-1]}' and '{up_s[-1]}')")
            path_s = up_s[: up_s.index(common)]  # children whose edge is used, from source up
            path_t = up_t[: up_t.index(common)]
            if stamp_ns == 0:
                dyn = [self._edges[c].stamps[-1] for c in path_s + path_t if not self._edges[c].static]
                stamp_ns = min(dyn) if dyn else 0
            T_common_source = np.eye(4)
            for c in reversed(path_s):  # common -> ... -> source
                T_common_source = T_common_source @ self._edges[c].at(stamp_ns, tolerance_ns, c)
            T_common_target = np.eye(4)
            for c in reversed(path_t):
                T_common_target = T_common_target @ self._edges[c].at(stamp_ns, tolerance_ns, c)
        R, t = T_common_target[:3, :3], T_common_target[:3, 3]
        inv = np.eye(4)
        inv[:3, :3] = R.T
        inv[:3, 3] = -R.T @ t
        return inv @ T_common_source

    def can_transform(self, target_frame: str, source_frame: str, stamp_ns: int = 0, tolerance_ns: int = 0) -> bool:
        try:
            self.lookup(target_frame, source_frame, stamp_ns, tolerance_ns)
            return True
        except TfLookupError:
            return False


class TfListener:
    """Feeds a ``TfBuffer`` from ``/tf`` and ``/tf_static`` (static: transient local, like tf2_ros)."""

    def __init__(self, node, buffer: TfBuffer, qos_depth: int = 100):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from tf2_msgs.msg import TFMessage

        self.buffer = buffer
        dyn = QoSProfile(depth=qos_depth, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
        static = QoSProfile(depth=qos_depth, history=HistoryPolicy.KEEP_LAST,
                            reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self._subs = [
            node.create_subscription(TFMessage, "/tf", lambda m: buffer.add_message(m, static=False), dyn),
            node.create_subscription(TFMessage, "/tf_static", lambda m: buffer.add_message(m, static=True), static),
        ]


class TfLookup:
    """``lookup(target, source, stamp_ns, tolerance_ns) -> T_target_source`` over tf2_ros or ``TfBuffer``."""

    def __init__(self, node, force_fallback: bool = False, cache_time_s: float = 10.0):
        self.uses_tf2_ros = HAVE_TF2_ROS and not force_fallback
        if self.uses_tf2_ros:  # pragma: no cover - real ROS install only
            import tf2_ros
            from rclpy.duration import Duration

            self.buffer = tf2_ros.Buffer(cache_time=Duration(seconds=cache_time_s))
            self._listener = tf2_ros.TransformListener(self.buffer, node)
        else:
            self.buffer = TfBuffer(cache_time_s=cache_time_s)
            self._listener = TfListener(node, self.buffer)

    def lookup(self, target_frame: str, source_frame: str, stamp_ns: int, tolerance_ns: int = 0) -> np.ndarray:
        if not self.uses_tf2_ros:
            return self.buffer.lookup(target_frame, source_frame, stamp_ns, tolerance_ns)
        from rclpy.time import Time  # pragma: no cover

        from fast3dis_ros.ros.tf import transform_to_matrix  # pragma: no cover

        try:  # pragma: no cover - tf2 has no extrapolation tolerance: exact stamp, else latest if close
            return transform_to_matrix(self.buffer.lookup_transform(target_frame, source_frame,
                                                                    Time(nanoseconds=int(stamp_ns))))
        except Exception as e:  # pragma: no cover
            if tolerance_ns > 0:
                t = self.buffer.lookup_transform(target_frame, source_frame, Time())
                if abs(_stamp_ns(t.header.stamp) - int(stamp_ns)) <= tolerance_ns:
                    return transform_to_matrix(t)
            raise TfLookupError(str(e)) from e


def make_tf_lookup(node, force_fallback: bool = False) -> TfLookup:
    return TfLookup(node, force_fallback=force_fallback)

