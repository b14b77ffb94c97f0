"""``fast3dis-play`` (ros/player.py) as its own process over loopback DDS, on a bag this test writes with
rosbags: recorded bytes and stamps, recorded QoS (a transient-local topic reaches a late subscriber),
/clock in bag time, ``--topics``, ``--start-offset``, ``--rate``, ``--loop``, and clear failures."""

import time

import numpy as np
import pytest
from ros_helpers import RosContext, RosProcess, require_ros_tools, unique_domain_id

require_ros_tools("rosidl_runtime_py")

S = 1_000_000_000
T0 = 1_700_000_000 * S
N = 10  # messages on /chatter, 10 Hz


def _qos(reliability, durability, depth=1):
    from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

    z = QosTime(0, 0)
    return Qos(QosHistory.KEEP_LAST, depth, QosReliability(reliability), QosDurability(durability), z, z,
               QosLiveliness.AUTOMATIC, z, False)


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    """/chatter (String, 10 Hz, data = its index), /image (Image with header stamps), /latched (String,
    recorded transient local + reliable), /opaque (a type no Python here has)."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    ts.register(get_types_from_msg("int32 x", "nowhere_msgs/msg/Opaque"))
    String, Image, Header, Time = (ts.types[t] for t in ("std_msgs/msg/String", "sensor_msgs/msg/Image",
                                                          "std_msgs/msg/Header", "builtin_interfaces/msg/Time"))
    path = tmp_path_factory.mktemp("play") / "bag"
    with Writer(path, version=9) as w:
        chatter = w.add_connection("/chatter", "std_msgs/msg/String", typestore=ts,
                                   offered_qos_profiles=[_qos(1, 2, 10)])
        image = w.add_connection("/image", "sensor_msgs/msg/Image", typestore=ts)
        latched = w.add_connection("/latched", "std_msgs/msg/String", typestore=ts,
                                   offered_qos_profiles=[_qos(1, 1, 1)])
        opaque = w.add_connection("/opaque", "nowhere_msgs/msg/Opaque", typestore=ts)
        w.write(latched, T0, ts.serialize_cdr(String(data="static"), "std_msgs/msg/String"))
        w.write(opaque, T0, ts.serialize_cdr(ts.types["nowhere_msgs/msg/Opaque"](x=1), "nowhere_msgs/msg/Opaque"))
        for k in range(N):
            t = T0 + k * S // 10
            w.write(chatter, t, ts.serialize_cdr(String(data=str(k)), "std_msgs/msg/String"))
            img = Image(header=Header(stamp=Time(sec=t // S, nanosec=t % S), frame_id="cam"), height=2, width=3,
                        encoding="rgb8", is_bigendian=0, step=9, data=np.arange(18, dtype=np.uint8) + k)
            w.write(image, t, ts.serialize_cdr(img, "sensor_msgs/msg/Image"))
    return path


def _play(bag, dom, *args):
    return RosProcess(["-m", "fast3dis_ros.ros.player", str(bag), *args], dom, name="fast3dis_play")


def _subscribe(ctx, got, latched_late=False):
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    q = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    n = ctx.node
    n.create_subscription(String, "/chatter", lambda m: got["chatter"].append((time.monotonic(), m.data)), q)
    n.create_subscription(Image, "/image", got["image"].append, q)
    n.create_subscription(Clock, "/clock", got["clock"].append, QoSProfile(depth=100))
    if not latched_late:
        n.create_subscription(String, "/latched", got["latched"].append,
                              QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))


def _ns(stamp):
    return stamp.sec * S + stamp.nanosec


@pytest.mark.timeout(90)
def test_plays_bytes_stamps_qos_and_clock(bag):
    from rclpy.qos import DurabilityPolicy, QoSProfile
    from std_msgs.msg import String

    dom = unique_domain_id()
    got = {"chatter": [], "image": [], "clock": [], "latched": []}
    with RosContext(dom) as ctx:
        _subscribe(ctx, got, latched_late=True)
        with _play(bag, dom, "--rate", "2.0", "--wait-for", "/chatter", "/image") as p:
            ok = ctx.spin_until(lambda: len(got["chatter"]) == N and len(got["image"]) == N or not p.alive(), 40)
            ctx.spin_for(0.3)
            # a subscriber that joins after the transient-local message was sent still gets it
            ctx.node.create_subscription(String, "/latched", got["latched"].append,
                                         QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL))
            ctx.spin_until(lambda: bool(got["latched"]), 10)
            out = p.output()
            p.proc.wait(30)
        assert ok, out
    assert p.proc.returncode == 0, out
    assert [d for _, d in got["chatter"]] == [str(k) for k in range(N)]
    for k, img in enumerate(got["image"]):  # recorded bytes: header stamps and data as written
        assert _ns(img.header.stamp) == T0 + k * S // 10 and img.header.frame_id == "cam"
        np.testing.assert_array_equal(np.frombuffer(bytes(img.data), np.uint8), np.arange(18, dtype=np.uint8) + k)
    assert [m.data for m in got["latched"]] == ["static"]
    # --rate 2: 0.9 s of bag in ~0.45 s of wall time
    span = got["chatter"][-1][0] - got["chatter"][0][0]
    assert 0.3 < span < 0.9, span
    clocks = [_ns(c.clock) for c in got["clock"]]
    assert clocks == sorted(clocks) and T0 <= clocks[0] and clocks[-1] == T0 + (N - 1) * S // 10
    assert "/opaque: skipped, message type nowhere_msgs/msg/Opaque not installed" in out, out


@pytest.mark.timeout(90)
def test_topics_start_offset_and_loop(bag):
    dom = unique_domain_id()
    got = {"chatter": [], "image": [], "clock": [], "latched": []}
    with RosContext(dom) as ctx:
        _subscribe(ctx, got)
        with _play(bag, dom, "--topics", "/chatter", "--start-offset", "0.5", "--loop", "--rate", "4",
                   "--wait-for", "/chatter") as p:
            ok = ctx.spin_until(lambda: len(got["chatter"]) >= 12 or not p.alive(), 40)
            out = p.output()
        assert ok, out
    data = [d for _, d in got["chatter"]]
    assert data[:10] == ["5", "6", "7", "8", "9"] * 2  # from 0.5 s on, played again from there
    assert not got["image"] and not got["latched"]  # --topics: nothing else
    clocks = [_ns(c.clock) for c in got["clock"]]
    assert min(clocks) >= T0 + 5 * S // 10 and any(b < a for a, b in zip(clocks, clocks[1:]))  # loop: jumps back


def test_bad_inputs_fail_clearly(tmp_path, bag):
    dom = unique_domain_id()
    with _play(tmp_path / "missing", dom) as p:
        p.proc.wait(60)
    assert p.proc.returncode == 2 and "cannot open rosbag2" in p.output(), p.output()
    with _play(bag, dom, "--topics", "/opaque") as p:
        p.proc.wait(60)
    assert p.proc.returncode == 1 and "nothing to play" in p.output(), p.output()
    with _play(bag, dom, "--rate", "0") as p:
        p.proc.wait(60)
    assert p.proc.returncode == 2 and "--rate must be > 0" in p.output(), p.output()
