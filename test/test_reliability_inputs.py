"""Reliability, bad input: every kind of bad input gets a clear error or a logged, counted drop; never a
crash of the node and never silent corruption of the map. See docs/RELIABILITY.md for which test covers
which item (some items are covered by older tests, listed there)."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")

from ros_helpers import ROOT, RosContext, RosProcess, in_process_node, ros_env, unique_domain_id  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from fast3dis_ros.data.bags import (CAMERA_INFO, IMAGE, BagReadError, BagWriter, camera_info_dict,  # noqa: E402
                                    image_dict, read_camera_streams)
from fast3dis_ros.pipeline.engine import InferenceEngine  # noqa: E402
from fast3dis_ros.core.frames import CameraFrame, FrameSet, Window  # noqa: E402
from fast3dis_ros.pipeline.fusion import MapFusion  # noqa: E402
from fast3dis_ros.pipeline.runner import PipelineRunner, sanitize_prediction  # noqa: E402
from fast3dis_ros.ros import conversions as cv  # noqa: E402

MS = 1_000_000


# ------------------------------------------------------------------------------------------ encodings
@pytest.mark.parametrize("enc", ["yuv422", "bayer_rggb8", "RGB8", "", "32FC3", "64FC1", "8UC4 "])
def test_unsupported_encoding_is_a_clear_error(enc):
    m = Image(height=2, width=3, encoding=enc, step=9)
    m.data = bytes(18)
    with pytest.raises(cv.ImageConversionError, match="unsupported image encoding") as e:
        cv.image_to_rgb(m)
    assert e.value.kind == "encoding" and repr(enc) in str(e.value)


@pytest.mark.parametrize("enc,dtype", [("16UC1", np.uint16), ("mono16", np.uint16), ("32FC1", np.float32)])
def test_non_colour_encoding_cannot_feed_the_network(enc, dtype):
    msg = cv.numpy_to_image(np.zeros((3, 4), dtype), enc)
    assert cv.image_to_numpy(msg).shape == (3, 4)  # decodable ...
    with pytest.raises(cv.ImageConversionError, match="not a colour image") as e:  # ... but not an RGB input
        cv.image_to_rgb(msg)
    assert e.value.kind == "encoding"


@pytest.mark.parametrize("h,w,step,n,kind", [
    (2, 3, 9, 0, "size"),  # no data at all
    (2, 3, 9, 19, "size"),  # one byte too many
    (2, 3, 12, 18, "size"),  # padded step announced, unpadded data
    (2, 3, 2, 4, "step"),  # step smaller than a row
    (0, 3, 9, 0, "empty"),
    (2, 0, 0, 0, "empty"),
])
def test_step_and_size_mismatch(h, w, step, n, kind):
    m = Image(height=h, width=w, encoding="rgb8", step=step)
    m.data = bytes(n)
    with pytest.raises(cv.ImageConversionError) as e:
        cv.image_to_rgb(m)
    assert e.value.kind == kind, str(e.value)


# -------------------------------------------------------------------------- in-process node (no images)
@pytest.fixture
def node():
    yield from in_process_node()


def _info(k, width=64, height=48):
    ci = CameraInfo(width=width, height=height)
    ci.k = [float(v) for v in k]
    return ci


def test_missing_zero_and_nan_camera_info(node):
    cam = node.cameras[0]
    assert node._intrinsics(cam, 64, 48) is None  # no CameraInfo yet: the network estimates K
    assert "no CameraInfo" in node.diag.k_status[cam]
    for k, why in (([0.0] * 9, "all zeros"), ([float("nan")] * 9, "non-finite"),
                   ([0, 0, 32, 0, 0, 24, 0, 0, 1], "non-positive focal"),
                   ([60, 0, 32, 0, 60, 24, 1, 0, 1], "last row")):
        node._on_info(_info(k), cam)
        assert node._intrinsics(cam, 64, 48) is None
        assert node.diag.k_status[cam].startswith("invalid") and why in node.diag.k_status[cam]
    node._on_info(_info([60, 0, 32, 0, 60, 24, 0, 0, 1]), cam)
    K = node._intrinsics(cam, 128, 96)  # CameraInfo for 64x48, images at 128x96: scaled, said so
    assert K[0, 0] == 120 and K[1, 2] == 48 and "scaled" in node.diag.k_status[cam]
    node._on_info(_info([60, 0, 32, 0, 60, 24, 0, 0, 1], width=0, height=0), cam)  # size unknown: refused
    assert node._intrinsics(cam, 64, 48) is None and "0x0" in node.diag.k_status[cam]


def test_node_callbacks_count_bad_images_and_never_raise(node):
    cam = node.cameras[0]
    good = cv.numpy_to_image(np.zeros((48, 64, 3), np.uint8), "rgb8")
    good.header.stamp = cv.ns_to_stamp(1_000_000_000)
    zero = cv.numpy_to_image(np.zeros((48, 64, 3), np.uint8), "rgb8")  # header.stamp == 0
    bad = Image(height=48, width=64, encoding="rgb8", step=64 * 3)
    bad.data = bytes(10)
    depth = cv.numpy_to_image(np.zeros((48, 64), np.float32), "32FC1")
    depth.header.stamp = good.header.stamp
    for m in (good, zero, bad, depth, bad):
        node._on_image(m, cam)
    errs = node.diag.input_errors[cam].as_dict()
    assert errs == {"zero_stamp": 1, "bad_image": 3}, errs
    assert node.diag.image_rate[cam].count == 5
    assert node.runner.accounting()["frames"]["pushed"] == 1
    # an internal failure below the callback is counted too, never raised into the executor
    node.runner.feed = lambda f: 1 / 0
    node._on_image(good, cam)
    assert node.diag.input_errors[cam].get("internal_error") == 1
    # diagnostics show it all
    msgs = []
    node.pub_diag.publish = msgs.append
    node._publish_diagnostics()
    st = {s.name: {kv.key: kv.value for kv in s.values} for s in msgs[0].status}
    v = st[f"fast3dis: input {cam}"]
    assert v["rejected_bad_image"] == "3" and v["rejected_zero_stamp"] == "1" and v["rejected_internal_error"] == "1"
    assert st["fast3dis: outputs"]["frames_pushed"] == "1"


def test_wrong_parameter_values_rejected_with_reason(node):
    from rclpy.parameter import Parameter

    # ranges and types are checked by rclpy from the descriptors, the rest by the node's callback (P.validate,
    # then start-up-only parameters refused with the reason: ros/runtime_params.py)
    cases = [("score_threshold", -0.1, "range"), ("score_threshold", "x", "type"),
             ("conf_threshold", 1e9, "range"), ("publish_window_cloud", 1, "type"),
             ("window_size", 3, "stride=4 > window_size=3"), ("window_size", 6, "start-up only"),
             ("cameras", ["a"], "start-up only")]
    for name, value, why in cases:
        r = node.set_parameters([Parameter(name, value=value)])[0]
        assert not r.successful and why in r.reason.lower(), (name, value, r.reason)
    assert node.p["score_threshold"] == 0.5 and node.runner.fusion.min_score == 0.5  # nothing applied
    # one bad value in a batch rejects the whole batch (atomic)
    r = node.set_parameters_atomically([Parameter("score_threshold", value=0.2),
                                        Parameter("conf_threshold", value=-1.0)])
    assert not r.successful and node.p["score_threshold"] == 0.5


# ----------------------------------------------------------------------- different sizes across cameras
def test_cameras_of_different_sizes_in_one_frame_set():
    """Views are resized to one processing resolution, each K scaled by its own image size."""
    from fast3dis_ros.inference.predictor import Predictor, processing_hw

    rng = np.random.default_rng(0)
    sizes = {"a": (48, 64), "b": (84, 112), "c": (60, 60)}
    sets = []
    for i in range(2):
        frames = []
        for c, (h, w) in sizes.items():
            K = np.array([[0.9 * w, 0, w / 2], [0, 0.9 * w, h / 2], [0, 0, 1.0]])
            frames.append(CameraFrame(c, 1000 + i, rng.integers(0, 255, (h, w, 3), dtype=np.uint8), K=K))
        sets.append(FrameSet(i, 1000 + i, frames))
    p = Predictor.random_tiny(0, score_threshold=0.0)
    pred = p.predict(Window(0, sets))
    hw = processing_hw(48, 64, p.process_size)  # view 0 decides
    assert pred.images.shape[1:3] == hw and pred.depth.shape == (6,) + hw
    np.testing.assert_allclose(pred.K[1, 0, 0], 0.9 * 112 * hw[1] / 112)  # b: scaled from its own size
    np.testing.assert_allclose(pred.K[2, 1, 2], (30 + 0.5) * hw[0] / 60 - 0.5)  # c: pixel-centre convention
    f = MapFusion(voxel_size=0.05)
    res = f.integrate(pred)
    assert np.isfinite(res.map_cloud.xyz).all() and len(res.map_cloud) > 0


# ------------------------------------------------------------------------------- NaN / inf predictions
def _fusion_helpers():
    import test_fusion as tf  # make_pred: analytic spheres seen by 2 cameras, known Sim(3)

    return tf


def _runner_with(preds, **kw):
    """A sync-mode runner whose predictor returns ``preds[window.index]`` (ids/stamps of the window)."""
    tf = _fusion_helpers()

    def predict(window):
        p = tf.make_pred(window.index, [fs.index for fs in window.frame_sets])
        p.view_stamps_ns = [f.stamp_ns for f in window.views]
        p.cameras = [f.camera for f in window.views]
        hook = preds.get(window.index)
        if hook is not None:
            hook(p)
        return p

    results = []
    r = PipelineRunner(["a", "b"], predict, slop_ns=10 * MS, window_size=2, stride=1,
                       fusion=MapFusion(voxel_size=0.1), sync_mode=True,
                       on_fusion=lambda res, p: results.append((res, p)), **kw)
    return r, results


def _feed_sets(r, n, t0_ms=0, period_ms=100):
    img = np.zeros((4, 4, 3), np.uint8)
    for k in range(n):
        for cam in ("a", "b"):
            r.feed(CameraFrame(cam, (t0_ms + k * period_ms) * MS, img))


def _balanced(acc):
    fs = acc["frame_sets"]
    return fs["received"] == fs["processed"] + sum(fs["dropped"].values()) + fs["in_flight"]


def test_nan_and_inf_depth_and_poses_filtered_and_counted():
    def nan_depth(p):
        p.depth[0, :10] = np.nan
        p.depth[1, :, :5] = np.inf
        p.depth[2, 0, 0] = -np.inf
        p.depth_conf[3, :4] = np.nan

    def one_nan_pose(p):
        p.T_cam_world[3] = np.nan

    def inf_K(p):
        p.K[0, 0, 0] = np.inf

    def all_nan_pose(p):
        p.T_cam_world[:] = np.nan

    r, results = _runner_with({1: nan_depth, 2: one_nan_pose, 3: inf_K, 4: all_nan_pose})
    _feed_sets(r, 8)
    r.flush()
    acc = r.accounting()
    ev = acc["fusion"]["events"]
    assert ev["nonfinite_depth_px"] == 10 * 64 + 48 * 5 + 1
    assert ev["view_nonfinite_pose"] == 1 + 4 and ev["view_nonfinite_K"] == 1
    # window 4 had no usable view: dropped with a reason, the sets it alone held are counted
    assert [res.window_index for res, _ in results] == [0, 1, 2, 3, 5, 6]
    assert acc["frame_sets"]["dropped"] == {} and acc["frame_sets"]["processed"] == 8  # sets 4, 5 in other windows
    assert _balanced(acc) and acc["frame_sets"]["in_flight"] == 0
    for res, p in results:  # nothing non-finite reached the map, published poses match the fused views
        assert np.isfinite(res.map_cloud.xyz).all() and np.isfinite(res.window_cloud.xyz).all()
        assert np.isfinite(res.T_map_cam).all() and len(p.cameras) == res.T_map_cam.shape[0]
    assert [len(p.cameras) for _, p in results] == [4, 4, 3, 3, 4, 4]
    # alignment goes on: windows whose only shared views were left out fall back to the previous alignment
    # (counted no_overlap; right here, every window is in the same world); the rest align on shared views
    assert [res.align_method for res, _ in results] == ["first", "shared_views", "shared_views", "previous",
                                                         "previous", "shared_views"]
    assert ev["no_overlap"] == 2 and ev.get("align_failed", 0) == 0
    assert abs(results[-1][0].scale - 1.0) < 1e-3


def test_window_without_any_finite_view_dropped_with_reason():
    r, results = _runner_with({i: (lambda p: p.T_cam_world.__setitem__(slice(None), np.inf)) for i in range(10)})
    _feed_sets(r, 3)
    r.flush()
    acc = r.accounting()
    assert results == [] and acc["frame_sets"]["dropped"] == {"nonfinite_prediction": 3}
    assert _balanced(acc) and len(r.fusion.map) == 0


def test_sanitize_prediction_keeps_clean_predictions_untouched():
    tf = _fusion_helpers()
    p = tf.make_pred(0, [0, 1])
    out, ev = sanitize_prediction(p)
    assert out is p and ev == {}


# ---------------------------------------------------------------- stamps: duplicates, order, time jumps
def test_runner_duplicates_out_of_order_and_time_jump_accounted():
    r, results = _runner_with({})
    img = np.zeros((4, 4, 3), np.uint8)
    seq = []
    for k in range(6):
        seq += [("a", k * 100), ("b", k * 100 + 2)]
    seq += [("a", 500), ("b", 502), ("a", 350), ("b", 300)]  # duplicates, then out of order (within 1 s)
    for k in range(5):  # bag loop: back to t = 0 (a jump of 0.6 s would be out_of_order; 5 s back is a jump)
        seq += [("a", -5000 + k * 100), ("b", -5000 + k * 100 + 1)]
    for cam, t in seq:
        r.feed(CameraFrame(cam, (10_000 + t) * MS, img))
        assert _balanced(r.accounting())
    r.flush()
    acc = r.accounting()
    d = acc["frames"]["dropped"]
    assert d["duplicate_stamp"] == 2 and d["out_of_order"] == 2
    assert acc["sync_resets"] == 1
    fr = acc["frames"]
    assert fr["pushed"] == fr["in_sets"] + sum(d.values()) + fr["pending"] == len(seq)
    assert _balanced(acc) and acc["frame_sets"]["in_flight"] == 0 and acc["frame_sets"]["received"] == 11
    # the map was reset at the jump: the first window after it starts a new map
    assert [res.align_method for res, _ in results].count("first") == 2
    assert all(np.isfinite(res.map_cloud.xyz).all() for res, _ in results)


# ------------------------------------------------------------------------------------------ empty window
def test_empty_window_and_empty_prediction():
    errors, drops, calls = [], [], []
    eng = InferenceEngine(lambda w: calls.append(w), on_error=lambda w, e: errors.append(e),
                          on_drop=lambda w, r: drops.append(r), start=False)
    assert eng.process_now(Window(0, [])) is None  # a counted drop; the predictor never sees it
    assert eng.process_now(Window(1, [FrameSet(0, 1, [])])) is None
    assert calls == [] and errors == [] and drops == ["empty_window"] * 2
    assert eng.drops.as_dict() == {"empty_window": 2}

    # a prediction with no valid pixel: an empty window cloud, the map is left as it was
    tf = _fusion_helpers()
    f = MapFusion(voxel_size=0.1)
    n0 = len(f.integrate(tf.make_pred(0, [0, 1])).map_cloud)
    p = tf.make_pred(1, [1, 2])
    p.depth[:] = np.nan
    res = f.integrate(p)
    assert len(res.window_cloud) == 0 and len(res.map_cloud) == n0 and res.instances is not None
    # runner / window flush with nothing buffered
    r, results = _runner_with({})
    assert r.flush() and results == [] and r.accounting()["frame_sets"]["received"] == 0


# ------------------------------------------------------------------------------------ undecodable bags
def _bag_with_bad_messages(path, n=4, cams=("left", "right"), h=24, w=32):
    rng = np.random.default_rng(0)
    K = np.array([[30.0, 0, w / 2], [0, 30.0, h / 2], [0, 0, 1]])
    t0 = 1_700_000_000_000_000_000
    with BagWriter(path) as bw:
        for k in range(n):
            st = t0 + k * 100 * MS
            for c in cams:
                fid = f"{c}_optical_frame"
                img = image_dict(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "rgb8", fid, st)
                topic = f"/{c}/image_raw"
                if (k, c) == (1, "left"):  # short buffer: decodes as CDR, not as an image
                    img["data"] = img["data"][:10]
                if (k, c) == (2, "right"):  # unsupported encoding
                    img["encoding"] = "yuv422"
                if (k, c) == (3, "left"):  # not even CDR: raw garbage bytes on the image topic
                    bw.write(topic, IMAGE, img, st)  # declare the connection, then append garbage
                    bw._writer.write(bw._conns[topic], st + 1, b"\x00\x01\x00\x00garbage")
                    bw.write(f"/{c}/camera_info", CAMERA_INFO, camera_info_dict(K, w, h, fid, st), st)
                    continue
                bw.write(topic, IMAGE, img, st)
                bw.write(f"/{c}/camera_info", CAMERA_INFO, camera_info_dict(K, w, h, fid, st), st)


def test_undecodable_messages_raise_by_default_and_are_yielded_with_skip_bad(tmp_path):
    bag = tmp_path / "bad"
    _bag_with_bad_messages(bag)
    with pytest.raises(BagReadError, match="cannot decode") as e:
        list(read_camera_streams(bag))
    assert str(bag) in str(e.value)
    items = list(read_camera_streams(bag, skip_bad=True))
    bad = [i for i in items if i.kind == "bad_image"]
    assert len(bad) == 3 and all(isinstance(i.data, str) and "cannot decode" in i.data for i in bad)
    assert {i.topic for i in bad} == {"/left/image_raw", "/right/image_raw"}
    assert any("yuv422" in i.data for i in bad) and any("too small" in i.data for i in bad)
    assert sum(i.kind == "image" for i in items) == 6  # 4 sets x 2 cameras, 2 of them bad (+1 garbage message)


def test_replay_counts_undecodable_images_and_goes_on(tmp_path):
    from fast3dis_ros.eval.replay import ReplayConfig, replay_bag

    bag = tmp_path / "bad"
    _bag_with_bad_messages(bag, n=8)

    from fast3dis_ros.inference.predictor import Predictor

    res = replay_bag(bag, Predictor.random_tiny(0, score_threshold=0.0), ReplayConfig(window_size=2, stride=1),
                     progress=False)
    acc = res.accounting
    fr = acc["frames"]
    assert fr["read"] == 17 and fr["rejected"] == {"undecodable": 3}
    assert acc["balanced"] is True and acc["frame_sets"]["received"] == 6  # sets 1 and 2 lost a camera
    assert sum(fr["dropped_by_sync"].values()) == 2  # their lone partners
    assert len(res.records) >= 3


# ------------------------------------------------------------------------------------------ checkpoints
def test_node_refuses_mismatched_checkpoint_naming_key_and_shape(tmp_path):
    import torch

    from fast3dis_ros.model.checkpoint import save_checkpoint
    from fast3dis_ros.model.config import Fast3disConfig
    from fast3dis_ros.model.fast3dis import Fast3DIS

    torch.manual_seed(0)
    ck = save_checkpoint(Fast3DIS(Fast3disConfig.tiny()), tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["head"]["num_queries"] = 20  # the weights hold 16 queries
    (ck / "config.json").write_text(json.dumps(cfg))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fast3dis_ros.ros.node", "--ros-args", "-p", f"checkpoint:={ck}",
                        "-p", "device:=cpu"], capture_output=True, text=True, timeout=120,
                       env=ros_env(unique_domain_id()), cwd=str(ROOT))
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "cannot start" in out and "do not match the network" in out and "shape mismatch" in out, out
    assert "(16," in out and "(20," in out and "Traceback" not in out, out
    print(f"mismatched checkpoint refused in {time.monotonic() - t0:.1f} s")


# ------------------------------------------------------------------------------------- over real DDS
@pytest.mark.timeout(120)
def test_node_over_dds_counts_bad_input_in_diagnostics_and_keeps_running():
    """One node process; the test publishes good sets interleaved with a zero-stamp image, a bad-step
    image, a depth image, zero CameraInfo, duplicate and out-of-order stamps, a bag-loop time jump, then
    one camera goes silent. Everything must show in /diagnostics; results keep coming."""
    from test_node_dds import CAMS, _camera_info, _Harness, _image, _node_args, _wait_matched

    dom = unique_domain_id()
    with RosContext(dom) as ctx, RosProcess(_node_args(), dom, name="fast3dis_node") as node:
        h = _Harness(ctx)
        _wait_matched(ctx, h, node)

        def send(cam_i, ns, enc="rgb8", info=True, zero_k=False, img=None):
            m = cv.numpy_to_image(_image(int(ns // 100_000_000) % 50, cam_i) if img is None else img, enc)
            m.header.stamp, m.header.frame_id = cv.ns_to_stamp(ns), f"{CAMS[cam_i]}_optical_frame"
            if info:
                ci = _camera_info(m.header.stamp, m.header.frame_id)
                if zero_k:
                    ci.k = [0.0] * 9
                h.info_pubs[cam_i].publish(ci)
            h.img_pubs[cam_i].publish(m)

        base = h.base_ns
        k = [0]

        def good_set(zero_k_right=True):
            ns = base + k[0] * 100_000_000
            send(0, ns)
            send(1, ns, zero_k=zero_k_right)
            k[0] += 1
            return ns

        bad_step = Image(height=48, width=64, encoding="rgb8", step=64 * 3 - 1)
        bad_step.data = bytes(48 * (64 * 3 - 1))
        bad_step.header.stamp = cv.ns_to_stamp(base)
        script = []
        for i in range(6):
            script.append(lambda: good_set())
        script.append(lambda: h.img_pubs[0].publish(bad_step))
        script.append(lambda: send(0, 0))  # zero stamp
        script.append(lambda: send(0, base + 10, enc="32FC1", info=False, img=np.zeros((48, 64), np.float32)))
        script.append(lambda: (send(0, base + 5 * 100_000_000), send(1, base + 5 * 100_000_000)))  # duplicates
        script.append(lambda: send(0, base + 2 * 100_000_000 + 7))  # out of order (0.3 s back)
        script.append(lambda: k.__setitem__(0, -100))  # bag loop: 10 s back
        for i in range(6):
            script.append(lambda: good_set())
        stamps_after_jump = []

        def step_fn():
            now = time.monotonic()
            if now >= step_fn.next:
                step_fn.next = now + 0.25
                if script:
                    script.pop(0)()
                else:  # only the left camera from now on: right goes silent
                    ns = base + k[0] * 100_000_000
                    send(0, ns)
                    stamps_after_jump.append(ns)
                    k[0] += 1
        step_fn.next = 0.0

        def diag_values():
            out = {}
            for d in h.got["diag"][-3:]:
                for s in d.status:
                    out[s.name] = (s.level, s.message, {kv.key: kv.value for kv in s.values})
            return out

        def done():
            if not node.alive() or script:
                return not node.alive()
            v = diag_values()
            if "fast3dis: input right" not in v:
                return False
            left, right = v["fast3dis: input left"][2], v["fast3dis: input right"]
            sync, outs = v["fast3dis: sync"][2], v["fast3dis: outputs"][2]
            return (int(left.get("rejected_bad_image", 0)) >= 2 and int(left.get("rejected_zero_stamp", 0)) >= 1
                    and int(sync.get("drop_duplicate_stamp", 0)) >= 1 and int(sync.get("drop_out_of_order", 0)) >= 1
                    and int(outs.get("sync_resets", 0)) >= 1 and "right" in outs.get("silent_cameras", "")
                    and "no image for" in right[1] and right[2]["intrinsics"].startswith("invalid"))

        ok = ctx.spin_until(done, timeout=80, step=step_fn)
        v = diag_values()
        assert ok and node.alive(), f"diagnostics: {json.dumps({k: v[k][1:] for k in v}, default=str)[:3000]}\n" \
                                    f"node output:\n{node.output()[-3000:]}"
        assert v["fast3dis: input right"][0] == b"\x01"  # WARN
        assert "all zeros" in v["fast3dis: input right"][2]["intrinsics"]
        left = v["fast3dis: input left"][2]
        assert int(left["rejected_bad_image"]) == 2  # the bad step and the depth image, once each
        # results after the jump: the node kept working through all of it
        outs = v["fast3dis: outputs"][2]
        assert int(outs["results_published"]) >= 2 and h.got["map"]
        newest = cv.stamp_to_ns(h.got["map"][-1].header.stamp)  # the last result: from after the jump
        assert newest < base, [cv.stamp_to_ns(m.header.stamp) - base for m in h.got["map"]]
        # accounting identity over DDS: every frame the node took is in a set, pending or dropped by reason
        sync = v["fast3dis: sync"][2]
        drops = sum(int(x) for key, x in sync.items() if key.startswith("drop_"))
        assert int(outs["frames_pushed"]) == int(outs["frames_in_sets"]) + int(outs["frames_pending"]) + drops
    log = node.output()
    assert "image rejected" in log and "without stamp" in log and "all zeros" in log


# ------------------------------------------------------------------- replay accounting (bag loop & co.)
def test_replay_accounting_with_duplicates_out_of_order_and_time_jump(tmp_path):
    """A bag whose header stamps repeat, go back a little, then jump back 10 s (bag recorded across a
    loop) while the receive times keep increasing: every image is in a set, rejected, or dropped by the
    synchroniser with a reason; every frame set is processed or dropped with a reason."""
    from fast3dis_ros.eval.replay import ReplayConfig, replay_bag

    tf = _fusion_helpers()
    h, w = 24, 32
    K = np.array([[30.0, 0, w / 2], [0, 30.0, h / 2], [0, 0, 1]])
    t0 = 1_700_000_000_000_000_000
    rng = np.random.default_rng(0)
    events = [(k, c) for k in range(6) for c in ("left", "right")]
    events += [(5, "left"), (3, "left")]  # duplicate stamp, then 0.2 s out of order
    events += [(k - 100, c) for k in range(5) for c in ("left", "right")]  # 10 s back
    bag = tmp_path / "loop"
    with BagWriter(bag) as bw:
        for i, (k, c) in enumerate(events):
            st, log_t = t0 + k * 100 * MS, t0 + i * 10 * MS  # header stamp vs. monotonic receive time
            fid = f"{c}_optical_frame"
            bw.write(f"/{c}/image_raw", IMAGE,
                     image_dict(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "rgb8", fid, st), log_t)
            bw.write(f"/{c}/camera_info", CAMERA_INFO, camera_info_dict(K, w, h, fid, st), log_t)

    class FakePredictor:
        def predict(self, window):
            p = tf.make_pred(window.index, [fs.index % 10 for fs in window.frame_sets])
            p.cameras = [v.camera for v in window.views]
            p.view_stamps_ns = [v.stamp_ns for v in window.views]
            return p

    res = replay_bag(bag, FakePredictor(), ReplayConfig(window_size=2, stride=1, slop_ms=20), progress=False)
    acc = res.accounting
    fr, fs = acc["frames"], acc["frame_sets"]
    assert fr["read"] == len(events) == 24 and fr["rejected"] == {}
    assert fr["dropped_by_sync"] == {"duplicate_stamp": 1, "out_of_order": 1}, fr
    assert fr["in_sets"] == 22 and fr["pending"] == 0
    assert fs == {"received": 11, "processed": 11, "dropped": {}, "in_flight": 0}, fs
    assert acc["balanced"] is True and acc["errors"] == []
    # the map was restarted at the jump: the first window after it is a new "first"
    assert [r.fusion.align_method for r in res.records].count("first") == 2
