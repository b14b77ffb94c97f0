"""The managed node over real DDS (issue 20): lifecycle transitions through the standard
lifecycle_msgs services, the map services (fast3dis_msgs/srv) and their bad requests, latched outputs
for late subscribers, qos_overrides, run-time parameters, diagnostics and namespaces.

The node runs in this process in its own context (its own DDS participant, multi-threaded executor);
the test talks to it only through DDS from a second context. Its predictor is scripted (a known
two-object scene, optionally slow) so the answers can be checked exactly; the real network is covered by
test_node_dds.py and by test_lifecycle_process.py (the fast3dis_node executable)."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("fast3dis_msgs.srv")

from lifecycle_helpers import CAMS, Client, LifecycleNodeThread, ScriptedPredictor  # noqa: E402
from ros_helpers import RosContext, unique_domain_id  # noqa: E402


def latched_sub(ctx, typ, topic, got: list, transient: bool = True):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    q = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                   durability=DurabilityPolicy.TRANSIENT_LOCAL if transient else DurabilityPolicy.VOLATILE)
    return ctx.node.create_subscription(typ, topic, got.append, q)


def wait_instances(ctx, cl, n: int = 2, timeout: float = 40.0):
    """Publish frame sets until get_instances returns ``n`` instances; returns the response."""
    last = {}

    def ready():
        if not last.get("t") or time.monotonic() - last["t"] > 0.8:
            last["t"] = time.monotonic()
            last["r"] = cl.get_instances()
        return last["r"].success and len(last["r"].instances) >= n

    assert ctx.spin_until(ready, timeout, step=cl.pump()), f"no {n} instances: {last['r'].message}"
    return last["r"]


@pytest.mark.timeout(240)
def test_lifecycle_transitions_over_standard_services():
    """unconfigured -> configure -> activate -> deactivate -> cleanup -> shutdown, each through
    lifecycle_msgs/ChangeState, with what each state must (not) have."""
    from sensor_msgs.msg import PointCloud2

    dom = unique_domain_id()
    pred = ScriptedPredictor()
    with LifecycleNodeThread(dom, pred) as nt, RosContext(dom) as ctx:
        cl = Client(ctx)
        assert cl.get_state() == "unconfigured"
        assert not nt.node._configured and pred.calls == 0
        # start-up-only parameters are accepted while unconfigured
        from rclpy.parameter import Parameter

        assert nt.node.set_parameters([Parameter("window_size", value=3)])[0].successful
        assert cl.change_state("configure")
        assert cl.get_state() == "inactive"
        assert nt.node.p["window_size"] == 3
        assert pred.calls == 1  # the warm-up window, not fused
        assert len(nt.node.runner.fusion.map) == 0
        ctx.spin_for(1.0)
        assert cl.image_subscribers() == 0, "inactive node must not subscribe to images"
        # ... and now refused, with the reason
        r = nt.node.set_parameters([Parameter("window_size", value=2)])[0]
        assert not r.successful and "start-up only" in r.reason and "sliding window" in r.reason

        assert cl.change_state("activate")
        assert cl.get_state() == "active"
        assert ctx.spin_until(lambda: cl.image_subscribers() == len(CAMS), 20.0)
        wait_instances(ctx, cl)
        map_points = len(nt.node.runner.fusion.map)
        assert map_points > 0

        assert cl.change_state("deactivate")
        assert cl.get_state() == "inactive"
        assert ctx.spin_until(lambda: cl.image_subscribers() == 0, 20.0)
        calls = pred.calls
        for _ in range(5):
            cl.publish_set()
            ctx.spin_for(0.1)
        ctx.spin_for(1.0)
        assert pred.calls == calls, "a deactivated node must not run inference"
        # the map is kept: services answer, the latched map reaches a late subscriber
        assert len(nt.node.runner.fusion.map) == map_points
        assert len(cl.get_instances().instances) == 2
        got = []
        latched_sub(ctx, PointCloud2, "/fast3dis/instances_cloud", got)
        assert ctx.spin_until(lambda: got, 10.0) and got[-1].width > 0
        mem = nt.node.last_memory["deactivate"]
        assert mem["before"]["rss_mib"] > 0 and mem["after"]["rss_mib"] > 0

        # activate again: inference resumes on the kept map
        assert cl.change_state("activate")
        assert ctx.spin_until(lambda: pred.calls > calls, 30.0, step=cl.pump())
        assert cl.change_state("deactivate")

        assert cl.change_state("cleanup")
        assert cl.get_state() == "unconfigured"
        assert nt.node.runner is None and nt.node.predictor is None
        # the map services are gone (servers only: the test's own clients keep the names in the graph)
        assert ctx.spin_until(lambda: ctx.node.count_services("/fast3dis/get_instances") == 0
                              and ctx.node.count_services("/fast3dis/save_map") == 0, 10.0)
        assert ctx.node.count_services("/fast3dis/get_state") == 1

        # configure again after cleanup: a new, empty map
        assert cl.change_state("configure")
        assert len(nt.node.runner.fusion.map) == 0
        assert cl.change_state("shutdown")
        assert cl.get_state() == "finalized"
        assert nt.node.runner is None


@pytest.mark.timeout(120)
def test_configure_with_bad_parameters_fails_and_stays_unconfigured():
    dom = unique_domain_id()
    with LifecycleNodeThread(dom, ScriptedPredictor(), overrides={"window_size": 2, "stride": 3}) as nt, \
            RosContext(dom) as ctx:
        cl = Client(ctx)
        assert not cl.change_state("configure")
        assert cl.get_state() == "unconfigured"
        assert nt.node.runner is None
        # fixed while unconfigured, configure succeeds
        from rclpy.parameter import Parameter

        assert nt.node.set_parameters([Parameter("stride", value=1)])[0].successful
        assert cl.change_state("configure") and cl.get_state() == "inactive"


@pytest.mark.timeout(120)
def test_error_in_a_transition_goes_to_unconfigured():
    """An exception inside activate (here: the predictor cannot go back to its device) runs on_error,
    which releases everything: the node is unconfigured and can be configured again."""

    class BrokenRestore(ScriptedPredictor):
        def restore_device(self):
            raise RuntimeError("CUDA error: device lost")

    dom = unique_domain_id()
    with LifecycleNodeThread(dom, BrokenRestore()) as nt, RosContext(dom) as ctx:
        cl = Client(ctx)
        assert cl.change_state("configure")
        assert not cl.change_state("activate")
        assert cl.get_state() == "unconfigured"
        assert nt.node.runner is None and not nt.node._configured


@pytest.mark.timeout(240)
def test_map_services_over_dds(tmp_path):
    from fast3dis_msgs.msg import InstanceArray
    from geometry_msgs.msg import TransformStamped
    from pypcd4 import PointCloud
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2
    from tf2_msgs.msg import TFMessage

    from fast3dis_ros.ros.conversions import pointcloud2_to_structured

    dom = unique_domain_id()
    # support_windows 0: published scores are the scripted ones, whatever number of windows has run
    with LifecycleNodeThread(dom, ScriptedPredictor(), params={"support_windows": 0}) as nt, RosContext(dom) as ctx:
        cl = Client(ctx)
        assert cl.change_state("configure") and cl.change_state("activate")
        # a static frame 'shelf' = map shifted by +10 in x (T_shelf_map: x + 10)
        tfq = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
        tf_pub = ctx.node.create_publisher(TFMessage, "/tf_static", tfq)
        t = TransformStamped()
        t.header.frame_id, t.child_frame_id = "shelf", "map"
        t.transform.translation.x, t.transform.rotation.w = 10.0, 1.0
        tf_pub.publish(TFMessage(transforms=[t]))

        r = wait_instances(ctx, cl)
        by_score = sorted(r.instances, key=lambda i: i.score)
        low, high = by_score[0], by_score[1]
        assert abs(high.score - 0.9) < 1e-5 and abs(low.score - 0.4) < 1e-5
        assert r.header.frame_id == "map"
        # left half of the image (instance A) lies at negative x
        assert high.centroid.x < 0 < low.centroid.x

        # ----- filters
        assert [i.id for i in cl.get_instances(ids=[high.id]).instances] == [high.id]
        assert [i.id for i in cl.get_instances(min_score=0.5).instances] == [high.id]
        box = dict(use_box=True, box_min=(-5, -5, -5), box_max=(0, 5, 5))
        assert [i.id for i in cl.get_instances(**box).instances] == [high.id]
        # the same box in 'shelf' is shifted by +10: box x in [10, 15] holds the object at map x > 0
        sb = cl.get_instances(use_box=True, box_frame="shelf", box_min=(10, -5, -5), box_max=(15, 5, 5))
        assert sb.success, sb.message
        assert [i.id for i in sb.instances] == [low.id]
        wp = cl.get_instances(ids=[low.id], with_points=True)
        arr = pointcloud2_to_structured(wp.points)
        assert len(arr) == wp.instances[0].num_points > 0 and set(arr["instance"].tolist()) == {low.id}

        # ----- bad requests: error response, node and map untouched
        n_map = len(nt.node.runner.fusion.map)
        bad = [
            (cl.get_instances(ids=[9999]), "unknown instance id(s) [9999]"),
            (cl.get_instances(use_box=True, box_min=(1, 0, 0), box_max=(0, 1, 1)), "box min > max along x"),
            (cl.get_instances(use_box=True, box_frame="no_such_frame", box_min=(0, 0, 0), box_max=(1, 1, 1)),
             "unknown frame 'no_such_frame'"),
            (cl.save_map(str(tmp_path / "nodir" / "m.pcd")), "does not exist"),
            (cl.save_map("/proc/fast3dis_map.pcd"), "cannot write '/proc/fast3dis_map.pcd'"),
            (cl.save_map("relative.ply"), "not absolute"),
            (cl.save_map(str(tmp_path / "m.txt")), "unknown extension"),
            (cl.save_map(str(tmp_path / "m.pcd"), frame_id="no_such_frame"), "unknown frame 'no_such_frame'"),
        ]
        for res, why in bad:
            assert not res.success and why in res.message, (why, res.message)
        assert os.listdir(tmp_path) == []
        assert len(nt.node.runner.fusion.map) >= n_map > 0

        # ----- save: PCD (read back with pypcd4) + one file per instance, PLY in another frame
        s = cl.save_map(str(tmp_path / "room.pcd"), per_instance=True)
        assert s.success, s.message
        assert s.files[0] == str(tmp_path / "room.pcd") and len(s.files) == 3
        pc = PointCloud.from_path(tmp_path / "room.pcd")
        assert "instance" in pc.fields and pc.points == s.num_points
        inst = pc.numpy()[:, pc.fields.index("instance")].astype(np.uint32)
        assert set(inst.tolist()) >= {high.id, low.id}
        one = PointCloud.from_path(tmp_path / f"room_instance_{high.id}.pcd")
        assert set(one.numpy()[:, one.fields.index("instance")].astype(np.uint32).tolist()) == {high.id}
        xs_map = pc.numpy()[:, 0]
        s2 = cl.save_map(str(tmp_path / "room_shelf.ply"), frame_id="shelf")
        assert s2.success, s2.message
        data = (tmp_path / "room_shelf.ply").read_bytes()
        assert b"frame shelf" in data[:400]
        # points in 'shelf' are map points + 10 in x (the map may have grown in between: compare ranges)
        assert abs(np.min(xs_map) + 10.0 - _ply_min_x(data)) < 0.5

        # ----- reset: empty map everywhere (services, latched topics), new ids from the next windows
        rr = cl.reset_map()
        assert rr.success and rr.points_cleared > 0 and rr.instances_cleared >= 2
        e = cl.get_instances()
        assert not e.success and "map is empty" in e.message
        es = cl.save_map(str(tmp_path / "after_reset.ply"))
        assert not es.success and "empty" in es.message and not (tmp_path / "after_reset.ply").exists()
        got_map, got_inst = [], []
        latched_sub(ctx, PointCloud2, "/fast3dis/instances_cloud", got_map)
        latched_sub(ctx, InstanceArray, "/fast3dis/instances", got_inst)
        assert ctx.spin_until(lambda: got_map and got_inst, 10.0)
        # the late subscriber sees the cleared state (unless a new window already came: then a small map)
        assert got_map[-1].width < n_map
        # the node goes on with a new map
        wait_instances(ctx, cl)
        # diagnostics list the calls and the state
        from diagnostic_msgs.msg import DiagnosticArray

        diags = []
        ctx.node.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 10)
        assert ctx.spin_until(lambda: any(st.name == "fast3dis: interface" for d in diags for st in d.status), 10)
        st = next(st for d in reversed(diags) for st in d.status if st.name == "fast3dis: interface")
        kv = {v.key: v.value for v in st.values}
        assert kv["lifecycle_state"] == "active"
        assert kv["call_0"].startswith("get_instances ok")
        assert any(v.startswith("reset_map ok") for k, v in kv.items() if k.startswith("call_"))


def _ply_min_x(data: bytes) -> float:
    end = data.index(b"end_header\n") + len(b"end_header\n")
    n = int(next(ln.split()[2] for ln in data[:end].decode().splitlines() if ln.startswith("element vertex")))
    dt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1"),
                   ("instance", "<u4"), ("score", "<f4")])
    return float(np.frombuffer(data, dt, count=n, offset=end)["x"].min())


@pytest.mark.timeout(180)
def test_services_answer_while_inference_runs():
    """Each window takes 2 s in predict; get_instances, save_map and a lifecycle get_state are answered
    within 0.5 s while a window is being predicted."""
    from fast3dis_msgs.srv import GetInstances
    from lifecycle_msgs.srv import GetState

    dom = unique_domain_id()
    pred = ScriptedPredictor()
    with LifecycleNodeThread(dom, pred) as nt, RosContext(dom) as ctx:
        cl = Client(ctx)
        assert cl.change_state("configure") and cl.change_state("activate")
        wait_instances(ctx, cl)
        pred.delay_s = 2.0
        assert ctx.spin_until(pred.busy.is_set, 20.0, step=cl.pump(0.1)), "no window reached the predictor"
        res, dt = cl.call(GetInstances, "/fast3dis/get_instances", GetInstances.Request())
        busy_after = pred.busy.is_set()
        assert res.success and len(res.instances) == 2
        assert dt < 0.5 and busy_after, f"answer took {dt:.2f} s (predictor busy at answer: {busy_after})"
        _, dt2 = cl.call(GetState, "/fast3dis/get_state", GetState.Request())
        assert dt2 < 0.5, dt2
        assert nt.node.runner.engine.stats()["processed"] >= 1


@pytest.mark.timeout(180)
def test_late_subscriber_gets_latched_map_but_not_the_window_cloud():
    from fast3dis_msgs.msg import InstanceArray
    from sensor_msgs.msg import PointCloud2
    from visualization_msgs.msg import MarkerArray

    dom = unique_domain_id()
    with LifecycleNodeThread(dom, ScriptedPredictor()) as nt, RosContext(dom) as ctx:
        cl = Client(ctx)
        assert cl.change_state("configure") and cl.change_state("activate")
        wait_instances(ctx, cl)
        assert cl.change_state("deactivate")  # no new window from now on
        ctx.spin_for(0.5)
        last_maps = nt.node.diag.maps_published
        got = {k: [] for k in ("map", "inst", "markers", "window")}
        latched_sub(ctx, PointCloud2, "/fast3dis/instances_cloud", got["map"])
        latched_sub(ctx, InstanceArray, "/fast3dis/instances", got["inst"])
        latched_sub(ctx, MarkerArray, "/fast3dis/markers", got["markers"])
        latched_sub(ctx, PointCloud2, "/fast3dis/window_cloud", got["window"])
        # a subscriber with RViz's default (volatile) durability gets it as well
        vol = []
        latched_sub(ctx, PointCloud2, "/fast3dis/instances_cloud", vol, transient=False)
        assert ctx.spin_until(lambda: got["map"] and got["inst"] and got["markers"], 10.0), \
            {k: len(v) for k, v in got.items()}
        ctx.spin_for(1.0)
        assert nt.node.diag.maps_published == last_maps, "the map must come from the DDS cache, not a new window"
        assert got["map"][-1].width == len(nt.node.runner.fusion.map)
        assert len(got["inst"][-1].instances) == 2
        assert got["window"] == [], "the window cloud is volatile"
        assert vol == [], "a volatile subscriber joining late gets no history (latching needs transient local)"
        # the QoS as offered on the graph
        from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

        info = {i.node_name: i.qos_profile for i in ctx.node.get_publishers_info_by_topic("/fast3dis/instances_cloud")}
        assert info["fast3dis"].durability == DurabilityPolicy.TRANSIENT_LOCAL
        assert info["fast3dis"].reliability == ReliabilityPolicy.RELIABLE
        winfo = ctx.node.get_publishers_info_by_topic("/fast3dis/window_cloud")[0].qos_profile
        assert winfo.durability == DurabilityPolicy.VOLATILE
        sinfo = ctx.node.get_subscriptions_info_by_topic("/left/image_raw")
        assert sinfo == [] or sinfo[0].qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT


@pytest.mark.timeout(120)
def test_qos_overrides_parameters():
    from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

    dom = unique_domain_id()
    ov = {"qos_overrides./fast3dis/instances_cloud.publisher.durability": "volatile",
          "qos_overrides./left/image_raw.subscription.reliability": "reliable"}
    with LifecycleNodeThread(dom, ScriptedPredictor(), overrides=ov) as nt, RosContext(dom) as ctx:
        cl = Client(ctx)
        assert cl.change_state("configure") and cl.change_state("activate")
        ctx.spin_until(lambda: ctx.node.get_subscriptions_info_by_topic("/left/image_raw"), 10.0)
        pinfo = ctx.node.get_publishers_info_by_topic("/fast3dis/instances_cloud")[0].qos_profile
        assert pinfo.durability == DurabilityPolicy.VOLATILE
        sinfo = {i.node_name: i.qos_profile for i in ctx.node.get_subscriptions_info_by_topic("/left/image_raw")}
        assert sinfo["fast3dis"].reliability == ReliabilityPolicy.RELIABLE
        rinfo = {i.node_name: i.qos_profile for i in ctx.node.get_subscriptions_info_by_topic("/right/image_raw")}
        assert rinfo["fast3dis"].reliability == ReliabilityPolicy.BEST_EFFORT
        # markers keep the default (latched)
        minfo = ctx.node.get_publishers_info_by_topic("/fast3dis/markers")[0].qos_profile
        assert minfo.durability == DurabilityPolicy.TRANSIENT_LOCAL
        assert nt.node.get_parameter("qos_overrides./fast3dis/markers.publisher.durability").value == "transient_local"


@pytest.mark.timeout(120)
def test_runtime_parameters_apply_or_are_refused_with_reason():
    from rclpy.parameter import Parameter

    from fast3dis_ros.ros import params as P
    from fast3dis_ros.ros.runtime_params import RUNTIME, START_UP_REASON

    # every parameter is either changeable at run time or has a reason to refuse
    assert RUNTIME | set(START_UP_REASON) == {p.name for p in P.PARAMS}
    assert not RUNTIME & set(START_UP_REASON)
    dom = unique_domain_id()
    with LifecycleNodeThread(dom, ScriptedPredictor()) as nt, RosContext(dom) as ctx:
        cl = Client(ctx)
        assert cl.change_state("configure") and cl.change_state("activate")
        n = nt.node
        ok = n.set_parameters([Parameter("score_threshold", value=0.3), Parameter("max_points_per_view", value=77),
                               Parameter("publish_tf", value=True), Parameter("diagnostics_period", value=0.7),
                               Parameter("use_known_intrinsics", value=False)])
        assert all(r.successful for r in ok), [r.reason for r in ok]
        assert n.runner.fusion.min_score == 0.3 and n.runner.fusion.max_points_per_view == 77
        assert n.tf is not None and n.p["use_known_intrinsics"] is False
        assert abs(n._diag_timer.timer_period_ns - 0.7e9) < 1e3
        for name, value, what in (("voxel_size", 0.1, "voxel grid"), ("cameras", ["a"], "subscriptions"),
                                  ("map_frame", "odom", "frame of the map")):
            r = n.set_parameters([Parameter(name, value=value)])[0]
            assert not r.successful and f"{name} is start-up only" in r.reason and what in r.reason, r.reason
            assert "ros2 lifecycle set" in r.reason
        # out of range is refused with the range even for run-time parameters
        r = n.set_parameters([Parameter("score_threshold", value=2.0)])[0]
        assert not r.successful and "out of range" in r.reason


@pytest.mark.timeout(180)
def test_two_namespaces_on_one_domain_do_not_cross():
    from sensor_msgs.msg import PointCloud2

    dom = unique_domain_id()
    with LifecycleNodeThread(dom, ScriptedPredictor(), namespace="robot1") as n1, \
            LifecycleNodeThread(dom, ScriptedPredictor(), namespace="robot2") as n2, RosContext(dom) as ctx:
        c1, c2 = Client(ctx, "/robot1"), Client(ctx, "/robot2")
        for c in (c1, c2):
            assert c.change_state("configure") and c.change_state("activate")
        got1, got2, got_root = [], [], []
        latched_sub(ctx, PointCloud2, "/robot1/fast3dis/instances_cloud", got1)
        latched_sub(ctx, PointCloud2, "/robot2/fast3dis/instances_cloud", got2)
        latched_sub(ctx, PointCloud2, "/fast3dis/instances_cloud", got_root)
        assert ctx.spin_until(lambda: c1.image_subscribers() == 2 and c2.image_subscribers() == 2, 20.0)
        # frames for robot1 only
        assert ctx.spin_until(lambda: got1 and got1[-1].width > 0, 40.0, step=c1.pump())
        ctx.spin_for(1.0)
        assert n2.node.predictor.calls == 1, "robot2 ran inference on robot1's images"  # warm-up only
        assert len(n2.node.runner.fusion.map) == 0 and got_root == []
        assert got2 == [], "robot2 published a map without input"
        topics = {t for t, _ in ctx.node.get_topic_names_and_types()}
        assert {"/robot1/left/image_raw", "/robot2/left/image_raw", "/robot1/fast3dis/instances",
                "/robot2/fast3dis/instances"} <= topics
        # nothing at the root namespace but the test's own probe subscription
        assert [t for t in topics if t.startswith("/fast3dis/") or t.startswith("/left/")] == \
            ["/fast3dis/instances_cloud"], sorted(topics)
        assert ctx.node.count_publishers("/fast3dis/instances_cloud") == 0
        assert not c2.get_instances().success  # robot2's map is empty
        assert c1.get_instances().success


@pytest.mark.timeout(120)
def test_result_fused_before_a_reset_is_not_published_after_it():
    """The engine fused a window (its epoch is recorded under the fusion lock), then ~/reset_map ran, then
    the engine reaches _on_fusion with that window's result: it must not bring the old map back."""
    from types import SimpleNamespace

    from sensor_msgs.msg import PointCloud2

    from fast3dis_ros.core.frames import InstanceSummary
    from test_map_io import make_cloud

    dom = unique_domain_id()
    with LifecycleNodeThread(dom, ScriptedPredictor()) as nt, RosContext(dom) as ctx:
        n = nt.node
        n.trigger_configure()
        old = SimpleNamespace(stamp_ns=5, window_index=0, map_cloud=make_cloud(),
                              instances=[InstanceSummary(3, 0.9, np.zeros(3), -np.ones(3), np.ones(3), 10, 2)])
        n._on_window(SimpleNamespace(window_cloud=make_cloud(), stamp_ns=5, window_index=0), None)  # epoch seen
        cl = Client(ctx)
        assert cl.reset_map().success
        n._on_fusion(old, None)  # the stale result arrives after the reset
        assert n.map_services.snapshot().instances == []
        got = []
        latched_sub(ctx, PointCloud2, "/fast3dis/instances_cloud", got)
        assert ctx.spin_until(lambda: got, 10.0)
        ctx.spin_for(0.5)
        assert got[-1].width == 0
        # a result of a window fused after the reset goes out as usual
        n._on_window(SimpleNamespace(window_cloud=make_cloud(), stamp_ns=6, window_index=1), None)
        n._on_fusion(SimpleNamespace(**{**vars(old), "stamp_ns": 6, "window_index": 1}), None)
        assert [s.id for s in n.map_services.snapshot().instances] == [3]


@pytest.mark.timeout(120)
def test_a_failing_handler_answers_internal_error_and_the_node_goes_on():
    """A bug inside a service handler (here: a snapshot without a cloud) becomes an error response; the
    executor keeps running and the next call is answered."""
    from fast3dis_ros.core.frames import InstanceSummary

    dom = unique_domain_id()
    with LifecycleNodeThread(dom, ScriptedPredictor()) as nt, RosContext(dom) as ctx:
        n = nt.node
        n.trigger_configure()
        n.map_services.update(None, [InstanceSummary(3, 0.9, np.zeros(3), -np.ones(3), np.ones(3), 10, 2)], 5)
        cl = Client(ctx)
        r = cl.get_instances(with_points=True)
        assert not r.success and r.message.startswith("internal error: AttributeError")
        r = cl.get_instances()
        assert r.success and [i.id for i in r.instances] == [3]
        assert nt.error is None and nt.thread.is_alive()
