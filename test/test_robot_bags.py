"""Issue 19: robot bags that differ from the synthetic ones work, or fail loudly.

Every bag here is written by the test itself (``robot_bags.py``, rosbags) from one 3-camera wide-yaw rig
(yaw 0 / +50 / -50 deg, a different K per camera, 4 frame sets of 64x48). The network is the bundled tiny
checkpoint on CPU at a 56 px processing size, loaded once and handed to ``fast3dis-eval``'s ``run``.
Each test asserts the exit code, the message and the numbers (docs/RELIABILITY.md, "Robot bags").
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from robot_bags import RobotBag, write_robot_bag, wide_yaw_scene

from fast3dis_ros.data.bags import read_ground_truth
from fast3dis_ros.data.camera_identity import (CameraIdentity, camera_streams, frame_base, parse_camera_map,
                                               plan_streams, stream_of_topic)

CAMS = ["front", "left", "right"]
N_FRAMES = 4
WIN = ["--window-size", "2", "--stride", "2"]


@pytest.fixture(scope="module")
def scene():
    return wide_yaw_scene(n_frames=N_FRAMES)


@pytest.fixture(scope="module")
def loaded():
    """(predictor, info) as ``build_predictor`` returns them: the bundled checkpoint at 56 px."""
    from fast3dis_ros.inference.factory import PredictorSpec, build_predictor

    return build_predictor(PredictorSpec(device="cpu", process_size=56))


@pytest.fixture(scope="module")
def predictor(loaded):
    return loaded[0]


@pytest.fixture
def eval_cli(loaded, monkeypatch):
    """``fast3dis-eval`` (``evaluate.run``) with the module's predictor instead of loading one per call."""
    import fast3dis_ros.inference.factory as factory
    from fast3dis_ros.eval.evaluate import run

    monkeypatch.setattr(factory, "build_predictor", lambda *a, **k: loaded)
    return lambda *args: run([str(a) for a in args] + WIN + ["--no-progress"])


def _summary(out) -> dict:
    return json.loads((out / "accounting.json").read_text())["summary"]


# ------------------------------------------------------------------------------------ the rule, no bags
def test_camera_identity_rule():
    ident = CameraIdentity(CAMS, parse_camera_map("rear_cam=right"))
    assert stream_of_topic("/robot/front/image_raw/compressed") == "robot/front"
    assert stream_of_topic("/front/camera_info") == "front"
    assert ident.camera_of_topic("/front/image_raw") == "front"  # stream = camera
    assert ident.camera_of_topic("/robot/front/image_raw") == "front"  # namespace understood
    assert ident.camera_of_topic("/a/b/left/image_raw/compressed") == "left"
    assert ident.camera_of_topic("/rear_cam/image_raw") == "right"  # explicit map
    assert ident.camera_of_topic("/robot/top/image_raw") is None  # matches nothing: reported by callers
    assert frame_base("/robot/front_optical_frame") == "front"
    assert ident.camera_of_frame("robot/left_link") == "left"
    assert ident.camera_of_frame("cam_7_optical_frame") is None
    ident.learn_frame("cam_7_optical_frame", "front")  # seen in a header of front's images
    assert ident.camera_of_frame("cam_7_optical_frame") == "front"
    with pytest.raises(ValueError, match="not of the form"):
        parse_camera_map("robot/front")
    with pytest.raises(ValueError, match="two cameras"):
        parse_camera_map(["a=front", "a=left"])
    with pytest.raises(ValueError, match=r"camera\(s\) \['rear'\] that are not in the cameras"):
        CameraIdentity(CAMS, {"x": "rear"})


def test_stream_plan_discovery_transport_and_ambiguity():
    img, cmp, inf = "sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage", "sensor_msgs/msg/CameraInfo"
    topics = {"/robot/front/image_raw": img, "/robot/front/image_raw/compressed": cmp,
              "/robot/front/camera_info": inf, "/robot/left/image_raw": img, "/robot/front/depth_gt": img}
    plan = plan_streams(topics, CameraIdentity())
    assert plan.cameras == ["front", "left"]  # discovery: last part of the stream when unique
    assert plan.image_topic == {"front": "/robot/front/image_raw", "left": "/robot/left/image_raw"}
    assert plan.info_topic == {"front": "/robot/front/camera_info", "left": None}
    assert plan.not_used == {"/robot/front/image_raw/compressed": "camera front reads /robot/front/image_raw (raw)"}
    assert len(plan.notes) == 1 and "--image-transport compressed to switch" in plan.notes[0]
    plan = plan_streams(topics, CameraIdentity(["front", "left"]), transport="compressed")
    assert plan.transport == {"front": "compressed", "left": "raw"}
    assert plan.notes[1] == "camera left: no compressed images; using raw /robot/left/image_raw"
    with pytest.raises(ValueError, match=r"camera 'front' has 2 raw image streams: \['/a/front/image_raw', "
                                         r"'/b/front/image_raw'\]; choose one with --image-topics"):
        plan_streams({"/a/front/image_raw": img, "/b/front/image_raw": img}, CameraIdentity(["front"]))
    # same last part in two namespaces: discovery keeps the whole stream names apart
    plan = plan_streams({"/a/front/image_raw": img, "/b/front/image_raw": img}, CameraIdentity())
    assert plan.cameras == ["a/front", "b/front"]
    assert camera_streams("robot/front=front", ["front", "left"]) == {"front": "robot/front", "left": "left"}
    with pytest.raises(ValueError, match="mapped from two streams"):
        camera_streams("a/front=front,b/front=front", ["front"])


# ------------------------------------------------------------------------------------------- bags
def test_namespaced_topics(scene, tmp_path, eval_cli, capsys):
    """/robot/<cam>/image_raw with --cameras front,left,right: every view replays and is scored."""
    bag = tmp_path / "ns"
    write_robot_bag(bag, scene, RobotBag(ns="/robot"))
    out = tmp_path / "o"
    assert eval_cli("--bag", bag, "--out", out, "--cameras", "front,left,right") == 0
    s = _summary(out)
    assert s["frame_sets"] == {"received": 4, "processed": 4, "dropped": {}}
    assert s["views"]["scored"] == 12 and s["views"]["unscored"] == 0
    assert s["cameras"]["front"].startswith("/robot/front/image_raw (raw), CameraInfo /robot/front/camera_info")
    assert s["calibration"]["mode"] == "known" and s["exit"] == {"code": 0, "reason": ""}
    printed = capsys.readouterr().out
    assert "=== what happened ===" in printed and "views scored: 12, not scored: 0" in printed
    assert "frame sets: processed 4 of 4, dropped none" in printed
    md = (out / "report.md").read_text()
    assert "## What happened" in md and "- views scored: 12, not scored: 0" in md and "| fast3dis |" in md


def test_namespaced_topics_named_by_their_stream_join_ground_truth_by_frame(scene, tmp_path):
    """The issue's ``--cameras robot/front,...``: GT poses (TF child front_optical_frame) join camera
    robot/front through the frame id seen in its image headers (no model needed)."""
    from fast3dis_ros.eval.replay import frames_from_bag, plan_bag_streams

    bag = tmp_path / "ns"
    write_robot_bag(bag, scene, RobotBag(ns="/robot"))
    cams = ["robot/front", "robot/left", "robot/right"]
    plan = plan_bag_streams(bag, cams)
    assert plan.cameras == cams
    assert sum(1 for _ in frames_from_bag(bag, cams, plan=plan)) == 12
    gt = read_ground_truth(bag, identity=plan.identity)
    assert sorted(gt.T_world_cam) == cams and sorted(gt.depth) == cams and sorted(gt.K) == cams
    assert all(len(v) == 4 for v in gt.T_world_cam.values()) and gt.unmatched == []
    # discovery (no --cameras) names them front/left/right, GT likewise
    plan = plan_bag_streams(bag)
    assert plan.cameras == CAMS
    assert sorted(read_ground_truth(bag).T_world_cam) == CAMS


def test_camera_matching_no_stream_fails_before_the_model(scene, tmp_path, capsys):
    from fast3dis_ros.eval.evaluate import run
    from fast3dis_ros.eval.replay import plan_bag_streams

    bag = tmp_path / "ns"
    write_robot_bag(bag, scene, RobotBag(ns="/robot", gt=False))
    rc = run(["--bag", str(bag), "--out", str(tmp_path / "o"), "--cameras", "front,left,rear", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no image stream for camera(s) ['rear']" in err
    assert "streams that match no camera: ['/robot/right/image_raw', '/robot/right/camera_info']" in err
    assert "image topics in the bag: ['/robot/front/image_raw', '/robot/left/image_raw', '/robot/right/image_raw']" \
        in err
    assert "--camera-map <stream>=<camera> (e.g. robot/right=rear)" in err and "Traceback" not in err
    plan = plan_bag_streams(bag, ["front", "left", "rear"], camera_map=parse_camera_map("robot/right=rear"))
    assert plan.image_topic["rear"] == "/robot/right/image_raw" and plan.unmatched == []
    assert run(["--bag", str(bag), "--out", str(tmp_path / "o"), "--camera-map", "robot/right"]) == 2
    assert "is not of the form <stream|topic|frame>=<camera>" in capsys.readouterr().err


def test_ground_truth_matching_no_camera_exits_3_and_camera_map_fixes_it(scene, tmp_path, eval_cli, capsys):
    """GT poses on TF child frames that name no camera (sensor_<cam>): nothing can be scored -> exit 3 with
    the cause and the fix; the fix (--camera-map sensor_front=front ...) scores every view."""
    bag = tmp_path / "frames"
    write_robot_bag(bag, scene, RobotBag(tf_child="sensor_{cam}"))
    out = tmp_path / "o"
    assert eval_cli("--bag", bag, "--out", out) == 3
    err = capsys.readouterr().err
    assert "no view could be scored: views of ['front', 'left', 'right'] lack GT pose" in err
    assert "GT that matches no camera: ['tf map -> sensor_front', 'tf map -> sensor_left', 'tf map -> sensor_right']" \
        in err
    assert "--camera-map <frame>=<camera>" in err
    s = _summary(out)
    assert s["views"]["scored"] == 0 and s["views"]["unscored_by_camera"]["left"] == {"no GT pose": 4}
    assert "FAILED (exit 3)" in (out / "report.md").read_text()
    rc = eval_cli("--bag", bag, "--out", out, "--camera-map", "sensor_front=front,sensor_left=left",
                  "sensor_right=right")
    assert rc == 0 and _summary(out)["views"]["scored"] == 12


def test_missing_camera_info_for_one_camera(scene, tmp_path, eval_cli, predictor, capsys, caplog):
    """left has no CameraInfo: its views get an estimated K, the others keep theirs (per view, not per
    window); GT K is missing for left, so its views are counted and named as not scored; a K in the GT JSON
    makes them scorable."""
    from fast3dis_ros.eval.evaluate import select_views
    from fast3dis_ros.eval.replay import ReplayConfig, replay_bag
    from fast3dis_ros.geometry.cameras import scale_K

    bag = tmp_path / "noinfo"
    write_robot_bag(bag, scene, RobotBag(no_info=("left",)))
    out = tmp_path / "o"
    assert eval_cli("--bag", bag, "--out", out) == 0
    s = _summary(out)
    assert s["calibration"]["mode"] == "mixed"
    assert s["calibration"]["per_camera"]["left"] == "estimated: no CameraInfo (4)"
    assert s["calibration"]["per_camera"]["front"] == "known (CameraInfo)"
    assert s["views"] == {"scored": 8, "unscored": 4, "unscored_by_camera": {"left": {"no GT K": 4}},
                          "gt_K_source": {"front": "camera_info", "right": "camera_info"}}
    assert "camera left: 4 view(s) not scored (no GT K)" in s["warnings"]
    assert ("camera left: 4 frame(s) without a usable K (no CameraInfo): the network estimates K for those views"
            in s["warnings"])
    printed = capsys.readouterr()
    assert "calibration: mixed (front: known (CameraInfo); left: estimated: no CameraInfo (4)" in printed.out
    logged = [r.getMessage() for r in caplog.records if "no CameraInfo" in r.getMessage()]
    assert logged == ["camera left: no CameraInfo: the network estimates K for its views"]  # the log, once
    # the network got the known K of front and right in every window, and estimated only left's
    res = replay_bag(bag, predictor, ReplayConfig(window_size=2, stride=2), progress=False)
    K_front = scene.frames[0][0].K
    for rec in res.records:
        p = rec.prediction
        assert p.extras["K_known"].tolist() == [True, False, True] * 2
        np.testing.assert_allclose(p.K[0], scale_K(K_front, (48, 64), p.extras["process_hw"]))
        assert np.isfinite(p.K).all() and (p.K[:, 0, 0] > 0).all()  # left: the network's own, finite estimate
        assert not np.allclose(p.K[1], scale_K(scene.frames[0][1].K, (48, 64), p.extras["process_hw"]), rtol=1e-3)
    # GT K from the GT JSON scores left as well
    gt_bag = tmp_path / "noinfo_jsonK"
    write_robot_bag(gt_bag, scene, RobotBag(no_info=("left",), gt_json_K=True))
    gt = read_ground_truth(gt_bag, identity=res.identity)
    assert gt.K_source == {"front": "camera_info", "right": "camera_info", "left": "gt_json"}
    np.testing.assert_allclose(gt.K["left"], scene.frames[0][1].K)
    assert len(select_views(res.records, gt)) == 12


def test_raw_and_compressed_for_one_camera(scene, tmp_path, eval_cli, capsys):
    """front on /front/image_raw and /front/image_raw/compressed: raw is read (said once), nothing is a
    sync drop; --image-transport compressed reads the jpeg stream instead."""
    from fast3dis_ros.eval.replay import frames_from_bag, plan_bag_streams

    bag = tmp_path / "both"
    write_robot_bag(bag, scene, RobotBag(transports={"front": ("raw", "compressed")}))
    out = tmp_path / "o"
    assert eval_cli("--bag", bag, "--out", out) == 0
    acc = json.loads((out / "accounting.json").read_text())
    assert acc["frames"]["read_per_camera"] == {"front": 4, "left": 4, "right": 4}
    assert acc["frames"]["dropped_by_sync"] == {} and acc["frame_sets"]["processed"] == 4
    assert acc["streams"]["front"]["transport"] == "raw"
    assert acc["streams_not_used"] == {"/front/image_raw/compressed": "camera front reads /front/image_raw (raw)"}
    notes = [w for w in acc["summary"]["warnings"] if "both raw and compressed" in w]
    assert notes == ["camera front: both raw and compressed images; using raw /front/image_raw, not "
                     "/front/image_raw/compressed (--image-transport compressed to switch)"]
    assert capsys.readouterr().out.count("both raw and compressed") == 1
    plan = plan_bag_streams(bag, image_transport="compressed")
    assert plan.image_topic["front"] == "/front/image_raw/compressed"
    frames = [f for f in frames_from_bag(bag, None, plan=plan) if f.camera == "front"]
    assert len(frames) == 4
    assert np.abs(frames[0].image.astype(int) - scene.frames[0][0].rgb).mean() < 6  # the jpeg, decoded


def test_half_rate_camera(scene, tmp_path, eval_cli):
    """right publishes every other frame: frame sets follow it, the others' extra frames are counted."""
    bag = tmp_path / "half"
    write_robot_bag(bag, scene, RobotBag(every={"right": 2}))
    out = tmp_path / "o"
    assert eval_cli("--bag", bag, "--out", out) == 0
    s = _summary(out)
    assert s["frames"]["per_camera"] == {"front": 4, "left": 4, "right": 2}
    assert s["frames"]["dropped_by_sync"] == {"flushed": 2, "stale": 2}
    assert s["frame_sets"]["processed"] == 2 and s["views"]["scored"] == 6
    assert ("camera right sent 2 images, others up to 4: frame sets follow the slowest camera (2 frames of the "
            "others dropped by sync as 'stale')") in s["warnings"]
    assert json.loads((out / "accounting.json").read_text())["balanced"] is True


def test_wide_yaw_rig_sqlite_mixed_encodings_jitter(scene, tmp_path, predictor):
    """The issue's main bag: sqlite3, ±50 deg yaw, a K per camera, front bgr8, left rgb8, right jpeg only,
    stamp jitter up to 16 ms, receive order != stamp order, non-consecutive instance ids: every view is
    replayed with its own K and scored."""
    from fast3dis_ros.eval.evaluate import evaluate_bag
    from fast3dis_ros.eval.replay import ReplayConfig
    from fast3dis_ros.geometry.cameras import scale_K

    bag = tmp_path / "rig"
    write_robot_bag(bag, scene, RobotBag(storage="sqlite3", encodings={"front": "bgr8"},
                                         transports={"right": ("compressed",)},
                                         offset_ns={"left": 8_000_000, "right": 16_000_000},
                                         receive_delay_ns={"front": 40_000_000}, id_scale=7))
    assert next(bag.glob("*.db3")).is_file()
    r = evaluate_bag(bag, tmp_path / "o", predictor=predictor, replay_cfg=ReplayConfig(window_size=2, stride=2),
                     progress=False)
    s = r["summary"]
    assert s["exit"]["code"] == 0 and s["calibration"]["mode"] == "known"
    assert s["frame_sets"] == {"received": 4, "processed": 4, "dropped": {}}
    assert s["views"]["scored"] == 12 and s["views"]["unscored"] == 0
    assert s["cameras"]["right"].startswith("/right/image_raw/compressed (compressed)")
    assert "camera right: no raw images; using compressed /right/image_raw/compressed" in s["warnings"]
    assert r["metrics"]["methods"]["fast3dis"]["n_gt"] > 0
    Ks = [v.K for v in scene.frames[0]]
    assert not np.allclose(Ks[0], Ks[1]) and not np.allclose(Ks[0], Ks[2])
    for rec in r["replay"].records:
        p = rec.prediction
        assert p.extras["K_known"].all()
        for v in range(6):
            np.testing.assert_allclose(p.K[v], scale_K(Ks[v % 3], (48, 64), p.extras["process_hw"]))
    # front (bgr8) reached the network as RGB
    img0 = r["replay"].records[0].prediction.images[0].astype(int)
    assert np.abs(img0.mean((0, 1)) - scene.frames[0][0].rgb.mean((0, 1))).max() < 4


def test_no_frame_set_exits_3_with_cause(scene, tmp_path, eval_cli, capsys):
    """right stamped 0.5 s off (another clock): no frame set forms -> exit 3 naming the slop and the fix."""
    bag = tmp_path / "skew"
    write_robot_bag(bag, scene, RobotBag(offset_ns={"right": 500_000_000}))
    out = tmp_path / "o"
    assert eval_cli("--bag", bag, "--out", out, "--slop-ms", "50") == 3
    err = capsys.readouterr().err
    assert "no frame set was processed: the cameras' frames never fell within --slop-ms 50 of each other" in err
    assert "Fix: raise --slop-ms, or check that all cameras stamp with the same clock" in err
    s = _summary(out)
    assert s["frame_sets"]["processed"] == 0 and sum(s["frames"]["dropped_by_sync"].values()) == 12
    assert "FAILED (exit 3)" in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------- help and logs
def test_help_lists_every_input_form(capsys):
    from fast3dis_ros.eval.evaluate import run

    with pytest.raises(SystemExit) as e:
        run(["--help"])
    assert e.value.code == 0
    h = capsys.readouterr().out
    for s in ("mcap or sqlite3", "sensor_msgs/Image", "image_raw/compressed", "--image-transport", "namespaces",
              "/robot/front/image_raw is camera 'front'", "--camera-map", "camera_info", "exit codes", "3 nothing"):
        assert s in h, s


def test_library_noise_silenced_and_kept_at_debug():
    code = ("import logging, sys\n"
            "if sys.argv[1] == 'debug': logging.basicConfig(level=logging.DEBUG, format='%(levelname)s %(name)s "
            "%(message)s')\n"
            "from fast3dis_ros.inference.predictor import Predictor\nPredictor.random_tiny(0)\n")
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "using MLP layer" not in quiet.stdout + quiet.stderr
    assert "register_new_resolver" not in quiet.stdout + quiet.stderr
    debug = subprocess.run([sys.executable, "-c", code, "debug"], capture_output=True, text=True, timeout=300)
    assert "DEBUG depth_anything_3 using MLP layer as FFN" in debug.stderr


# ------------------------------------------------------------------------------------------- node
def test_node_camera_map_parameter_and_calibration_diagnostics():
    import rclpy
    from rclpy.parameter import Parameter
    from ros_helpers import StubPredictor, unique_domain_id

    from fast3dis_ros.ros import params as P
    from fast3dis_ros.ros.node import Fast3disNode

    assert P.validate("camera_map", "robot/front=rear", {"cameras": ["front"]}) == (
        "camera_map: camera map names camera(s) ['rear'] that are not in the cameras ['front']")
    assert "not of the form" in P.validate("camera_map", "robot/front", {"cameras": ["front"]})
    ctx = rclpy.context.Context()
    rclpy.init(context=ctx, domain_id=unique_domain_id())
    node = Fast3disNode(predictor=StubPredictor(), context=ctx, parameter_overrides=[
        Parameter("cameras", value=["front", "left"]), Parameter("camera_map", value="robot/front=front")])
    try:
        topics = sorted(s.topic_name for s in node._subs)
        assert topics == ["/left/camera_info", "/left/image_raw", "/robot/front/camera_info",
                          "/robot/front/image_raw"]
        assert node.diag.calibration() == "estimated"
        node.diag.k_status["front"] = "ok"
        assert node.diag.calibration() == "mixed (estimated: left)"
        arr = node.diag.build(node.get_clock().now().to_msg(), {}, {}, {})
        out = next(st for st in arr.status if st.name.endswith("outputs"))
        assert {kv.key: kv.value for kv in out.values}["calibration"] == "mixed (estimated: left)"
    finally:
        node.shutdown()
        node.destroy_node()
    # use_compressed: the compressed topic instead of the raw one (one transport per camera)
    node = Fast3disNode(predictor=StubPredictor(), context=ctx, parameter_overrides=[
        Parameter("cameras", value=["front"]), Parameter("use_compressed", value=True)])
    try:
        assert sorted(s.topic_name for s in node._subs) == ["/front/camera_info", "/front/image_raw/compressed"]
    finally:
        node.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
