"""Property-based tests (hypothesis) of the message converters and of sync/window under time jumps.

Example counts are modest (CI has 2 cores); run with ``--hypothesis-seed`` to reproduce a failure."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("rclpy")

from sensor_msgs.msg import CompressedImage, Image  # noqa: E402

from fast3dis_ros.core.frames import CameraFrame, FrameSet  # noqa: E402
from fast3dis_ros.pipeline.sync import ApproximateTimeSync  # noqa: E402
from fast3dis_ros.pipeline.window import SlidingWindow  # noqa: E402
from fast3dis_ros.ros import conversions as cv  # noqa: E402

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENCODINGS = list(cv.ENCODINGS)
COLOUR = {"rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1", "8UC3"}


def _array(draw, enc, h, w):
    base, ch = cv.ENCODINGS[enc]
    shape = (h, w, ch) if ch > 1 else (h, w)
    dt = np.dtype(base)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if dt.kind == "f":
        a = rng.normal(size=shape).astype(dt)
        if draw(st.booleans()):  # special values travel bit-exactly too
            a.flat[0] = np.nan
            a.flat[-1] = -np.inf
        return a
    return rng.integers(0, np.iinfo(dt).max, size=shape, endpoint=True, dtype=dt)


@FAST
@given(st.data())
def test_image_roundtrip_all_encodings(data):
    enc = data.draw(st.sampled_from(ENCODINGS), "encoding")
    h, w = data.draw(st.integers(1, 17), "h"), data.draw(st.integers(1, 17), "w")
    a = _array(data.draw, enc, h, w)
    item = a.dtype.itemsize
    pad = data.draw(st.integers(0, 9), "pad_items") * item
    big = data.draw(st.booleans(), "bigendian")
    row = w * a.itemsize * (a.shape[2] if a.ndim == 3 else 1)
    msg = cv.numpy_to_image(a, enc, step=row + pad, is_bigendian=big)
    assert msg.step == row + pad and len(msg.data) == msg.step * h and bool(msg.is_bigendian) == big
    back = cv.image_to_numpy(msg)
    assert back.dtype.isnative and back.shape == a.shape
    np.testing.assert_array_equal(back.view(np.uint8), a.view(np.uint8))  # bit exact (NaN payloads too)
    if enc in COLOUR:
        rgb = cv.image_to_rgb(msg)
        assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
        if enc in ("bgr8", "bgra8"):
            np.testing.assert_array_equal(rgb, a[..., 2::-1])
        elif enc in ("mono8", "8UC1"):
            np.testing.assert_array_equal(rgb, np.repeat(a[..., None], 3, 2))
        else:
            np.testing.assert_array_equal(rgb, a[..., :3])
    else:
        with pytest.raises(cv.ImageConversionError):
            cv.image_to_rgb(msg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(enc=st.one_of(st.sampled_from(ENCODINGS), st.text(max_size=12)),
       h=st.integers(0, 2**32 - 1) | st.integers(0, 20), w=st.integers(0, 2**32 - 1) | st.integers(0, 20),
       step=st.integers(0, 2**32 - 1) | st.integers(0, 80), big=st.integers(0, 255),
       payload=st.binary(max_size=400))
def test_garbage_images_raise_image_conversion_error_only(enc, h, w, step, big, payload):
    m = Image()
    m.height, m.width, m.step, m.is_bigendian = h, w, step, big
    m.encoding = enc
    m.data = payload
    try:
        rgb = cv.image_to_rgb(m)
    except cv.ImageConversionError as e:
        assert str(e) and e.kind in ("encoding", "size", "step", "empty", "decode", "format")
        return
    # accepted: then it really is a consistent image
    assert enc in COLOUR and rgb.shape == (h, w, 3) and len(payload) == step * h


@settings(max_examples=80, deadline=None)
@given(fmt=st.sampled_from(["jpeg", "png", "", "rgb8; jpeg compressed bgr8", "tiff", "16UC1; compressedDepth"]),
       payload=st.binary(max_size=300), keep_header=st.booleans())
def test_garbage_compressed_raise_image_conversion_error_only(fmt, payload, keep_header):
    pytest.importorskip("cv2")
    if keep_header:  # a real PNG/JPEG signature followed by garbage: gets deeper into the decoders
        payload = (b"\x89PNG\r\n\x1a\n" if "png" in fmt else b"\xff\xd8\xff\xe0") + payload
    m = CompressedImage(format=fmt)
    m.data = payload
    try:
        rgb = cv.compressed_to_rgb(m)
    except cv.ImageConversionError as e:
        assert e.kind in ("decode", "format", "empty")
        return
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8


@FAST
@given(n=st.integers(0, 300), seed=st.integers(0, 2**32 - 1), nonfinite=st.booleans())
def test_pointcloud2_roundtrip(n, seed, nonfinite):
    from fast3dis_ros.core.frames import InstanceCloud

    rng = np.random.default_rng(seed)
    xyz = (rng.normal(size=(n, 3)) * rng.choice([1e-3, 1.0, 1e4])).astype(np.float32)
    if nonfinite and n:
        xyz[rng.integers(0, n)] = [np.nan, np.inf, -np.inf]
    c = InstanceCloud("map", int(rng.integers(0, 2**62)), xyz, rng.integers(0, 256, (n, 3), dtype=np.uint8),
                      rng.integers(0, 2**32, n, dtype=np.uint32), rng.random(n).astype(np.float32))
    msg = cv.cloud_to_pointcloud2(c)
    assert msg.width == n and msg.row_step == 24 * n and len(msg.data) == 24 * n
    assert msg.is_dense == bool(n == 0 or np.isfinite(xyz).all())
    arr = cv.pointcloud2_to_structured(msg)
    got = np.stack([arr["x"], arr["y"], arr["z"]], 1) if n else np.zeros((0, 3), np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), xyz.view(np.uint32))
    np.testing.assert_array_equal(arr["instance"], c.instance)
    np.testing.assert_array_equal(arr["score"], c.score)
    packed = arr["rgb"].view(np.uint32)
    np.testing.assert_array_equal(np.stack([(packed >> 16) & 255, (packed >> 8) & 255, packed & 255], 1), c.rgb)
    assert cv.stamp_to_ns(msg.header.stamp) == c.stamp_ns


@settings(max_examples=150, deadline=None)
@given(n=st.integers(0, 20), step_extra=st.integers(-30, 30), width=st.integers(0, 20), height=st.integers(0, 3),
       point_step=st.integers(0, 40), payload=st.binary(max_size=200), big=st.booleans())
def test_pointcloud2_garbage_raises_value_error_only(n, step_extra, width, height, point_step, payload, big):
    from sensor_msgs.msg import PointCloud2, PointField

    msg = PointCloud2()
    msg.fields = [PointField(name="x", offset=0, datatype=7, count=1),
                  PointField(name="i", offset=4 + n % 3, datatype=1 + n % 9, count=1)]
    msg.width, msg.height, msg.point_step, msg.is_bigendian = width, height, point_step, big
    msg.row_step = max(0, width * point_step + step_extra)
    msg.data = payload
    try:
        arr = cv.pointcloud2_to_structured(msg)
    except ValueError:
        return
    assert len(arr) == width * height


# --------------------------------------------------------------------- sync / window with time jumps
@st.composite
def jumpy_streams(draw):
    cams = [f"c{i}" for i in range(draw(st.integers(1, 3)))]
    period = draw(st.integers(10, 50))
    frames = []
    t0 = 10_000
    for seg in range(draw(st.integers(1, 4))):  # segments separated by jumps back (bag loop / sim-time reset)
        n = draw(st.integers(0, 12))
        for k in range(n):
            for c in cams:
                if draw(st.integers(0, 9)) == 0:
                    continue  # missing frame
                t = t0 + k * period + draw(st.integers(-2, 2))
                frames.append(CameraFrame(c, t * 1_000_000, None))
                if draw(st.integers(0, 19)) == 0:
                    frames.append(CameraFrame(c, t * 1_000_000, None))  # duplicate
        t0 = draw(st.sampled_from([t0 - 5_000, 500, t0 + n * period + 3_000]))  # back, to ~0, or forward
    slop = draw(st.integers(0, 10)) * 1_000_000
    return cams, frames, slop, draw(st.integers(1, 6))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jumpy_streams())
def test_sync_with_time_jumps_accounts_every_frame(data):
    cams, frames, slop, qsize = data
    resets = []
    s = ApproximateTimeSync(cams, slop_ns=slop, queue_size=qsize, jump_back_ns=1_000_000_000,
                            on_reset=lambda: resets.append(s.emitted_sets))
    out = []
    for f in frames:
        out += s.push(f)
        assert s.pending_count() <= qsize * len(cams)
    ids = [id(f) for fs in out for f in fs.frames]
    assert len(ids) == len(set(ids))
    assert len(frames) == len(ids) + s.drops.total() + s.pending_count()
    assert s.resets == len(resets)
    # between resets, emitted set stamps strictly increase; sets never mix frames across a jump
    bounds = resets + [len(out)]
    start = 0
    for b in bounds:
        seg = out[start:b]
        st_ = [fs.stamp_ns for fs in seg]
        assert st_ == sorted(set(st_))
        for fs in seg:
            t = [f.stamp_ns for f in fs.frames]
            assert max(t) - min(t) <= slop and fs.cameras == cams
        start = b
    s.flush()
    assert s.pending_count() == 0 and len(frames) == len(ids) + s.drops.total()


@settings(max_examples=100, deadline=None)
@given(size=st.integers(1, 6), stride=st.integers(1, 6), pushes=st.lists(st.booleans(), max_size=40))
def test_window_with_resets_accounts_every_set(size, stride, pushes):
    """``pushes``: True = push a frame set, False = time jump (reset). Every set is evicted exactly once
    (after a final reset), and a set is flagged windowed iff it was part of an emitted window."""
    evicted = []
    w = SlidingWindow(size, stride, on_evict=lambda fs, windowed: evicted.append((fs.index, windowed)))
    in_window = set()
    i = 0
    for p in pushes:
        if p:
            win = w.push(FrameSet(i, i, []))
            i += 1
            if win is not None:
                idx = [fs.index for fs in win.frame_sets]
                assert idx == list(range(idx[0], idx[0] + size)) and idx[-1] == i - 1
                in_window |= set(idx)
        else:
            w.reset()
            assert len(w) == 0
        assert len(w) <= size
    w.reset()
    assert sorted(k for k, _ in evicted) == list(range(i))
    assert {k for k, windowed in evicted if windowed} == in_window
    assume(i > 0)
