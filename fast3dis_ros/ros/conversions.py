"""ROS message <-> numpy conversions (no per-pixel or per-point Python loops).

- ``image_to_numpy`` / ``numpy_to_image``: sensor_msgs/Image for rgb8, bgr8, rgba8, bgra8, mono8,
  mono16, 16UC1 and 32FC1, honouring ``step`` (row padding) and ``is_bigendian``.
  ``image_to_rgb`` gives the pipeline's HxWx3 uint8 RGB.
- ``compressed_to_rgb``: sensor_msgs/CompressedImage (jpeg/png) via OpenCV.
- ``camera_info_to_K``: CameraInfo -> 3x3 K, or None with a reason.
- ``cloud_to_pointcloud2`` / ``pointcloud2_to_structured``: PointCloud2 with the fields of
  ``fast3dis_ros.geometry.clouds.POINT_FIELDS`` (x y z rgb instance score).
- ``instances_to_msg`` / ``instances_to_markers``: fast3dis_msgs/InstanceArray and MarkerArray.

Problems with an input raise ``ImageConversionError`` (a ``ValueError``) whose message says what is
wrong; the node logs it (throttled) and counts it in diagnostics.
"""

from __future__ import annotations

import array
import colorsys
import math

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import Header

from ..pipeline.frames import InstanceCloud, InstanceSummary

__all__ = [
    "ImageConversionError",
    "ENCODINGS",
    "stamp_to_ns",
    "ns_to_stamp",
    "image_to_numpy",
    "image_to_rgb",
    "numpy_to_image",
    "compressed_to_rgb",
    "camera_info_to_K",
    "cloud_to_pointcloud2",
    "pointcloud2_to_structured",
    "instance_color",
    "instances_to_msg",
    "instances_to_markers",
]


class ImageConversionError(ValueError):
    """An Image/CompressedImage message that cannot be converted (reason in the text; ``kind`` is a
    short tag: encoding, size, step, decode, format, empty; used to throttle logs and count)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


# encoding -> (numpy base dtype, channels)
ENCODINGS: dict[str, tuple[str, int]] = {
    "rgb8": ("u1", 3),
    "bgr8": ("u1", 3),
    "rgba8": ("u1", 4),
    "bgra8": ("u1", 4),
    "mono8": ("u1", 1),
    "8UC1": ("u1", 1),
    "8UC3": ("u1", 3),
    "mono16": ("u2", 1),
    "16UC1": ("u2", 1),
    "32FC1": ("f4", 1),
}

# ----------------------------------------------------------------------------------------- stamps
def stamp_to_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    ns = int(ns)
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _u8_array(buf: np.ndarray) -> array.array:
    """array('B') from a contiguous numpy array with one memcpy (the generated message setters
    accept array('B') as is; any other sequence is checked element by element, which is slow)."""
    a = array.array("B")
    a.frombytes(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    return a


# ----------------------------------------------------------------------------------------- Image
def image_to_numpy(msg: Image) -> np.ndarray:
    """(H, W) or (H, W, C) array in the message's own channel order, native byte order.

    Row padding (``step`` > width * pixel size) is skipped without copying the padding; the result
    is a view on a private copy of the data (safe to keep after the message is gone).
    """
    enc = msg.encoding
    if enc not in ENCODINGS:
        raise ImageConversionError(
            f"unsupported image encoding '{enc}' (supported: {', '.join(ENCODINGS)})", kind="encoding"
        )
    base, ch = ENCODINGS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ImageConversionError(f"empty image ({w}x{h})", kind="empty")
    itemsize = np.dtype(base).itemsize
    row = w * ch * itemsize
    if step < row:
        raise ImageConversionError(
            f"step {step} is smaller than width*pixel size {w}*{ch * itemsize}={row} for {enc}", kind="step"
        )
    if step % itemsize:
        raise ImageConversionError(f"step {step} is not a multiple of the {enc} item size {itemsize}", kind="step")
    n = len(msg.data)
    if n != step * h:
        raise ImageConversionError(f"data has {n} bytes, expected step*height = {step}*{h} = {step * h}", kind="size")
    dt = np.dtype(base).newbyteorder(">" if msg.is_bigendian else "<") if itemsize > 1 else np.dtype(base)
    raw = np.frombuffer(msg.data, np.uint8).copy()
    rows = raw.reshape(h, step)[:, :row]
    arr = np.ascontiguousarray(rows).view(dt).reshape(h, w, ch) if ch > 1 else np.ascontiguousarray(rows).view(dt).reshape(h, w)
    if itemsize > 1 and not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))
    return arr


def image_to_rgb(msg: Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB for the pipeline (mono is replicated, alpha dropped, BGR swapped)."""
    arr = image_to_numpy(msg)
    enc = msg.encoding
    if enc in ("rgb8", "8UC3"):
        return arr
    if enc == "bgr8":
        return np.ascontiguousarray(arr[..., ::-1])
    if enc == "rgba8":
        return np.ascontiguousarray(arr[..., :3])
    if enc == "bgra8":
        return np.ascontiguousarray(arr[..., 2::-1])
    if enc in ("mono8", "8UC1"):
        return np.repeat(arr[..., None], 3, axis=2)
    raise ImageConversionError(f"encoding '{enc}' is not a colour image (depth/16-bit cannot feed the network)", kind="encoding")


def numpy_to_image(arr: np.ndarray, encoding: str, header: Header | None = None, step: int | None = None,
                   is_bigendian: bool = False) -> Image:
    """Image message from an array in ``encoding``'s channel order; ``step`` > row size pads rows
    (used by tests); multi-byte encodings are written in the requested byte order."""
    if encoding not in ENCODINGS:
        raise ImageConversionError(f"unsupported image encoding '{encoding}'", kind="encoding")
    base, ch = ENCODINGS[encoding]
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] != ch:
        raise ImageConversionError(f"array of shape {np.shape(arr)} does not fit {encoding} ({ch} channel(s))", kind="size")
    h, w = a.shape[:2]
    dt = np.dtype(base).newbyteorder(">" if is_bigendian else "<")
    a = np.ascontiguousarray(a.astype(dt, copy=False))
    row = w * ch * dt.itemsize
    step = row if step is None else int(step)
    if step < row:
        raise ImageConversionError(f"step {step} < row size {row}", kind="step")
    if step > row:
        buf = np.zeros((h, step), np.uint8)
        buf[:, :row] = a.view(np.uint8).reshape(h, row)
    else:
        buf = a.view(np.uint8)
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width, msg.encoding, msg.step = h, w, encoding, step
    msg.is_bigendian = 1 if is_bigendian else 0
    _set_uint8_data(msg, _u8_array(buf))
    return msg


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a jpeg/png CompressedImage (image_transport 'compressed' format)."""
    fmt = (msg.format or "").lower()
    if "compresseddepth" in fmt:
        raise ImageConversionError(f"compressedDepth images are not supported (format '{msg.format}')", kind="format")
    if fmt and not any(k in fmt for k in ("jpeg", "jpg", "png")):
        raise ImageConversionError(f"unsupported CompressedImage format '{msg.format}' (jpeg or png expected)", kind="format")
    if len(msg.data) == 0:
        raise ImageConversionError("CompressedImage has no data", kind="empty")
    import cv2  # lazy: only needed when compressed input is enabled

    buf = np.frombuffer(msg.data, np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageConversionError(f"OpenCV could not decode the CompressedImage ({len(buf)} bytes, format '{msg.format}')", kind="decode")
    if img.dtype != np.uint8:
        raise ImageConversionError(f"decoded image has dtype {img.dtype}, 8-bit colour expected", kind="decode")
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# ------------------------------------------------------------------------------------- CameraInfo
def camera_info_to_K(msg, image_size: tuple[int, int] | None = None) -> tuple[np.ndarray | None, str]:
    """3x3 float64 K from CameraInfo, or ``(None, reason)`` when it is unusable.

    ``image_size`` = (width, height) of the images actually received; when CameraInfo was written
    for another resolution K is scaled to it (and the reason says so).
    """
    k = np.asarray(msg.k, np.float64)
    if k.size != 9:
        return None, f"CameraInfo.k has {k.size} values, 9 expected"
    if not np.all(np.isfinite(k)):
        return None, "CameraInfo.k has non-finite values"
    K = k.reshape(3, 3).copy()
    if not np.any(K):
        return None, "CameraInfo.k is all zeros (uncalibrated camera)"
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        return None, f"CameraInfo.k has non-positive focal length (fx={K[0, 0]}, fy={K[1, 1]})"
    if abs(K[2, 2] - 1.0) > 1e-6 or abs(K[2, 0]) > 1e-9 or abs(K[2, 1]) > 1e-9:
        return None, f"CameraInfo.k last row is {K[2].tolist()}, [0, 0, 1] expected"
    reason = ""
    if image_size is not None and msg.width > 0 and msg.height > 0:
        w, h = image_size
        if (w, h) != (msg.width, msg.height):
            sx, sy = w / msg.width, h / msg.height
            K[0] *= sx
            K[1] *= sy
            reason = f"K scaled from {msg.width}x{msg.height} to {w}x{h}"
    return K, reason


# ------------------------------------------------------------------------------------- PointCloud2
_PF_NP = {
    PointField.INT8: "i1", PointField.UINT8: "u1", PointField.INT16: "i2", PointField.UINT16: "u2",
    PointField.INT32: "i4", PointField.UINT32: "u4", PointField.FLOAT32: "f4", PointField.FLOAT64: "f8",
}


def _point_fields() -> tuple[list[PointField], int]:
    from ..geometry.clouds import POINT_FIELDS, POINT_STEP

    return [PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in POINT_FIELDS], POINT_STEP


def cloud_to_pointcloud2(cloud: InstanceCloud, frame_id: str | None = None, stamp_ns: int | None = None
                         ) -> PointCloud2:
    """PointCloud2 (height 1, x y z rgb instance score, little endian) from an InstanceCloud.

    ``data`` is the structured array's buffer copied once into the message (1M points: a few ms).
    """
    from ..geometry.clouds import pointcloud_structured

    arr = pointcloud_structured(cloud)
    fields, step = _point_fields()
    if arr.dtype.itemsize != step:
        raise ValueError(f"pointcloud_structured itemsize {arr.dtype.itemsize} != POINT_STEP {step}")
    n = int(arr.shape[0])
    msg = PointCloud2()
    msg.header.frame_id = frame_id if frame_id is not None else cloud.frame_id
    msg.header.stamp = ns_to_stamp(cloud.stamp_ns if stamp_ns is None else stamp_ns)
    msg.height = 1
    msg.width = n
    msg.fields = fields
    msg.is_bigendian = False
    msg.point_step = step
    msg.row_step = step * n
    msg.is_dense = bool(n == 0 or np.isfinite(cloud.xyz).all())
    _set_uint8_data(msg, _u8_array(arr))
    return msg


def _set_uint8_data(msg, data: array.array) -> None:
    """Put an array('B') into a message's ``uint8[] data`` without a second copy.

    The rosidl-generated setter keeps an array('B') as is only when field checks are on; with checks
    off (the default in these wheels) it runs ``array.array('B', value)``, a full copy (~13 ms for a
    1M-point cloud). ``_data`` is the generated slot behind the property in rosidl_generator_py.
    """
    if isinstance(data, array.array) and data.typecode == "B" and hasattr(msg, "_data"):
        msg._data = data
    else:  # pragma: no cover - other message implementations
        msg.data = data


def pointcloud2_to_structured(msg: PointCloud2) -> np.ndarray:
    """(height*width,) structured array with one field per PointField (count 1 fields only)."""
    names, formats, offsets = [], [], []
    order = ">" if msg.is_bigendian else "<"
    for f in msg.fields:
        if f.datatype not in _PF_NP:
            raise ValueError(f"PointField '{f.name}' has unknown datatype {f.datatype}")
        names.append(f.name)
        formats.append((order + _PF_NP[f.datatype]) if f.count == 1 else (order + _PF_NP[f.datatype], (f.count,)))
        offsets.append(f.offset)
    dt = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": msg.point_step})
    n = msg.width * msg.height
    raw = np.frombuffer(msg.data, np.uint8)
    if msg.height > 1 and msg.row_step != msg.width * msg.point_step:
        raw = raw.reshape(msg.height, msg.row_step)[:, : msg.width * msg.point_step].copy()
    if raw.size < n * msg.point_step:
        raise ValueError(f"PointCloud2 data has {raw.size} bytes, {n}*{msg.point_step} expected")
    return raw[: n * msg.point_step].view(dt).reshape(n)


# ---------------------------------------------------------------------------- instances / markers
def instance_color(instance_id: int) -> tuple[float, float, float]:
    """Stable, well separated RGB in [0, 1] for an instance id (golden-ratio hue walk)."""
    h = (int(instance_id) * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(h, 0.75, 0.95)


def instances_to_msg(instances: list[InstanceSummary], frame_id: str, stamp_ns: int):
    """fast3dis_msgs/InstanceArray."""
    from fast3dis_msgs.msg import Instance, InstanceArray

    out = InstanceArray()
    out.header.frame_id = frame_id
    out.header.stamp = ns_to_stamp(stamp_ns)
    for s in instances:
        m = Instance()
        m.id = int(s.id)
        m.score = float(s.score)
        c, lo, hi = (np.asarray(v, np.float64).reshape(3) for v in (s.centroid, s.bbox_min, s.bbox_max))
        m.centroid.x, m.centroid.y, m.centroid.z = (float(v) for v in c)
        m.bbox_min.x, m.bbox_min.y, m.bbox_min.z = (float(v) for v in lo)
        m.bbox_max.x, m.bbox_max.y, m.bbox_max.z = (float(v) for v in hi)
        m.num_points = int(s.n_points)
        m.views_seen = int(s.views_seen)
        out.instances.append(m)
    return out


def instances_to_markers(instances: list[InstanceSummary], frame_id: str, stamp_ns: int,
                         ns: str = "fast3dis", min_size: float = 1e-3, text_height: float = 0.1):
    """MarkerArray: DELETEALL, then per instance a CUBE (its box) and a TEXT_VIEW_FACING id label."""
    from visualization_msgs.msg import Marker, MarkerArray

    stamp = ns_to_stamp(stamp_ns)
    out = MarkerArray()
    clear = Marker()
    clear.header.frame_id = frame_id
    clear.header.stamp = stamp
    clear.ns = ns
    clear.action = Marker.DELETEALL
    out.markers.append(clear)
    for s in instances:
        lo = np.asarray(s.bbox_min, np.float64).reshape(3)
        hi = np.asarray(s.bbox_max, np.float64).reshape(3)
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            continue
        r, g, b = instance_color(s.id)
        center = (lo + hi) / 2.0
        size = np.maximum(hi - lo, min_size)
        box = Marker()
        box.header.frame_id = frame_id
        box.header.stamp = stamp
        box.ns = ns + "/boxes"
        box.id = int(s.id)
        box.type = Marker.CUBE
        box.action = Marker.ADD
        box.pose.position.x, box.pose.position.y, box.pose.position.z = (float(v) for v in center)
        box.pose.orientation.w = 1.0
        box.scale.x, box.scale.y, box.scale.z = (float(v) for v in size)
        box.color.r, box.color.g, box.color.b, box.color.a = float(r), float(g), float(b), 0.35
        out.markers.append(box)
        text = Marker()
        text.header.frame_id = frame_id
        text.header.stamp = stamp
        text.ns = ns + "/labels"
        text.id = int(s.id)
        text.type = Marker.TEXT_VIEW_FACING
        text.action = Marker.ADD
        text.pose.position.x, text.pose.position.y = float(center[0]), float(center[1])
        text.pose.position.z = float(hi[2] + text_height)
        text.pose.orientation.w = 1.0
        text.scale.z = float(text_height)
        text.color.r, text.color.g, text.color.b, text.color.a = float(r), float(g), float(b), 1.0
        score = float(s.score)
        text.text = f"{int(s.id)} ({score:.2f})" if math.isfinite(score) else str(int(s.id))
        out.markers.append(text)
    return out
