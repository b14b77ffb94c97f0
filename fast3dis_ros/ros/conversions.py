"""ROS message <-> numpy conversions (no per-pixel or per-point Python loops).

- ``image_to_numpy`` / ``numpy_to_image``: sensor_msgs/Image for rgb8, bgr8, rgba8, bgra8, mono8,
  mono16, 16UC1 and 32FC1, honouring ``step`` (row padding) and ``is_bigendian``.
  ``image_to_rgb`` gives the pipeline's HxWx3 uint8 RGB.
- ``compressed_to_rgb``: sensor_msgs/CompressedImage (jpeg/png) via OpenCV.
- ``camera_info_to_K``: CameraInfo -> 3x3 K, or None with a reason.
- ``cloud_to_pointcloud2`` / ``pointcloud2_to_structured``: PointCloud2 with the fields of
  ``fast3dis_ros.geometry.clouds.POINT_FIELDS`` (x y z rgb instance score).
- ``instances_to_msg`` / ``instances_to_markers``: fast3dis_msgs/InstanceArray and MarkerArray.

Image decoding/encoding is ``fast3dis_ros.data.image_codec`` (shared with ``data/bags.py``); marker
contents are ``fast3dis_ros.pipeline.markers.instance_markers`` (shared with ``eval/output_bag.py``).

Problems with an input raise ``ImageConversionError`` (a ``ValueError``; the same class as
``image_codec.ImageDecodeError``) whose message says what is wrong; the node logs it (throttled) and
counts it in diagnostics.
"""

from __future__ import annotations

import array

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import Header

from fast3dis_ros.data.image_codec import ENCODINGS as _CODEC_ENCODINGS
from fast3dis_ros.data.image_codec import ImageDecodeError, decode_compressed, decode_raw, encode_raw, to_rgb
from fast3dis_ros.core.frames import InstanceCloud, InstanceSummary
from fast3dis_ros.pipeline.markers import instance_color, instance_markers  # noqa: F401 - instance_color re-exported

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


# One exception class for every image problem, shared with data/bags.py through data/image_codec.py
# (an alias, so ``except ImageConversionError`` and ``e.kind`` work as before).
ImageConversionError = ImageDecodeError

# encoding -> (numpy base dtype, channels): the subset of image_codec.ENCODINGS the node accepts
ENCODINGS: dict[str, tuple[str, int]] = {
    k: _CODEC_ENCODINGS[k]
    for k in ("rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1", "8UC3", "mono16", "16UC1", "32FC1")
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
    return decode_raw(msg.encoding, msg.height, msg.width, msg.step, msg.is_bigendian, msg.data,
                      encodings=ENCODINGS, strict=True)


def image_to_rgb(msg: Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB for the pipeline (mono is replicated, alpha dropped, BGR swapped)."""
    return to_rgb(image_to_numpy(msg), msg.encoding)


def numpy_to_image(arr: np.ndarray, encoding: str, header: Header | None = None, step: int | None = None,
                   is_bigendian: bool = False) -> Image:
    """Image message from an array in ``encoding``'s channel order; ``step`` > row size pads rows
    (used by tests); multi-byte encodings are written in the requested byte order."""
    buf, h, w, step = encode_raw(arr, encoding, step=step, is_bigendian=is_bigendian, encodings=ENCODINGS)
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width, msg.encoding, msg.step = h, w, encoding, step
    msg.is_bigendian = 1 if is_bigendian else 0
    _set_uint8_data(msg, _u8_array(buf))
    return msg


def compressed_to_rgb(msg: CompressedImage) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a jpeg/png CompressedImage (image_transport 'compressed' format)."""
    img = decode_compressed(msg.format, msg.data, check_format=True, uint8_only=True)
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img


# ------------------------------------------------------------------------------------- CameraInfo
def camera_info_to_K(msg, image_size: tuple[int, int] | None = None,
                     max_distortion_px: float = 2.0) -> tuple[np.ndarray | None, str]:
    """3x3 float64 K from CameraInfo, or ``(None, reason)`` when it is unusable.

    ``image_size`` = (width, height) of the images actually received; when CameraInfo was written
    for another resolution of the same aspect K is scaled to it (and the reason says so); a CameraInfo
    without a size (0x0) or of another aspect is refused. The scaled K must be plausible for the image
    and the distortion small (``geometry/calibration.py``: images are not undistorted).
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
    if image_size is None:
        return K, reason
    from fast3dis_ros.geometry.calibration import check_intrinsics, distortion_shift_px

    w, h = image_size
    if msg.width <= 0 or msg.height <= 0:
        return None, f"CameraInfo size is {msg.width}x{msg.height}: K cannot be checked against the {w}x{h} image"
    if (w, h) != (msg.width, msg.height):
        sx, sy = w / msg.width, h / msg.height
        if abs(sx - sy) > 0.01 * max(sx, sy):
            return None, f"CameraInfo is for {msg.width}x{msg.height}, images are {w}x{h} (another aspect ratio)"
        K[0] *= sx
        K[1] *= sy
        reason = f"K scaled from {msg.width}x{msg.height} to {w}x{h}"
    why = check_intrinsics(K, w, h)
    if why:
        return None, why
    model = str(getattr(msg, "distortion_model", "") or "")
    shift = distortion_shift_px(model, getattr(msg, "d", []), K, w, h)
    if shift is None:
        return None, f"distortion model '{model}' is not supported (images are not undistorted): K refused"
    if shift > max_distortion_px:
        return None, (f"'{model}' distortion moves the image border by up to {shift:.1f} px > {max_distortion_px:g} "
                      "(images are not undistorted): K refused")
    if shift > 0:
        reason = (reason + "; " if reason else "") + f"'{model}' distortion <= {shift:.2f} px ignored"
    return K, reason


# ------------------------------------------------------------------------------------- PointCloud2
_PF_NP = {
    PointField.INT8: "i1", PointField.UINT8: "u1", PointField.INT16: "i2", PointField.UINT16: "u2",
    PointField.INT32: "i4", PointField.UINT32: "u4", PointField.FLOAT32: "f4", PointField.FLOAT64: "f8",
}


def _point_fields() -> tuple[list[PointField], int]:
    from fast3dis_ros.geometry.clouds import POINT_FIELDS, POINT_STEP

    return [PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in POINT_FIELDS], POINT_STEP


def cloud_to_pointcloud2(cloud: InstanceCloud, frame_id: str | None = None, stamp_ns: int | None = None
                         ) -> PointCloud2:
    """PointCloud2 (height 1, x y z rgb instance score, little endian) from an InstanceCloud.

    ``data`` is the structured array's buffer copied once into the message (1M points: a few ms).
    """
    from fast3dis_ros.geometry.clouds import pointcloud_structured

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
    """MarkerArray: DELETEALL, then per instance a CUBE (its box) and a TEXT_VIEW_FACING id label
    (the description is ``pipeline.markers.instance_markers``, shared with the output bags)."""
    from visualization_msgs.msg import Marker, MarkerArray

    stamp = ns_to_stamp(stamp_ns)
    out = MarkerArray()
    for d in instance_markers(instances, ns=ns, min_size=min_size, text_height=text_height):
        m = Marker()
        m.header.frame_id = frame_id
        m.header.stamp = stamp
        m.ns, m.id, m.type, m.action, m.text = d["ns"], d["id"], d["type"], d["action"], d["text"]
        m.pose.position.x, m.pose.position.y, m.pose.position.z = d["position"]
        q = m.pose.orientation
        q.x, q.y, q.z, q.w = d["orientation"]
        m.scale.x, m.scale.y, m.scale.z = d["scale"]
        m.color.r, m.color.g, m.color.b, m.color.a = d["color"]
        out.markers.append(m)
    return out
