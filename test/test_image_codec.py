"""data/image_codec.py: the ROS-free image decoding/encoding shared by ros/conversions and data/bags."""

import subprocess
import sys

import numpy as np
import pytest

from fast3dis_ros.data import image_codec as ic


def _array(enc, h=5, w=7, seed=0):
    base, ch = ic.ENCODINGS[enc]
    dt = np.dtype(base)
    rng = np.random.default_rng(seed)
    shape = (h, w, ch) if ch > 1 else (h, w)
    if dt.kind == "f":
        a = rng.normal(size=shape).astype(dt)
        a.flat[0] = np.nan
        return a
    info = np.iinfo(dt)
    return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dt)


def test_no_ros_imports():
    code = ("import sys, fast3dis_ros.data.image_codec, fast3dis_ros.pipeline.markers; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('rclpy', 'rosbags', 'sensor_msgs', 'cv2')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("enc", list(ic.ENCODINGS))
@pytest.mark.parametrize("pad_items,big", [(0, False), (3, False), (0, True), (2, True)])
def test_roundtrip_every_encoding(enc, pad_items, big):
    a = _array(enc)
    row = a.shape[1] * a.itemsize * (a.shape[2] if a.ndim == 3 else 1)
    buf, h, w, step = ic.encode_raw(a, enc, step=row + pad_items * a.itemsize, is_bigendian=big)
    assert (h, w, step) == (5, 7, row + pad_items * a.itemsize) and buf.dtype == np.uint8 and buf.size == step * h
    for strict in (True, False):
        back = ic.decode_raw(enc, h, w, step, big, buf.tobytes(), strict=strict)
        assert back.dtype.isnative and back.dtype == a.dtype.newbyteorder("=") and back.shape == a.shape
        assert back.flags.c_contiguous
        np.testing.assert_array_equal(back.view(np.uint8), a.view(np.uint8))  # bit exact, NaN payload too


def test_decode_accepts_buffers_and_arrays_and_owns_its_pixels():
    a = _array("16UC1")
    buf, h, w, step = ic.encode_raw(a, "16UC1")
    for data in (buf.tobytes(), bytearray(buf.tobytes()), memoryview(buf.tobytes()), buf.copy()):
        out = ic.decode_raw("16UC1", h, w, step, False, data)
        np.testing.assert_array_equal(out, a)
    src = buf.copy()
    out = ic.decode_raw("16UC1", h, w, step, False, src)
    src[:] = 0  # the message buffer may be reused: the result must not change
    np.testing.assert_array_equal(out, a)


def test_encode_is_zero_copy_when_nothing_to_do():
    a = _array("32FC1").astype("<f4")
    buf, *_ = ic.encode_raw(a, "32FC1")
    assert np.shares_memory(buf, a) and buf.ndim == 1
    padded, _, _, step = ic.encode_raw(a, "32FC1", step=7 * 4 + 8)
    assert not np.shares_memory(padded, a) and padded.shape == (5, step) and not padded[:, 28:].any()


def test_encode_errors():
    with pytest.raises(ic.ImageDecodeError, match="unsupported image encoding 'yuv422'") as e:
        ic.encode_raw(np.zeros((2, 2, 2), np.uint8), "yuv422")
    assert e.value.kind == "encoding"
    with pytest.raises(ic.ImageDecodeError, match="does not fit rgb8") as e:
        ic.encode_raw(np.zeros((2, 2), np.uint8), "rgb8")
    assert e.value.kind == "size"
    with pytest.raises(ic.ImageDecodeError, match="step 5 < row size 6") as e:
        ic.encode_raw(np.zeros((2, 2, 3), np.uint8), "rgb8", step=5)
    assert e.value.kind == "step"


def test_lookup_case_and_subset():
    assert ic.lookup_encoding("RGB8", ignore_case=True)[0] == "rgb8"
    assert ic.lookup_encoding("16uc1", ignore_case=True)[0] == "16UC1"
    with pytest.raises(ic.ImageDecodeError, match="unsupported image encoding 'RGB8'"):
        ic.lookup_encoding("RGB8")
    with pytest.raises(ic.ImageDecodeError) as e:
        ic.lookup_encoding("32SC1", {"rgb8": ("u1", 3)})
    assert e.value.kind == "encoding" and "supported: rgb8" in str(e.value)
    assert issubclass(ic.ImageDecodeError, ValueError)


@pytest.mark.parametrize("h,w,step,n,kind", [
    (2, 3, 9, 0, "size"), (2, 3, 9, 19, "size"), (2, 3, 12, 18, "size"), (2, 3, 2, 4, "step"),
    (0, 3, 9, 0, "empty"), (2, 0, 0, 0, "empty"),
])
def test_strict_errors(h, w, step, n, kind):
    with pytest.raises(ic.ImageDecodeError) as e:
        ic.decode_raw("rgb8", h, w, step, False, bytes(n), strict=True)
    assert e.value.kind == kind, str(e.value)


def test_strict_step_alignment():
    with pytest.raises(ic.ImageDecodeError, match="not a multiple") as e:
        ic.decode_raw("16UC1", 2, 3, 7, False, bytes(14))
    assert e.value.kind == "step"


def test_lenient_mode_for_recorded_data():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 12), np.uint8)
    padded[:, :9] = rgb.reshape(2, 9)
    # trailing bytes and a last row without its padding are accepted, odd steps too
    for data in (padded.tobytes() + b"xyz", padded.tobytes()[:-3]):
        np.testing.assert_array_equal(ic.decode_raw("rgb8", 2, 3, 12, False, data, strict=False), rgb)
        with pytest.raises(ic.ImageDecodeError):
            ic.decode_raw("rgb8", 2, 3, 12, False, data, strict=True)
    d16 = np.array([[1, 2], [3, 4]], np.uint16)
    odd = np.zeros((2, 5), np.uint8)
    odd[:, :4] = d16.view(np.uint8).reshape(2, 4)
    np.testing.assert_array_equal(ic.decode_raw("16UC1", 2, 2, 5, False, odd.tobytes(), strict=False), d16)
    assert ic.decode_raw("rgb8", 0, 3, 9, False, b"", strict=False).shape == (0, 3, 3)
    with pytest.raises(ic.ImageDecodeError, match="image buffer too small") as e:
        ic.decode_raw("rgb8", 2, 3, 9, False, bytes(17), strict=False)
    assert e.value.kind == "size"


def test_to_rgb():
    rgb = _array("rgb8")
    alpha = np.full(rgb.shape[:2] + (1,), 7, np.uint8)
    np.testing.assert_array_equal(ic.to_rgb(rgb, "rgb8"), rgb)
    np.testing.assert_array_equal(ic.to_rgb(rgb[..., ::-1], "bgr8"), rgb)
    np.testing.assert_array_equal(ic.to_rgb(np.concatenate([rgb, alpha], -1), "rgba8"), rgb)
    np.testing.assert_array_equal(ic.to_rgb(np.concatenate([rgb[..., ::-1], alpha], -1), "bgra8"), rgb)
    mono = rgb[..., 0].copy()
    np.testing.assert_array_equal(ic.to_rgb(mono, "mono8"), np.repeat(mono[..., None], 3, 2))
    assert ic.to_rgb(mono, "8UC1", mono=False) is mono
    for out in (ic.to_rgb(rgb[..., ::-1], "bgr8"), ic.to_rgb(np.concatenate([rgb, alpha], -1), "rgba8")):
        assert out.flags.c_contiguous
    with pytest.raises(ic.ImageDecodeError, match="not a colour image") as e:
        ic.to_rgb(np.zeros((2, 2), np.float32), "32FC1")
    assert e.value.kind == "encoding"


def test_compressed():
    cv2 = pytest.importorskip("cv2")
    rgb = _array("rgb8", 8, 10)
    png = cv2.imencode(".png", rgb[..., ::-1].copy())[1]
    np.testing.assert_array_equal(ic.decode_compressed("png", png.tobytes()), rgb)
    np.testing.assert_array_equal(ic.decode_compressed("", png), rgb)  # ndarray payload, empty format
    rgba = np.concatenate([rgb[..., ::-1], np.full((8, 10, 1), 3, np.uint8)], -1)
    np.testing.assert_array_equal(ic.decode_compressed("png", cv2.imencode(".png", rgba)[1]), rgb)
    grey = ic.decode_compressed("png", cv2.imencode(".png", rgb[..., 0].copy())[1])
    assert grey.shape == (8, 10)
    bmp = cv2.imencode(".bmp", rgb[..., ::-1].copy())[1]
    with pytest.raises(ic.ImageDecodeError, match="unsupported CompressedImage format 'bmp'") as e:
        ic.decode_compressed("bmp", bmp)
    assert e.value.kind == "format"
    np.testing.assert_array_equal(ic.decode_compressed("bmp", bmp, check_format=False), rgb)
    deep = cv2.imencode(".png", rgb[..., 0].astype(np.uint16) * 200)[1]
    assert ic.decode_compressed("png", deep).dtype == np.uint16
    with pytest.raises(ic.ImageDecodeError, match="8-bit") as e:
        ic.decode_compressed("png", deep, uint8_only=True)
    assert e.value.kind == "decode"
    for fmt, data, kind in (("16UC1; compressedDepth png", b"x", "format"), ("jpeg", b"", "empty"),
                            ("jpeg", b"not a jpeg", "decode")):
        with pytest.raises(ic.ImageDecodeError) as e:
            ic.decode_compressed(fmt, data)
        assert e.value.kind == kind


def test_both_wrappers_use_the_codec():
    from fast3dis_ros.data import bags

    rgb = _array("rgb8")
    d = bags.image_dict(rgb[..., ::-1].copy(), "BGR8", "cam", 1)  # bags: encodings case-insensitive
    from types import SimpleNamespace

    np.testing.assert_array_equal(bags.decode_image(SimpleNamespace(**{k: d[k] for k in (
        "encoding", "height", "width", "step", "is_bigendian", "data")})), rgb)
    with pytest.raises(bags.BagReadError, match="unsupported image encoding 'yuv422'") as e:
        bags.decode_image(SimpleNamespace(encoding="yuv422", height=1, width=1, step=2, is_bigendian=False,
                                          data=np.zeros(2, np.uint8)))
    assert isinstance(e.value.__cause__, ic.ImageDecodeError)
    pytest.importorskip("rclpy")
    from fast3dis_ros.ros import conversions as cv

    assert cv.ImageConversionError is ic.ImageDecodeError
    assert set(cv.ENCODINGS) <= set(ic.ENCODINGS) and all(cv.ENCODINGS[k] == ic.ENCODINGS[k] for k in cv.ENCODINGS)
