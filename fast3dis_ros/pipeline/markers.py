"""What the instance markers look like, without ROS: one description, two message builders.

``instance_markers`` returns plain dicts; ``ros/conversions.instances_to_markers`` (rclpy, live node)
and ``eval/output_bag.OutputBagWriter.marker_array`` (rosbags, output bags) turn them into
``visualization_msgs/MarkerArray`` messages field by field, so both publish the same markers:
DELETEALL, then per instance a CUBE (its axis-aligned box, ns ``<ns>/boxes``) and a
TEXT_VIEW_FACING label ``id (score)`` above it (ns ``<ns>/labels``), coloured by
:func:`instance_color`.

Note: ``viz.label_color`` (PNG / PLY reports) is a different palette (uint8, saturation / value
cycling, id 0 grey); marker colours come only from :func:`instance_color` here.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

from fast3dis_ros.core.frames import InstanceSummary

__all__ = ["ARROW", "CUBE", "TEXT_VIEW_FACING", "ADD", "DELETEALL", "BOX_ALPHA", "LABEL_ALPHA",
           "instance_color", "instance_markers"]

# visualization_msgs/msg/Marker constants (fixed by the message definition)
ARROW = 0
CUBE = 1
TEXT_VIEW_FACING = 9
ADD = 0
DELETEALL = 3

BOX_ALPHA = 0.35
LABEL_ALPHA = 1.0


def instance_color(instance_id: int) -> tuple[float, float, float]:
    """Stable, well separated RGB in [0, 1] for an instance id (golden-ratio hue walk)."""
    h = (int(instance_id) * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(h, 0.75, 0.95)


def _marker(ns: str, mid: int, mtype: int, action: int, position=(0.0, 0.0, 0.0), scale=(0.0, 0.0, 0.0),
            color=(0.0, 0.0, 0.0, 0.0), text: str = "") -> dict:
    return {
        "ns": ns, "id": int(mid), "type": int(mtype), "action": int(action),
        "position": tuple(float(v) for v in position), "orientation": (0.0, 0.0, 0.0, 1.0),  # x y z w
        "scale": tuple(float(v) for v in scale), "color": tuple(float(v) for v in color), "text": text,
    }


def instance_markers(instances: list[InstanceSummary], ns: str = "fast3dis", min_size: float = 1e-3,
                     text_height: float = 0.1) -> list[dict]:
    """Marker descriptions, in publishing order: one DELETEALL (ns ``ns``), then per instance with a
    finite box a CUBE and a TEXT_VIEW_FACING label.

    Each dict: ``ns`` (str), ``id`` (int), ``type`` / ``action`` (Marker constants), ``position``
    (x, y, z), ``orientation`` (x, y, z, w), ``scale`` (x, y, z), ``color`` (r, g, b, a), ``text``;
    all numbers are Python floats / ints.
    """
    out = [_marker(ns, 0, ARROW, DELETEALL)]
    for s in instances:
        lo = np.asarray(s.bbox_min, np.float64).reshape(3)
        hi = np.asarray(s.bbox_max, np.float64).reshape(3)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            continue
        r, g, b = instance_color(s.id)
        center = (lo + hi) / 2.0
        size = np.maximum(hi - lo, min_size)
        out.append(_marker(ns + "/boxes", s.id, CUBE, ADD, center, size, (r, g, b, BOX_ALPHA)))
        score = float(s.score)
        text = f"{int(s.id)} ({score:.2f})" if math.isfinite(score) else str(int(s.id))
        out.append(_marker(ns + "/labels", s.id, TEXT_VIEW_FACING, ADD, (center[0], center[1], hi[2] + text_height),
                           (0.0, 0.0, text_height), (r, g, b, LABEL_ALPHA), text))
    return out
