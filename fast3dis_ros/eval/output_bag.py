"""Write the node's output topics to a rosbag2 without ROS: rosbags message types, no rclpy.

The offline replay (``fast3dis-demo``, ``fast3dis-eval``) records what the node would publish:

====================================  ==========================================  ============================
topic                                 type                                        when
====================================  ==========================================  ============================
``/fast3dis/window_cloud``            sensor_msgs/msg/PointCloud2 (frame ``map``)  one per processed window
``/fast3dis/instances_cloud``         sensor_msgs/msg/PointCloud2 (frame ``map``)  one per processed window,
                                                                                  the last one = final map
``/fast3dis/instances``               fast3dis_msgs/msg/InstanceArray              one per processed window
``/fast3dis/markers``                 visualization_msgs/msg/MarkerArray           one per processed window
``/tf``                               tf2_msgs/msg/TFMessage                       one per processed window,
                                                                                  one transform per view
====================================  ==========================================  ============================

``fast3dis_msgs/msg/InstanceArray`` is registered into the rosbags typestore from this package's
``msg/*.msg`` definitions (``get_types_from_msg``), so the bag is readable by ``ros2 bag`` on a real
install where fast3dis_msgs is built. Only if those definitions cannot be found does the writer fall back
to ``/fast3dis/instances_json`` (std_msgs/msg/String holding JSON).

PointCloud2 layout = ``geometry.clouds.POINT_FIELDS`` (x y z rgb instance score, 24 bytes, little endian).
TF: map frames are Sim(3)-aligned and up to scale; TF carries the rigid part (rotation and the camera
centre in map units), the scale lives in the map's units.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from fast3dis_ros.geometry.clouds import POINT_DTYPE, POINT_FIELDS, POINT_STEP, pointcloud_structured, structured_to_cloud
from fast3dis_ros.geometry.rotations import nearest_rotation, quat_xyzw_from_matrix
from fast3dis_ros.core.frames import InstanceCloud, InstanceSummary
from fast3dis_ros.pipeline.markers import instance_markers

__all__ = [
    "TOPIC_WINDOW_CLOUD",
    "TOPIC_MAP_CLOUD",
    "TOPIC_INSTANCES",
    "TOPIC_INSTANCES_JSON",
    "TOPIC_MARKERS",
    "TOPIC_TF",
    "INSTANCE_ARRAY_TYPE",
    "make_typestore",
    "find_msg_dir",
    "OutputBagWriter",
    "read_output_bag",
    "cloud_from_msg",
    "instances_from_msg",
    "rigid_from_sim3",
]

TOPIC_WINDOW_CLOUD = "/fast3dis/window_cloud"
TOPIC_MAP_CLOUD = "/fast3dis/instances_cloud"
TOPIC_INSTANCES = "/fast3dis/instances"
TOPIC_INSTANCES_JSON = "/fast3dis/instances_json"
TOPIC_MARKERS = "/fast3dis/markers"
TOPIC_TF = "/tf"
INSTANCE_ARRAY_TYPE = "fast3dis_msgs/msg/InstanceArray"
INSTANCE_TYPE = "fast3dis_msgs/msg/Instance"


def find_msg_dir() -> Path | None:
    """Folder holding Instance.msg + InstanceArray.msg: the repository's ``msg/`` or
    ``interfaces/fast3dis_msgs/msg``, or ``share/fast3dis_ros/msg`` of an installed package."""
    import sys

    here = Path(__file__).resolve()
    cands = [here.parents[2] / "msg", here.parents[2] / "interfaces" / "fast3dis_msgs" / "msg",
             Path(sys.prefix) / "share" / "fast3dis_ros" / "msg"]
    for c in cands:
        if (c / "Instance.msg").is_file() and (c / "InstanceArray.msg").is_file():
            return c
    return None


def make_typestore(register_instances: bool = True):
    """ROS 2 Kilted typestore (+ fast3dis_msgs when its .msg files are found).

    Returns (typestore, has_instance_array)."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    ok = False
    d = find_msg_dir() if register_instances else None
    if d is not None:
        types = {}
        for name in ("Instance", "InstanceArray"):
            types.update(get_types_from_msg((d / f"{name}.msg").read_text(), f"fast3dis_msgs/msg/{name}"))
        ts.register(types)
        ok = True
    return ts, ok


def _stamp(ts, stamp_ns: int):
    Time = ts.types["builtin_interfaces/msg/Time"]
    return Time(sec=int(stamp_ns // 1_000_000_000), nanosec=int(stamp_ns % 1_000_000_000))


def _header(ts, frame_id: str, stamp_ns: int):
    return ts.types["std_msgs/msg/Header"](stamp=_stamp(ts, stamp_ns), frame_id=frame_id)


def rigid_from_sim3(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R (3,3), t (3,)) of a 4x4 SE(3) or Sim(3) ``T_a_b``: the frame's orientation and origin in a."""
    T = np.asarray(T, np.float64)
    return nearest_rotation(T[:3, :3]), T[:3, 3].copy()


class OutputBagWriter:
    """Context manager writing output topics to a new rosbag2 (mcap by default; sqlite3 optional).

    ``counts`` holds the number of messages written per topic."""

    def __init__(self, path: str | Path, storage: str = "mcap", instances_as_json: bool = False):
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
        self.ts, has_inst = make_typestore(register_instances=not instances_as_json)
        self.instances_native = has_inst
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
        self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        self._conns: dict[str, object] = {}
        self.counts: Counter = Counter()

    def __enter__(self):
        self._writer.open()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # -- generic --------------------------------------------------------------------------------
    def write(self, topic: str, msgtype: str, msg, stamp_ns: int) -> None:
        conn = self._conns.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=self.ts)
            self._conns[topic] = conn
        self._writer.write(conn, int(stamp_ns), self.ts.serialize_cdr(msg, msgtype))
        self.counts[topic] += 1

    # -- message builders -----------------------------------------------------------------------
    def pointcloud2(self, cloud: InstanceCloud, frame_id: str | None = None, stamp_ns: int | None = None):
        T = self.ts.types
        arr = pointcloud_structured(cloud)
        n = len(cloud)
        fields = [T["sensor_msgs/msg/PointField"](name=nm, offset=off, datatype=dt, count=c)
                  for nm, off, dt, c in POINT_FIELDS]
        return T["sensor_msgs/msg/PointCloud2"](
            header=_header(self.ts, frame_id or cloud.frame_id, cloud.stamp_ns if stamp_ns is None else stamp_ns),
            height=1, width=n, fields=fields, is_bigendian=False, point_step=POINT_STEP,
            row_step=POINT_STEP * n, data=np.frombuffer(arr.tobytes(), np.uint8),
            is_dense=bool(np.isfinite(cloud.xyz).all()),
        )

    def instance_array(self, instances: list[InstanceSummary], frame_id: str, stamp_ns: int):
        T = self.ts.types
        P, V = T["geometry_msgs/msg/Point"], T["geometry_msgs/msg/Vector3"]
        items = []
        for s in instances:
            c, lo, hi = (np.asarray(a, np.float64) for a in (s.centroid, s.bbox_min, s.bbox_max))
            items.append(T[INSTANCE_TYPE](
                id=int(s.id), score=float(s.score), centroid=P(x=c[0], y=c[1], z=c[2]),
                bbox_min=V(x=lo[0], y=lo[1], z=lo[2]), bbox_max=V(x=hi[0], y=hi[1], z=hi[2]),
                num_points=int(s.n_points), views_seen=int(s.views_seen)))
        return T[INSTANCE_ARRAY_TYPE](header=_header(self.ts, frame_id, stamp_ns), instances=items)

    @staticmethod
    def instances_json(instances: list[InstanceSummary], frame_id: str, stamp_ns: int) -> str:
        return json.dumps({
            "frame_id": frame_id, "stamp_ns": int(stamp_ns),
            "instances": [{"id": int(s.id), "score": float(s.score),
                           "centroid": [float(x) for x in s.centroid],
                           "bbox_min": [float(x) for x in s.bbox_min], "bbox_max": [float(x) for x in s.bbox_max],
                           "num_points": int(s.n_points), "views_seen": int(s.views_seen)} for s in instances],
        })

    def _marker(self, header, d: dict):
        """visualization_msgs/Marker from one ``pipeline.markers.instance_markers`` description."""
        T = self.ts.types
        V = T["geometry_msgs/msg/Vector3"]
        pos, q, scale, rgba = d["position"], d["orientation"], d["scale"], d["color"]
        pose = T["geometry_msgs/msg/Pose"](position=T["geometry_msgs/msg/Point"](x=pos[0], y=pos[1], z=pos[2]),
                                           orientation=T["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3]))
        return T["visualization_msgs/msg/Marker"](
            header=header, ns=d["ns"], id=d["id"], type=d["type"], action=d["action"], pose=pose,
            scale=V(x=scale[0], y=scale[1], z=scale[2]),
            color=T["std_msgs/msg/ColorRGBA"](r=rgba[0], g=rgba[1], b=rgba[2], a=rgba[3]),
            lifetime=T["builtin_interfaces/msg/Duration"](sec=0, nanosec=0), frame_locked=False, points=[],
            colors=[], texture_resource="",
            texture=T["sensor_msgs/msg/CompressedImage"](header=header, format="", data=np.zeros(0, np.uint8)),
            uv_coordinates=[], text=d["text"], mesh_resource="",
            mesh_file=T["visualization_msgs/msg/MeshFile"](filename="", data=np.zeros(0, np.uint8)),
            mesh_use_embedded_materials=False,
        )

    def marker_array(self, instances: list[InstanceSummary], frame_id: str, stamp_ns: int, ns: str = "fast3dis",
                     text_height: float = 0.1):
        """Same markers as the node (both built from ``pipeline.markers.instance_markers``): DELETEALL, then
        per instance a CUBE (its axis-aligned box, ns ``fast3dis/boxes``) and a TEXT label ``id (score)``
        (``fast3dis/labels``)."""
        hdr = _header(self.ts, frame_id, stamp_ns)
        markers = [self._marker(hdr, d) for d in instance_markers(instances, ns=ns, text_height=text_height)]
        return self.ts.types["visualization_msgs/msg/MarkerArray"](markers=markers)

    def tf_message(self, parent: str, children: list[str], T_parent_child: np.ndarray, stamps_ns: list[int]):
        T = self.ts.types
        tfs = []
        for child, Tm, st in zip(children, T_parent_child, stamps_ns):
            R, t = rigid_from_sim3(Tm)
            q = quat_xyzw_from_matrix(R)
            tfs.append(T["geometry_msgs/msg/TransformStamped"](
                header=_header(self.ts, parent, st), child_frame_id=child,
                transform=T["geometry_msgs/msg/Transform"](
                    translation=T["geometry_msgs/msg/Vector3"](x=t[0], y=t[1], z=t[2]),
                    rotation=T["geometry_msgs/msg/Quaternion"](x=q[0], y=q[1], z=q[2], w=q[3]))))
        return T["tf2_msgs/msg/TFMessage"](transforms=tfs)

    # -- one pipeline result --------------------------------------------------------------------
    def write_update(self, stamp_ns: int, window_cloud: InstanceCloud | None, map_cloud: InstanceCloud | None,
                     instances: list[InstanceSummary], map_frame: str = "map",
                     view_frames: list[str] | None = None, T_map_cam: np.ndarray | None = None,
                     view_stamps_ns: list[int] | None = None) -> None:
        """Everything the node publishes for one processed window, all stamped ``stamp_ns``."""
        if window_cloud is not None:
            self.write(TOPIC_WINDOW_CLOUD, "sensor_msgs/msg/PointCloud2",
                       self.pointcloud2(window_cloud, stamp_ns=stamp_ns), stamp_ns)
        if map_cloud is not None:
            self.write(TOPIC_MAP_CLOUD, "sensor_msgs/msg/PointCloud2",
                       self.pointcloud2(map_cloud, stamp_ns=stamp_ns), stamp_ns)
        if self.instances_native:
            self.write(TOPIC_INSTANCES, INSTANCE_ARRAY_TYPE, self.instance_array(instances, map_frame, stamp_ns),
                       stamp_ns)
        else:
            self.write(TOPIC_INSTANCES_JSON, "std_msgs/msg/String",
                       self.ts.types["std_msgs/msg/String"](data=self.instances_json(instances, map_frame, stamp_ns)),
                       stamp_ns)
        self.write(TOPIC_MARKERS, "visualization_msgs/msg/MarkerArray",
                   self.marker_array(instances, map_frame, stamp_ns), stamp_ns)
        if view_frames and T_map_cam is not None and len(view_frames):
            stamps = view_stamps_ns if view_stamps_ns is not None else [stamp_ns] * len(view_frames)
            self.write(TOPIC_TF, "tf2_msgs/msg/TFMessage",
                       self.tf_message(map_frame, list(view_frames), np.asarray(T_map_cam), list(stamps)), stamp_ns)


# -- reading back (tests, tools) ----------------------------------------------------------------
def cloud_from_msg(msg) -> InstanceCloud:
    """InstanceCloud from a deserialised PointCloud2 in this package's layout."""
    names = [f.name for f in msg.fields]
    if names != [f[0] for f in POINT_FIELDS] or msg.point_step != POINT_STEP:
        raise ValueError(f"unexpected PointCloud2 layout: fields {names}, point_step {msg.point_step}")
    arr = np.frombuffer(np.asarray(msg.data, np.uint8).tobytes(), POINT_DTYPE)
    st = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
    return structured_to_cloud(arr, msg.header.frame_id, st)


def instances_from_msg(msg) -> list[dict]:
    """List of instance dicts from an InstanceArray message or a JSON String message."""
    if hasattr(msg, "instances"):
        return [{"id": int(i.id), "score": float(i.score), "num_points": int(i.num_points),
                 "views_seen": int(i.views_seen)} for i in msg.instances]
    return json.loads(msg.data)["instances"]


def read_output_bag(path: str | Path) -> dict[str, list[tuple[int, object]]]:
    """topic -> [(log time ns, deserialised message)] for a bag this module wrote."""
    from rosbags.rosbag2 import Reader

    ts, _ = make_typestore()
    out: dict[str, list] = {}
    with Reader(path) as r:
        for conn, t, raw in r.messages():
            out.setdefault(conn.topic, []).append((t, ts.deserialize_cdr(raw, conn.msgtype)))
    return out
