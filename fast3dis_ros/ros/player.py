"""``fast3dis-play BAG``: replay a rosbag2 over DDS without rosbag2 (pure Python: rosbags + rclpy).

Why: ``ros2 bag`` (rosbag2, C++ with storage plugins) is not on PyPI, so a venv cannot ``ros2 bag play``.
This player covers what the node needs from it:

- every topic (or those of ``--topics``) is published with the bag's own serialized bytes, so header
  stamps and contents are exactly as recorded;
- each publisher uses the QoS the recorder saw offered (reliability, durability, history depth: as
  rosbag2 does, reliable/transient-local only when every recorded publisher offered it; default:
  reliable, volatile, depth 10);
- ``/clock`` (rosgraph_msgs/Clock) carries the bag time, published before each message and every
  ``1/--clock-hz`` s, so nodes with ``use_sim_time:=true`` follow the bag;
- ``--rate`` scales the timing, ``--start-offset`` skips the first seconds of the bag, ``--loop``
  starts over (bag time then jumps back: the node's synchroniser resets on that), ``--wait-for`` holds
  playback until the given topics have a subscriber (e.g. a node still loading its model).

Messages whose type is not installed in this Python are skipped with one warning per topic.
Exit status: 0 after playing, 1 when nothing could be played (no readable topic), 2 on a bad bag.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PlayOptions", "BagPlayer", "qos_from_offered", "main"]


@dataclass
class PlayOptions:
    bag: str
    rate: float = 1.0
    loop: bool = False
    topics: list[str] | None = None
    start_offset_s: float = 0.0
    clock: bool = True
    clock_hz: float = 40.0
    wait_for: list[str] | None = None
    wait_timeout_s: float = 60.0


def qos_from_offered(offered):
    """The QoS to play a topic with, from rosbags' ``offered_qos_profiles`` (list of ``Qos``).

    As rosbag2's player: best effort if any recorded publisher was, transient local only if every one was;
    depth the largest recorded keep-last depth (at least 10). No profile: reliable, volatile, depth 10."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    def v(x) -> int:  # rosbags' QoS enums (QosReliability ...) are plain Enums of the rmw values
        return int(getattr(x, "value", x))

    offered = list(offered or [])
    reliable = not any(v(q.reliability) == 2 for q in offered)  # 2: best effort (0: system default)
    latched = all(v(q.durability) == 1 for q in offered) if offered else False  # 1: transient local
    depth = max([10] + [v(q.depth) for q in offered if v(q.history) in (0, 1) and v(q.depth) > 0])
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


class BagPlayer:
    """Publishes one bag's messages on ``node`` in recorded order and timing (see the module doc)."""

    def __init__(self, node, opts: PlayOptions, log=print):
        from rosbags.rosbag2 import Reader

        self.node, self.opts, self.log = node, opts, log
        self.path = Path(opts.bag)
        if self.path.is_file():
            self.path = self.path.parent
        try:
            self.reader = Reader(self.path)
            self.reader.open()
        except Exception as e:  # noqa: BLE001 - every reader failure is one clear error
            raise ValueError(f"{opts.bag}: cannot open rosbag2 ({type(e).__name__}: {e})") from e
        self.published: dict[str, int] = {}
        self.skipped: dict[str, str] = {}
        self._pubs: dict[int, object] = {}  # connection id -> publisher
        self._by_topic: dict[str, object] = {}
        wanted = set(opts.topics) if opts.topics else None
        unknown = sorted(wanted - {c.topic for c in self.reader.connections}) if wanted else []
        if unknown:
            self.log(f"[fast3dis-play] topics not in the bag (ignored): {unknown}")
        from rosidl_runtime_py.utilities import get_message

        for conn in self.reader.connections:
            if wanted is not None and conn.topic not in wanted:
                continue
            pub = self._by_topic.get(conn.topic)
            if pub is None:
                try:
                    msg_type = get_message(conn.msgtype)
                except (AttributeError, ModuleNotFoundError, ValueError) as e:
                    self.skipped[conn.topic] = f"message type {conn.msgtype} not installed ({e})"
                    self.log(f"[fast3dis-play] {conn.topic}: skipped, {self.skipped[conn.topic]}")
                    continue
                offered = getattr(getattr(conn, "ext", None), "offered_qos_profiles", None)
                pub = node.create_publisher(msg_type, conn.topic, qos_from_offered(offered))
                self._by_topic[conn.topic] = pub
                self.published[conn.topic] = 0
            self._pubs[conn.id] = pub
        self._clock_pub = None
        if opts.clock:
            from rclpy.qos import QoSProfile
            from rosgraph_msgs.msg import Clock

            self._clock_type = Clock
            self._clock_pub = node.create_publisher(Clock, "/clock", QoSProfile(depth=10))
        self.start_ns = int(self.reader.start_time)
        self.end_ns = int(self.reader.end_time)
        self.loops = 0

    def close(self) -> None:
        try:
            self.reader.close()
        except Exception:  # noqa: BLE001
            pass

    def _publish_clock(self, bag_ns: int) -> None:
        if self._clock_pub is not None:
            from builtin_interfaces.msg import Time

            self._clock_pub.publish(self._clock_type(clock=Time(sec=bag_ns // 1_000_000_000,
                                                               nanosec=bag_ns % 1_000_000_000)))

    def wait_for_subscribers(self) -> bool:
        """Hold until every ``--wait-for`` topic has a subscriber (True), or the timeout passed (False)."""
        topics = list(self.opts.wait_for or [])
        if not topics:
            return True
        missing = [t for t in topics if t not in self._by_topic]
        if missing:
            self.log(f"[fast3dis-play] --wait-for topics that are not played (ignored): {missing}")
        pubs = [self._by_topic[t] for t in topics if t in self._by_topic]
        end = time.monotonic() + self.opts.wait_timeout_s
        while time.monotonic() < end:
            if all(p.get_subscription_count() > 0 for p in pubs):
                return True
            time.sleep(0.05)
        late = [t for t in topics if t in self._by_topic and self._by_topic[t].get_subscription_count() == 0]
        self.log(f"[fast3dis-play] no subscriber on {late} after {self.opts.wait_timeout_s:.0f} s: playing anyway")
        return False

    def play_once(self, should_stop=lambda: False) -> int:
        """One pass over the bag; returns the number of messages published."""
        rate = float(self.opts.rate)
        first = self.start_ns + int(self.opts.start_offset_s * 1e9)
        wall0 = time.monotonic()
        clock_period = 1.0 / self.opts.clock_hz if self.opts.clock_hz > 0 else float("inf")
        next_clock = wall0
        n = 0
        conns = [c for c in self.reader.connections if c.id in self._pubs]
        for conn, t, raw in self.reader.messages(connections=conns, start=first):
            due = wall0 + (t - first) / 1e9 / rate
            while True:
                if should_stop():
                    return n
                now = time.monotonic()
                if now >= due:
                    break
                if now >= next_clock:  # /clock keeps moving between messages
                    self._publish_clock(first + int((now - wall0) * rate * 1e9))
                    next_clock = now + clock_period
                time.sleep(min(due - now, clock_period, 0.05))
            self._publish_clock(int(t))
            self._pubs[conn.id].publish(bytes(raw))
            self.published[conn.topic] += 1
            n += 1
        return n

    def play(self, should_stop=lambda: False) -> int:
        total = 0
        while True:
            total += self.play_once(should_stop)
            self.loops += 1
            if not self.opts.loop or should_stop():
                return total


def parse_args(argv: list[str]) -> PlayOptions:
    ap = argparse.ArgumentParser(prog="fast3dis-play", description=__doc__.split("\n\n")[0])
    ap.add_argument("bag", help="rosbag2 folder (mcap or sqlite3) or a file inside it")
    ap.add_argument("--rate", type=float, default=1.0, help="playback rate factor (default 1.0)")
    ap.add_argument("--loop", action="store_true", help="play the bag again and again")
    ap.add_argument("--topics", nargs="+", default=None, help="play only these topics")
    ap.add_argument("--start-offset", type=float, default=0.0, help="start this many seconds into the bag")
    ap.add_argument("--no-clock", action="store_true", help="do not publish /clock")
    ap.add_argument("--clock-hz", type=float, default=40.0, help="/clock rate between messages (default 40)")
    ap.add_argument("--wait-for", nargs="+", default=None, metavar="TOPIC",
                    help="before playing, wait until these topics have a subscriber")
    ap.add_argument("--wait-timeout", type=float, default=60.0, help="longest wait of --wait-for [s]")
    a = ap.parse_args(argv)
    if a.rate <= 0:
        ap.error(f"--rate must be > 0, got {a.rate}")
    if a.start_offset < 0:
        ap.error(f"--start-offset must be >= 0, got {a.start_offset}")
    return PlayOptions(a.bag, a.rate, a.loop, a.topics, a.start_offset, not a.no_clock, a.clock_hz, a.wait_for,
                       a.wait_timeout)


def main(argv: list[str] | None = None) -> int:
    import rclpy
    from rclpy.utilities import remove_ros_args

    argv = sys.argv if argv is None else argv
    opts = parse_args(remove_ros_args(argv)[1:])
    rclpy.init(args=argv)
    node = rclpy.create_node("fast3dis_play")
    player = None
    try:
        try:
            player = BagPlayer(node, opts, log=lambda m: node.get_logger().info(m))
        except ValueError as e:
            node.get_logger().fatal(str(e))
            return 2
        if not player.published:
            node.get_logger().fatal(f"{opts.bag}: nothing to play ({player.skipped or 'no matching topic'})")
            return 1
        player.wait_for_subscribers()
        t0 = time.monotonic()
        n = player.play(should_stop=lambda: not rclpy.ok())
        node.get_logger().info(
            f"played {n} messages of {len(player.published)} topics in {time.monotonic() - t0:.1f} s "
            f"(rate {opts.rate}, {player.loops} pass(es)): {player.published}")
        time.sleep(0.5)  # let reliable writers hand the last messages over before the process ends
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if player is not None:
            player.close()
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())
