"""Raw and compressed image decoding/encoding on plain fields, without ROS (no rclpy, no rosbags).

One implementation behind both message flavours:

- ``ros/conversions.py``: rclpy ``sensor_msgs/Image`` / ``CompressedImage`` (live node);
- ``data/bags.py``: rosbags messages read from / written to rosbag2 files (replay, eval).

Functions work on the fields of ``sensor_msgs/Image`` (encoding, height, width, step, is_bigendian,
data) and ``sensor_msgs/CompressedImage`` (format, data); ``data`` may be ``bytes``, ``bytearray``,
``array.array('B')``, ``memoryview`` or a 1-D numpy array. No per-pixel Python loops: one copy of the
pixel rows (row padding skipped), a byte swap in place for big-endian data, then views.

Problems raise :class:`ImageDecodeError` (a ``ValueError``) whose ``kind`` is a short tag (encoding,
size, step, empty, decode, format) used by the node to throttle logs and count rejects.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ImageDecodeError",
    "ENCODINGS",
    "COLOUR_ENCODINGS",
    "lookup_encoding",
    "decode_raw",
    "to_rgb",
    "decode_compressed",
    "encode_raw",
]


class ImageDecodeError(ValueError):
    """An image that cannot be decoded / encoded (reason in the text; ``kind`` is a short tag:
    encoding, size, step, empty, decode, format)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


# ROS encoding name -> (numpy base dtype, channels). Callers may pass a subset (``encodings=``).
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
    "32SC1": ("i4", 1),
    "64FC1": ("f8", 1),
}

# encodings that can become the pipeline's HxWx3 uint8 RGB
COLOUR_ENCODINGS = frozenset({"rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1", "8UC3"})


def lookup_encoding(encoding: str, encodings: dict[str, tuple[str, int]] | None = None,
                    ignore_case: bool = False) -> tuple[str, np.dtype, int]:
    """(canonical name, base dtype, channels) of ``encoding`` in ``encodings`` (default: all of
    :data:`ENCODINGS`); ``ignore_case`` also accepts e.g. ``RGB8`` / ``16uc1``."""
    table = ENCODINGS if encodings is None else encodings
    name = encoding
    if name not in table and ignore_case:
        low = str(encoding).lower()
        name = next((k for k in table if k.lower() == low), encoding)
    if name not in table:
        raise ImageDecodeError(
            f"unsupported image encoding '{encoding}' (supported: {', '.join(table)})", kind="encoding"
        )
    base, ch = table[name]
    return name, np.dtype(base), ch


def _u8(data) -> np.ndarray:
    """Flat uint8 view of a message's ``data`` (no copy for buffers and contiguous arrays)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, np.uint8)


def decode_raw(encoding: str, height: int, width: int, step: int, is_bigendian, data, *,
               encodings: dict[str, tuple[str, int]] | None = None, ignore_case: bool = False,
               strict: bool = True) -> np.ndarray:
    """(H, W) or (H, W, C) array in the encoding's own channel order, native byte order, C-contiguous,
    owning a private copy of the pixels (safe to keep after the message is gone).

    ``strict`` (live messages): the image must be non-empty, ``step`` a multiple of the item size and
    ``data`` exactly ``step * height`` bytes. Without it (recorded bags): an empty image decodes to an
    empty array, and ``data`` only needs to reach the end of the last row's pixels (trailing bytes and
    a missing last-row padding are accepted).
    """
    name, base, ch = lookup_encoding(encoding, encodings, ignore_case)
    h, w, step = int(height), int(width), int(step)
    itemsize = base.itemsize
    row = w * ch * itemsize
    buf = _u8(data)
    n = buf.size
    if strict:
        if h <= 0 or w <= 0:
            raise ImageDecodeError(f"empty image ({w}x{h})", kind="empty")
        if step < row:
            raise ImageDecodeError(
                f"step {step} is smaller than width*pixel size {w}*{ch * itemsize}={row} for {encoding}", kind="step"
            )
        if step % itemsize:
            raise ImageDecodeError(f"step {step} is not a multiple of the {encoding} item size {itemsize}", kind="step")
        if n != step * h:
            raise ImageDecodeError(f"data has {n} bytes, expected step*height = {step}*{h} = {step * h}", kind="size")
    elif h < 0 or w < 0 or step < row or n < step * (h - 1) + row:
        raise ImageDecodeError(f"image buffer too small: {n} bytes for {h}x{w} {encoding} step {step}", kind="size")
    # (h, row) view of the pixel bytes skipping the row padding (no copy yet)
    rows = np.lib.stride_tricks.as_strided(buf, shape=(h, row), strides=(step, 1)) if h else np.empty((0, row), np.uint8)
    native = base.newbyteorder("=")
    src = base.newbyteorder(">" if is_bigendian else "<") if itemsize > 1 else native
    if src.isnative:
        arr = rows.copy().view(native)  # the one copy
    else:
        arr = rows.view(src).astype(native)  # copy and byte swap in one pass
    return arr.reshape(h, w, ch) if ch > 1 else arr.reshape(h, w)


def to_rgb(arr: np.ndarray, encoding: str, mono: bool = True) -> np.ndarray:
    """Channel order -> RGB for a decoded colour image: BGR swapped, alpha dropped; ``mono`` (mono8 /
    8UC1) is replicated to 3 channels, or returned as is with ``mono=False``. Non-colour encodings
    raise ``ImageDecodeError`` (kind encoding). ``encoding`` is the canonical name."""
    if encoding in ("rgb8", "8UC3"):
        return arr
    if encoding == "bgr8":
        return np.ascontiguousarray(arr[..., ::-1])
    if encoding == "rgba8":
        return np.ascontiguousarray(arr[..., :3])
    if encoding == "bgra8":
        return np.ascontiguousarray(arr[..., 2::-1])
    if encoding in ("mono8", "8UC1"):
        return np.repeat(arr[..., None], 3, axis=2) if mono else arr
    raise ImageDecodeError(f"encoding '{encoding}' is not a colour image (depth/16-bit cannot feed the network)",
                           kind="encoding")


def decode_compressed(fmt: str, data, *, check_format: bool = True, uint8_only: bool = False) -> np.ndarray:
    """Decode a CompressedImage payload with OpenCV: colour comes back RGB (alpha dropped), grey
    stays (H, W), dtype as decoded.

    ``check_format``: reject ``compressedDepth`` and formats other than jpeg/png (an empty format is
    accepted). ``uint8_only``: reject decoded images that are not 8-bit.
    """
    fmt_l = (fmt or "").lower()
    if check_format:
        if "compresseddepth" in fmt_l:
            raise ImageDecodeError(f"compressedDepth images are not supported (format '{fmt}')", kind="format")
        if fmt_l and not any(k in fmt_l for k in ("jpeg", "jpg", "png")):
            raise ImageDecodeError(f"unsupported CompressedImage format '{fmt}' (jpeg or png expected)", kind="format")
    buf = _u8(data)
    if buf.size == 0:
        raise ImageDecodeError("CompressedImage has no data", kind="empty")
    import cv2  # lazy: only needed for compressed input

    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageDecodeError(f"OpenCV could not decode the CompressedImage ({buf.size} bytes, format '{fmt}')",
                               kind="decode")
    if uint8_only and img.dtype != np.uint8:
        raise ImageDecodeError(f"decoded image has dtype {img.dtype}, 8-bit colour expected", kind="decode")
    if img.ndim == 2:
        return img
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def encode_raw(arr: np.ndarray, encoding: str, *, step: int | None = None, is_bigendian: bool = False,
               encodings: dict[str, tuple[str, int]] | None = None, ignore_case: bool = False
               ) -> tuple[np.ndarray, int, int, int]:
    """(uint8 buffer, height, width, step) of an array in ``encoding``'s channel order.

    Values are cast to the encoding's dtype in the requested byte order; ``step`` > row size pads rows
    with zeros. Without padding, a cast or a byte swap the buffer is a zero-copy view of ``arr``
    (C-contiguous input); the buffer is (H, step) when padded, else flat.
    """
    name, base, ch = lookup_encoding(encoding, encodings, ignore_case)
    a = np.asarray(arr)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] != ch:
        raise ImageDecodeError(f"array of shape {np.shape(arr)} does not fit {name} ({ch} channel(s))", kind="size")
    h, w = a.shape[:2]
    dt = base.newbyteorder(">" if is_bigendian else "<")
    a = np.ascontiguousarray(a.astype(dt, copy=False))
    row = w * ch * dt.itemsize
    step = row if step is None else int(step)
    if step < row:
        raise ImageDecodeError(f"step {step} < row size {row}", kind="step")
    if step > row:
        buf = np.zeros((h, step), np.uint8)
        buf[:, :row] = a.view(np.uint8).reshape(h, row)
    else:
        buf = a.view(np.uint8).reshape(-1)
    return buf, h, w, step
