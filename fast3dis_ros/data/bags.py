"""rosbag2 input/output without ROS, through the pure-Python ``rosbags`` library (mcap or sqlite3).

Topics written by :func:`write_scene_bag` for each camera ``<cam>`` of a synthetic scene:

=============================  ===========================  =============================================
topic                          type                         content
=============================  ===========================  =============================================
``/<cam>/image_raw``           sensor_msgs/msg/Image        rgb8, frame_id ``<cam>_optical_frame``
``/<cam>/camera_info``         sensor_msgs/msg/CameraInfo   K, P = [K|0], D = 0 (plumb_bob), R = I
``/<cam>/depth_gt``            sensor_msgs/msg/Image        32FC1 metric z-depth (ground truth)
``/<cam>/instance_gt``         sensor_msgs/msg/Image        32SC1 instance ids, 0 = background
``/tf_static``                 tf2_msgs/msg/TFMessage       ``base_link`` -> ``<cam>_optical_frame`` (the
                                                            rig extrinsics), once, at the first stamp
``/tf``                        tf2_msgs/msg/TFMessage       ``map`` -> ``base_link`` at every image stamp
``/fast3dis_gt/instances``     std_msgs/msg/String          JSON {"instances": [...], "cameras": [...],
                                                            "T_rig_cam": {...}, "K": {cam: 3x3}} once,
                                                            at the first stamp
=============================  ===========================  =============================================

Frame ``i`` is stamped ``start_ns + i * 1e9 / rate_hz`` (+ ``i_cam * camera_jitter_ns``). The TF tree is a
robot's: ``map -> base_link`` (ground-truth rig pose, one transform per distinct image stamp) and static
``base_link -> <cam>_optical_frame``, so a camera's pose is their composition. Bags of the older layout
(``map -> <cam>_optical_frame`` on ``/tf``, no ``/tf_static``) are still read.

Reading works on any rosbag2 folder (``metadata.yaml`` + db3/mcap files; the storage is taken from the
metadata); corrupt or truncated bags raise :class:`BagReadError` naming the bag.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from fast3dis_ros.geometry.rotations import matrix_from_quat_xyzw, quat_xyzw_from_matrix
from fast3dis_ros.data.image_codec import ImageDecodeError, decode_compressed, decode_raw, encode_raw, lookup_encoding, to_rgb

__all__ = [
    "BagReadError",
    "BagWriter",
    "StreamMessage",
    "GroundTruth",
    "write_scene_bag",
    "read_camera_streams",
    "read_ground_truth",
    "bag_topics",
    "decode_image",
    "image_dict",
    "camera_info_dict",
    "tf_message_dict",
    "make_pointcloud2",
    "get_typestore",
]

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
CAMERA_INFO = "sensor_msgs/msg/CameraInfo"
TF = "tf2_msgs/msg/TFMessage"
STRING = "std_msgs/msg/String"
GT_INSTANCES_TOPIC = "/fast3dis_gt/instances"
RIG_FRAME = "base_link"  # the rig frame of synthetic bags (static parent of the camera optical frames)

class BagReadError(RuntimeError):
    """A rosbag2 could not be read (missing, corrupt, truncated, or an undecodable message)."""


def get_typestore(distro: str = "kilted"):
    from rosbags.typesys import Stores, get_typestore as _get

    store = {"kilted": Stores.ROS2_KILTED, "jazzy": Stores.ROS2_JAZZY, "humble": Stores.ROS2_HUMBLE}.get(distro.lower())
    if store is None:
        raise ValueError(f"unknown ROS 2 distro {distro!r} (kilted, jazzy, humble)")
    return _get(store)


def _norm_type(msgtype: str) -> str:
    parts = msgtype.split("/")
    if len(parts) == 2:
        return f"{parts[0]}/msg/{parts[1]}"
    return msgtype


# ----------------------------------------------------------------------------------------------------
# Generic conversion: dicts / rclpy messages / rosbags messages -> rosbags message objects
# ----------------------------------------------------------------------------------------------------
_BASE_DTYPES = {
    "bool": np.bool_, "byte": np.uint8, "char": np.uint8, "octet": np.uint8, "uint8": np.uint8, "int8": np.int8,
    "uint16": np.uint16, "int16": np.int16, "uint32": np.uint32, "int32": np.int32, "uint64": np.uint64,
    "int64": np.int64, "float32": np.float32, "float64": np.float64,
}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _convert(ts, msgtype: str, obj: Any):
    """Build a rosbags message of ``msgtype`` from a dict, an rclpy message or a rosbags message."""
    msgtype = _norm_type(msgtype)
    cls = ts.types[msgtype]
    if isinstance(obj, cls):
        return obj
    if obj is None:
        obj = {}
    _, fields = ts.fielddefs[msgtype]
    kwargs = {}
    for name, (ntype, desc) in fields:
        val = _get(obj, name)
        kwargs[name] = _convert_field(ts, ntype.value if hasattr(ntype, "value") else int(ntype), desc, val)
    return cls(**kwargs)


def _convert_field(ts, ntype: int, desc, val):
    # Nodetype: BASE=1, NAME=2, ARRAY=3, SEQUENCE=4
    if ntype == 1:
        tname = desc[0]
        if tname == "string" or tname == "wstring":
            return "" if val is None else str(val)
        dt = _BASE_DTYPES[tname]
        if val is None:
            return False if tname == "bool" else dt(0).item()
        return bool(val) if tname == "bool" else np.asarray(val, dtype=dt).item()
    if ntype == 2:
        return _convert(ts, desc, val)
    (sub_ntype, sub_desc), length = desc
    sub_ntype = sub_ntype.value if hasattr(sub_ntype, "value") else int(sub_ntype)
    if sub_ntype == 1 and sub_desc[0] not in ("string", "wstring"):
        dt = _BASE_DTYPES[sub_desc[0]]
        if val is None:
            arr = np.zeros(length if ntype == 3 else 0, dtype=dt)
        elif isinstance(val, (bytes, bytearray, memoryview)):
            arr = np.frombuffer(bytes(val), dtype=np.uint8).astype(dt, copy=False)
        else:
            arr = np.ascontiguousarray(np.asarray(val, dtype=dt).ravel())
        if ntype == 3 and arr.size != length:
            raise ValueError(f"fixed array needs {length} values, got {arr.size}")
        return arr
    items = [] if val is None else list(val)
    if sub_ntype == 1:
        return [str(x) for x in items]
    return [_convert(ts, sub_desc, x) for x in items]


def _stamp(ns: int) -> dict:
    ns = int(ns)
    return {"sec": ns // 1_000_000_000, "nanosec": ns % 1_000_000_000}


def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def image_dict(arr: np.ndarray, encoding: str, frame_id: str, stamp_ns: int) -> dict:
    """sensor_msgs/Image as a dict (little endian, tightly packed rows; ``data`` is a view of a
    C-contiguous ``arr`` whose dtype already fits ``encoding``)."""
    buf, h, w, step = encode_raw(arr, encoding, ignore_case=True)
    return {
        "header": {"stamp": _stamp(stamp_ns), "frame_id": frame_id},
        "height": h, "width": w, "encoding": encoding, "is_bigendian": False,
        "step": step, "data": buf,
    }


def camera_info_dict(K: np.ndarray, width: int, height: int, frame_id: str, stamp_ns: int) -> dict:
    K = np.asarray(K, dtype=np.float64)
    P = np.zeros((3, 4))
    P[:, :3] = K
    return {
        "header": {"stamp": _stamp(stamp_ns), "frame_id": frame_id},
        "height": height, "width": width, "distortion_model": "plumb_bob", "d": np.zeros(5),
        "k": K.ravel(), "r": np.eye(3).ravel(), "p": P.ravel(),
    }


def _mat_to_transform(T: np.ndarray) -> dict:
    x, y, z, w = quat_xyzw_from_matrix(np.asarray(T)[:3, :3])
    t = np.asarray(T)[:3, 3]
    return {"translation": {"x": float(t[0]), "y": float(t[1]), "z": float(t[2])},
            "rotation": {"x": float(x), "y": float(y), "z": float(z), "w": float(w)}}


def tf_message_dict(transforms: Iterable[tuple[str, str, np.ndarray]], stamp_ns: int) -> dict:
    """TFMessage from (parent, child, T_parent_child) triples."""
    return {"transforms": [
        {"header": {"stamp": _stamp(stamp_ns), "frame_id": p}, "child_frame_id": c, "transform": _mat_to_transform(T)}
        for p, c, T in transforms
    ]}


def make_pointcloud2(points: np.ndarray, frame_id: str, stamp_ns: int) -> dict:
    """sensor_msgs/PointCloud2 dict from a numpy structured array (one field per PointField).

    Field dtypes map to PointField datatypes (int8..float64). ``rgb`` packed as float32 goes through as is.
    """
    codes = {np.dtype(np.int8): 1, np.dtype(np.uint8): 2, np.dtype(np.int16): 3, np.dtype(np.uint16): 4,
             np.dtype(np.int32): 5, np.dtype(np.uint32): 6, np.dtype(np.float32): 7, np.dtype(np.float64): 8}
    pts = np.ascontiguousarray(points)
    fields = []
    for name in pts.dtype.names:
        dt, off = pts.dtype.fields[name][:2]
        fields.append({"name": name, "offset": int(off), "datatype": codes[np.dtype(dt.base)], "count": 1})
    n = int(pts.shape[0])
    return {"header": {"stamp": _stamp(stamp_ns), "frame_id": frame_id}, "height": 1, "width": n, "fields": fields,
            "is_bigendian": False, "point_step": pts.dtype.itemsize, "row_step": pts.dtype.itemsize * n,
            "data": pts.view(np.uint8).reshape(-1), "is_dense": True}


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
class BagWriter:
    """Write arbitrary messages to a new rosbag2 (mcap or sqlite3) without ROS.

    ``write(topic, msgtype, msg, stamp_ns)`` takes a dict, a rosbags message or an rclpy message of
    ``msgtype`` (``pkg/msg/Type`` or ``pkg/Type``); the first use of a topic declares its connection.
    Custom types: :meth:`register_msg` with the ``.msg`` text first.
    """

    def __init__(self, path: str | Path, storage: str = "mcap", distro: str = "kilted", overwrite: bool = False):
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
        if self.path.exists():
            if not overwrite:
                raise FileExistsError(f"{self.path} exists (pass overwrite=True)")
            shutil.rmtree(self.path)
        plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}.get(storage)
        if plugin is None:
            raise ValueError(f"storage must be 'mcap' or 'sqlite3', not {storage!r}")
        self.storage = storage
        self.ts = get_typestore(distro)
        self._writer = Writer(self.path, version=9, storage_plugin=plugin)
        self._writer.open()
        self._conns: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def register_msg(self, msgtype: str, msg_text: str) -> None:
        from rosbags.typesys import get_types_from_msg

        self.ts.register(get_types_from_msg(msg_text, _norm_type(msgtype)))

    def write(self, topic: str, msgtype: str, msg: Any, stamp_ns: int) -> None:
        msgtype = _norm_type(msgtype)
        if msgtype not in self.ts.types:
            raise KeyError(f"unknown message type {msgtype!r}; register it with register_msg()")
        conn = self._conns.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=self.ts)
            self._conns[topic] = conn
        elif conn.msgtype != msgtype:
            raise ValueError(f"topic {topic} already carries {conn.msgtype}, not {msgtype}")
        data = self.ts.serialize_cdr(_convert(self.ts, msgtype, msg), msgtype)
        self._writer.write(conn, int(stamp_ns), data)
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "BagWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_scene_bag(scene, path: str | Path, storage: str = "mcap", rate_hz: float = 10.0,
                    start_ns: int = 1_700_000_000_000_000_000, camera_jitter_ns: int = 0,
                    ground_truth: bool = True, overwrite: bool = False, distro: str = "kilted") -> dict[str, int]:
    """Write a :class:`~fast3dis_ros.data.synthetic.SyntheticScene` as a rosbag2. Returns messages per topic."""
    period = int(round(1e9 / rate_hz))
    with BagWriter(path, storage=storage, distro=distro, overwrite=overwrite) as w:
        if ground_truth:
            payload = {"instances": [i.to_dict() for i in scene.instances], "cameras": list(scene.camera_names),
                       "T_rig_cam": {k: np.asarray(v).tolist() for k, v in scene.T_rig_cam.items()},
                       "K": {v.camera: np.asarray(v.K).tolist() for v in scene.frames[0]} if scene.frames else {},
                       "rate_hz": rate_hz, "start_ns": int(start_ns)}
            w.write(GT_INSTANCES_TOPIC, STRING, {"data": json.dumps(payload)}, start_ns)
        T_rig_cam = {c: np.asarray(T, np.float64) for c, T in scene.T_rig_cam.items()}
        w.write("/tf_static", TF, tf_message_dict([(RIG_FRAME, f"{c}_optical_frame", T_rig_cam[c])
                                                   for c in scene.camera_names], start_ns), start_ns)
        for fi, frame in enumerate(scene.frames):
            t_frame = int(start_ns) + fi * period
            tfs = {}
            for ci, v in enumerate(frame):
                stamp = t_frame + ci * int(camera_jitter_ns)
                fid = f"{v.camera}_optical_frame"
                h, wd = v.rgb.shape[:2]
                # CameraInfo before its image: a node fed live from this bag (fast3dis-play) then has K for the
                # first image too, as the offline replay has (it waits for the CameraInfo of the same stamp)
                w.write(f"/{v.camera}/camera_info", CAMERA_INFO, camera_info_dict(v.K, wd, h, fid, stamp), stamp)
                w.write(f"/{v.camera}/image_raw", IMAGE, image_dict(v.rgb, "rgb8", fid, stamp), stamp)
                if ground_truth:
                    w.write(f"/{v.camera}/depth_gt", IMAGE, image_dict(v.depth.astype(np.float32), "32FC1", fid, stamp), stamp)
                    w.write(f"/{v.camera}/instance_gt", IMAGE, image_dict(v.instance.astype(np.int32), "32SC1", fid, stamp), stamp)
                # the rig pose from this camera's GT pose (the same for every camera of the frame set)
                tfs.setdefault(stamp, np.asarray(v.T_world_cam, np.float64) @ np.linalg.inv(T_rig_cam[v.camera]))
            msg = {"transforms": [tf_message_dict([("map", RIG_FRAME, T)], s)["transforms"][0] for s, T in tfs.items()]}
            w.write("/tf", TF, msg, t_frame)
        return dict(w.counts)


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------
class StreamMessage(NamedTuple):
    """One decoded message. ``data``: image -> ndarray (RGB for colour encodings, 2D for 1-channel);
    camera info -> dict (width, height, K, D, P, distortion_model); tf -> list of dicts
    (parent, child, stamp_ns, T (4x4)); string -> str; bad_image / bad_message (``skip_bad`` only) ->
    the reason (str)."""

    topic: str
    stamp_ns: int  # header stamp where the message has one, else the bag's receive time
    data: Any
    kind: str  # image | camera_info | tf | string | bad_image | bad_message
    frame_id: str
    log_time_ns: int


def decode_image(msg) -> np.ndarray:
    """sensor_msgs/Image (rosbags or rclpy) -> numpy. Colour encodings come back RGB (alpha dropped),
    1-channel ones (H, W). Encoding names are matched case-insensitively; recorded data only needs to
    cover the last row's pixels (see ``image_codec.decode_raw(strict=False)``)."""
    try:
        enc, _, ch = lookup_encoding(str(msg.encoding), ignore_case=True)
        arr = decode_raw(enc, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data, strict=False)
        return to_rgb(arr, enc) if ch > 1 else arr
    except ImageDecodeError as e:
        raise BagReadError(str(e)) from e


def _decode_compressed(msg) -> np.ndarray:
    """CompressedImage -> numpy via OpenCV: colour RGB (alpha dropped), grey (H, W); any format
    OpenCV can decode."""
    try:
        return decode_compressed(str(msg.format), msg.data, check_format=False)
    except ImageDecodeError as e:
        raise BagReadError(str(e)) from e


def _camera_info(msg) -> dict:
    return {"width": int(msg.width), "height": int(msg.height), "K": np.asarray(msg.k, dtype=np.float64).reshape(3, 3),
            "D": np.asarray(msg.d, dtype=np.float64), "P": np.asarray(msg.p, dtype=np.float64).reshape(3, 4),
            "distortion_model": str(msg.distortion_model), "frame_id": str(msg.header.frame_id)}


def _tf_list(msg) -> list[dict]:
    """TFMessage -> [{parent, child, stamp_ns, T (4x4)}]; a non-unit rotation is normalised, a zero or
    non-finite one raises ValueError naming the transform."""
    out = []
    for t in msg.transforms:
        q, tr = t.transform.rotation, t.transform.translation
        T = np.eye(4)
        try:
            T[:3, :3] = matrix_from_quat_xyzw([q.x, q.y, q.z, q.w])
        except ValueError as e:
            raise ValueError(f"transform {t.header.frame_id} -> {t.child_frame_id}: {e} "
                             f"({q.x}, {q.y}, {q.z}, {q.w})") from e
        T[:3, 3] = [tr.x, tr.y, tr.z]
        out.append({"parent": str(t.header.frame_id), "child": str(t.child_frame_id),
                    "stamp_ns": _stamp_ns(t.header.stamp), "T": T})
    return out


def _bag_dir(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        p = p.parent
    if not p.exists():
        raise BagReadError(f"{path}: no such rosbag2")
    if not (p / "metadata.yaml").is_file():
        raise BagReadError(f"{p}: no metadata.yaml (not a rosbag2 folder; `ros2 bag reindex` can rebuild it)")
    return p


class _OpenBag:
    """Reader + typestore with the bag's own message definitions registered; errors -> BagReadError."""

    def __init__(self, path):
        from rosbags.rosbag2 import Reader

        self.path = _bag_dir(path)
        self.ts = get_typestore("kilted")
        try:
            self.reader = Reader(self.path)
            self.reader.open()
        except Exception as e:  # noqa: BLE001 - every library failure becomes one clear error
            raise BagReadError(f"{self.path}: cannot open rosbag2 ({type(e).__name__}: {e}); "
                               "the bag may be truncated or corrupt") from e
        for c in self.reader.connections:
            if c.msgtype not in self.ts.types and c.msgdef and c.msgdef.data:
                try:
                    from rosbags.typesys import get_types_from_msg

                    self.ts.register(get_types_from_msg(c.msgdef.data, c.msgtype))
                except Exception:  # noqa: BLE001 - unknown types are skipped unless asked for
                    pass

    def messages(self, connections, skip_bad: bool = False):
        """(conn, log_time, msg) in bag order. A message whose CDR cannot be deserialised raises
        BagReadError, or with ``skip_bad`` is yielded with ``msg`` = that BagReadError (the reader goes on).
        Failures of the reader itself (truncated / corrupt file) always raise."""
        try:
            for conn, t, raw in self.reader.messages(connections=connections):
                try:
                    msg = self.ts.deserialize_cdr(raw, conn.msgtype)
                except Exception as e:  # noqa: BLE001
                    err = BagReadError(f"{self.path}: cannot decode a {conn.msgtype} on {conn.topic} at {t} "
                                       f"({type(e).__name__}: {e}); the bag may be corrupt")
                    if not skip_bad:
                        raise err from e
                    msg = err
                yield conn, t, msg
        except BagReadError:
            raise
        except Exception as e:  # noqa: BLE001
            raise BagReadError(f"{self.path}: error while reading messages ({type(e).__name__}: {e}); "
                               "the bag may be truncated or corrupt") from e

    def close(self):
        try:
            self.reader.close()
        except Exception:  # noqa: BLE001
            pass


def bag_topics(path: str | Path) -> dict[str, tuple[str, int]]:
    """topic -> (msgtype, message count)."""
    b = _OpenBag(path)
    try:
        out: dict[str, tuple[str, int]] = {}
        for c in b.reader.connections:
            t, n = out.get(c.topic, (c.msgtype, 0))
            out[c.topic] = (t, n + int(c.msgcount))
        return out
    finally:
        b.close()


def _decode(conn, t, msg) -> StreamMessage | None:
    mt = conn.msgtype
    if mt == IMAGE:
        return StreamMessage(conn.topic, _stamp_ns(msg.header.stamp), decode_image(msg), "image", str(msg.header.frame_id), t)
    if mt == COMPRESSED:
        return StreamMessage(conn.topic, _stamp_ns(msg.header.stamp), _decode_compressed(msg), "image", str(msg.header.frame_id), t)
    if mt == CAMERA_INFO:
        info = _camera_info(msg)
        return StreamMessage(conn.topic, _stamp_ns(msg.header.stamp), info, "camera_info", info["frame_id"], t)
    if mt == TF:
        tfs = _tf_list(msg)
        return StreamMessage(conn.topic, tfs[0]["stamp_ns"] if tfs else t, tfs, "tf", tfs[0]["parent"] if tfs else "", t)
    if mt == STRING:
        return StreamMessage(conn.topic, t, str(msg.data), "string", "", t)
    return None


def read_camera_streams(path: str | Path, cameras: Iterable[str] | None = None, topics: Iterable[str] | None = None,
                        include_tf: bool = True, skip_bad: bool = False) -> Iterator[StreamMessage]:
    """Iterate decoded camera messages of a rosbag2 (mcap or sqlite3), in bag order.

    ``cameras``: names -> ``/<cam>/image_raw``, ``/<cam>/image_raw/compressed``, ``/<cam>/camera_info``;
    ``topics``: explicit topic names (Image, CompressedImage, CameraInfo, TFMessage or String);
    neither: every Image / CompressedImage / CameraInfo topic. ``/tf`` and ``/tf_static`` are added when
    ``include_tf``.

    A single message that cannot be decoded (corrupt CDR, unsupported encoding, short image buffer, bad
    jpeg/png) raises :class:`BagReadError`; with ``skip_bad`` it is yielded instead as
    ``StreamMessage(kind="bad_image"`` (Image/CompressedImage topics) or ``"bad_message"`` (others),
    ``data`` = the reason, ``stamp_ns`` = the bag's receive time) and reading goes on, so that callers
    can count it as a dropped frame. A bag that cannot be opened or read on (truncated, corrupt file)
    raises in both modes.
    """
    b = _OpenBag(path)
    try:
        conns = b.reader.connections
        if topics is not None:
            want = set(topics)
        elif cameras is not None:
            want = set()
            for c in cameras:
                c = c.strip("/")
                want |= {f"/{c}/image_raw", f"/{c}/image_raw/compressed", f"/{c}/camera_info"}
        else:
            want = {c.topic for c in conns if c.msgtype in (IMAGE, COMPRESSED, CAMERA_INFO)
                    and not c.topic.endswith(("/depth_gt", "/instance_gt"))}
        if include_tf:
            want |= {"/tf", "/tf_static"}
        sel = [c for c in conns if c.topic in want]
        if topics is not None:
            missing = set(topics) - {c.topic for c in conns}
            if missing:
                raise BagReadError(f"{b.path}: topics not in bag: {sorted(missing)}")
        for conn, t, msg in b.messages(sel, skip_bad=skip_bad):
            if isinstance(msg, BagReadError):  # skip_bad: undecodable CDR
                yield _bad(conn, t, str(msg))
                continue
            try:
                item = _decode(conn, t, msg)
            except Exception as e:  # noqa: BLE001 - one bad message: a clear error, or counted with skip_bad
                reason = f"{b.path}: cannot decode a {conn.msgtype} on {conn.topic} at {t} ({type(e).__name__}: {e})"
                if not skip_bad:
                    raise BagReadError(reason) from e
                yield _bad(conn, t, reason)
                continue
            if item is not None:
                yield item
    finally:
        b.close()


def _bad(conn, t: int, reason: str) -> StreamMessage:
    kind = "bad_image" if conn.msgtype in (IMAGE, COMPRESSED) else "bad_message"
    return StreamMessage(conn.topic, int(t), reason, kind, "", int(t))


@dataclass
class GroundTruth:
    """Ground truth of a bag written by :func:`write_scene_bag` (or any bag with the same topics, namespaced
    or not: cameras are named by ``data/camera_identity.py``)."""

    instances: list[dict] | None = None
    meta: dict = field(default_factory=dict)  # the rest of the /fast3dis_gt/instances JSON
    depth: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # cam -> stamp -> (H,W) float32
    instance: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # cam -> stamp -> (H,W) int32
    K: dict[str, np.ndarray] = field(default_factory=dict)  # cam -> (3,3): last CameraInfo, else the GT JSON
    K_source: dict[str, str] = field(default_factory=dict)  # cam -> "camera_info" | "gt_json"
    T_world_cam: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # cam -> stamp -> (4,4) from /tf
    unmatched: list[str] = field(default_factory=list)  # GT topics / TF child frames that match no camera

    @property
    def cameras(self) -> list[str]:
        return sorted(set(self.depth) | set(self.instance) | set(self.T_world_cam))


def _json_K(value) -> np.ndarray | None:
    """A K from the GT JSON: 3x3 nested list, 9 numbers, or {fx, fy, cx, cy}; None if unusable."""
    try:
        if isinstance(value, dict):
            K = np.array([[value["fx"], 0, value["cx"]], [0, value["fy"], value["cy"]], [0, 0, 1]], np.float64)
        else:
            K = np.asarray(value, np.float64).reshape(3, 3)
    except (KeyError, TypeError, ValueError):
        return None
    return K if np.isfinite(K).all() and K[0, 0] > 0 and K[1, 1] > 0 else None


def read_ground_truth(path: str | Path, world_frame: str = "map", identity=None) -> GroundTruth:
    """Depth / instance maps per camera and stamp, the instance list, K and ground-truth poses.

    Cameras are named through ``identity`` (a ``data.camera_identity.CameraIdentity``; default: the cameras
    discovered from the bag's image streams), the same mapping the replay uses: GT topics by their stream
    (``/robot/front/depth_gt`` -> ``front``), poses by the TF frame of the camera (``front_optical_frame``,
    or a frame seen in a header of that camera), composed through ``/tf`` + ``/tf_static`` to
    ``world_frame`` at every GT stamp (``map -> base_link -> front_optical_frame`` or a direct
    ``map -> front_optical_frame``). K: the camera's CameraInfo, else the GT JSON's ``"K"``
    (``{camera: 3x3 | 9 values | {fx, fy, cx, cy}}``). What matches no camera is listed in ``unmatched``."""
    from fast3dis_ros.geometry.tf_tree import TransformLookupError, TransformTree
    from .camera_identity import CameraIdentity, plan_streams

    gt = GroundTruth()
    tree = TransformTree()
    stamps: dict[str, set[int]] = {}  # cam -> image stamps (poses are composed at them)
    b = _OpenBag(path)
    try:
        if identity is None:
            topics = {c.topic: c.msgtype for c in b.reader.connections}
            try:
                identity = plan_streams(topics, CameraIdentity()).identity
            except ValueError as e:
                raise BagReadError(f"{b.path}: {e}") from e
        sel = [c for c in b.reader.connections if c.topic == GT_INSTANCES_TOPIC or c.topic in ("/tf", "/tf_static")
               or c.topic.endswith(("/depth_gt", "/instance_gt")) or c.msgtype == CAMERA_INFO]
        for conn, t, msg in b.messages(sel):
            if conn.topic == GT_INSTANCES_TOPIC:
                d = json.loads(msg.data)
                if isinstance(d, list):
                    gt.instances = d
                else:
                    gt.instances = d.get("instances")
                    gt.meta = {k: v for k, v in d.items() if k != "instances"}
            elif conn.msgtype == TF:
                for tf in _tf_list(msg):
                    tree.add(tf["parent"], tf["child"], tf["T"], tf["stamp_ns"], static=conn.topic == "/tf_static")
            else:
                cam = identity.camera_of_topic(conn.topic)
                if cam is None:
                    if conn.topic not in gt.unmatched:
                        gt.unmatched.append(conn.topic)
                    continue
                identity.learn_frame(str(msg.header.frame_id), cam)
                stamp = _stamp_ns(msg.header.stamp)
                stamps.setdefault(cam, set()).add(stamp)
                if conn.topic.endswith("/depth_gt"):
                    gt.depth.setdefault(cam, {})[stamp] = decode_image(msg).astype(np.float32, copy=False)
                elif conn.topic.endswith("/instance_gt"):
                    gt.instance.setdefault(cam, {})[stamp] = decode_image(msg).astype(np.int32, copy=False)
                elif conn.msgtype == CAMERA_INFO:
                    gt.K[cam] = np.asarray(msg.k, dtype=np.float64).reshape(3, 3)
                    gt.K_source[cam] = "camera_info"
    finally:
        b.close()
    parents = {tree._edges[f].parent for f in tree.frames if f in tree._edges}
    cam_frame: dict[str, str] = {}  # camera -> its frame: a header frame_id, else *_optical_frame, else any
    rank = lambda f: (f in identity.frames, f.endswith("_optical_frame"))  # noqa: E731
    for fid in sorted(tree.frames - {world_frame}):
        cam = identity.camera_of_frame(fid)
        if cam is None or cam not in stamps:
            if fid not in parents:  # a leaf frame that is no camera's: say so (inner frames like base_link are not)
                gt.unmatched.append(f"tf {world_frame} -> {fid}")
        elif cam not in cam_frame or rank(fid) > rank(cam_frame[cam]):
            cam_frame[cam] = fid
    for cam, fid in cam_frame.items():  # world <- camera frame at every GT stamp (direct or via the rig)
        for st in sorted(stamps[cam]):
            try:
                gt.T_world_cam.setdefault(cam, {})[st] = tree.lookup(world_frame, fid, st, tolerance_ns=0)
            except TransformLookupError:
                pass
    for key, value in (gt.meta.get("K") or {}).items():
        cam = key if identity.cameras is None or key in identity.cameras else identity.camera_of_topic(f"/{key}")
        K = _json_K(value)
        if cam is not None and K is not None and cam not in gt.K:
            gt.K[cam] = K
            gt.K_source[cam] = "gt_json"
    return gt
