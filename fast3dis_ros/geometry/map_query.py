"""Selecting instances of a map snapshot: by id, minimum score, and an axis-aligned box in another frame.

The node's ``~/get_instances`` service is a thin wrapper around ``query_instances``; keeping the rules
here makes them testable without ROS. A request that cannot be answered (unknown id, box min > max,
empty map, non-finite numbers) raises ``InstanceQueryError`` with the reason, which the service returns
as its error message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fast3dis_ros.core.frames import InstanceCloud, InstanceSummary
from .clouds import select

__all__ = ["InstanceQueryError", "InstanceQuery", "query_instances", "points_of"]


class InstanceQueryError(ValueError):
    """The request cannot be answered as asked; the message says why."""


@dataclass
class InstanceQuery:
    """Filters, all optional. ``box`` = (min, max) corners in the box frame; ``T_box_map`` maps map
    points into that frame (identity when the box is given in the map frame)."""

    ids: list[int] = field(default_factory=list)
    min_score: float = 0.0
    box: tuple[np.ndarray, np.ndarray] | None = None
    T_box_map: np.ndarray | None = None


def _check(q: InstanceQuery) -> None:
    if not np.isfinite(q.min_score):
        raise InstanceQueryError(f"min_score {q.min_score} is not finite")
    if q.box is not None:
        lo, hi = (np.asarray(c, np.float64).reshape(3) for c in q.box)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise InstanceQueryError(f"box corners must be finite: min {lo.tolist()}, max {hi.tolist()}")
        bad = [a for a, lo_a, hi_a in zip("xyz", lo, hi) if lo_a > hi_a]
        if bad:
            raise InstanceQueryError(f"box min > max along {','.join(bad)}: min {lo.tolist()}, max {hi.tolist()}")


def query_instances(instances: list[InstanceSummary], q: InstanceQuery) -> list[InstanceSummary]:
    """The instances that pass every filter, in id order. An instance is in the box when its centroid,
    mapped into the box frame, lies inside (bounds included)."""
    _check(q)
    if not instances:
        raise InstanceQueryError("the map is empty (no window fused yet, or the map was reset)")
    by_id = {int(s.id): s for s in instances}
    if q.ids:
        missing = sorted({int(i) for i in q.ids} - set(by_id))
        if missing:
            raise InstanceQueryError(f"unknown instance id(s) {missing}; the map holds {len(by_id)} instance(s)"
                                     f" (ids {sorted(by_id)[:20]}{' ...' if len(by_id) > 20 else ''})")
        chosen = [by_id[i] for i in sorted({int(i) for i in q.ids})]
    else:
        chosen = [by_id[i] for i in sorted(by_id)]
    chosen = [s for s in chosen if float(s.score) >= q.min_score]
    if q.box is not None and chosen:
        lo, hi = (np.asarray(c, np.float64).reshape(3) for c in q.box)
        T = np.eye(4) if q.T_box_map is None else np.asarray(q.T_box_map, np.float64)
        c = np.stack([np.asarray(s.centroid, np.float64).reshape(3) for s in chosen])
        cb = c @ T[:3, :3].T + T[:3, 3]
        inside = np.all((cb >= lo) & (cb <= hi), axis=1)
        chosen = [s for s, k in zip(chosen, inside) if k]
    return chosen


def points_of(cloud: InstanceCloud, ids: list[int]) -> InstanceCloud:
    """The map points labelled with one of ``ids`` (same frame and stamp as the map)."""
    if not ids:
        return select(cloud, np.zeros(0, np.int64))
    keep = np.isin(np.asarray(cloud.instance), np.asarray(sorted(ids), np.uint32))
    return select(cloud, np.flatnonzero(keep))
