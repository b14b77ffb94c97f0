"""Which camera a stream belongs to: one rule for images, CameraInfo, ground truth and TF frames.

Robot bags name the same camera in several ways: the topic (``/front/image_raw``, or namespaced
``/robot/front/image_raw``), the header ``frame_id`` (``front_optical_frame``, ``robot/front_link``), and
the TF child frame of its pose. If each reader derived a name on its own, a namespaced bag gives camera
``robot/front`` from the topic and ``front`` from TF, and nothing joins (issue 19). Everything that needs a
camera name (``data/bags.py`` ground truth, ``eval/replay.py``, the node's topics) asks this module.

The rule, first match wins:

1. **explicit map** (``--camera-map robot/front=front``, node parameter ``camera_map``): the key is a stream
   (topic without its ``image_raw``/``camera_info``/... suffix), a whole topic, or a frame id;
2. **the stream name** equals a camera name (``/front/image_raw`` -> ``front``);
3. **namespaces understood**: the longest trailing part of the stream that is a camera name
   (``/robot/front/image_raw`` -> ``front``);
4. for a frame id (TF, headers): a frame seen in the header of one camera's images or CameraInfo
   (:meth:`CameraIdentity.learn_frame`), else the frame's last part without ``_optical_frame``, ``_optical``,
   ``_frame``, ``_link`` (``robot/front_optical_frame`` -> ``front``) when that is a camera name.

Without configured cameras (discovery), each image stream names a camera by its last part (``front``) when
that is unique among the bag's image streams, else by its whole stream name (``robot/front``).

A stream that matches no camera returns None; callers report it by name (:func:`plan_streams`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

__all__ = ["STREAM_SUFFIXES", "IMAGE_TYPES", "stream_of_topic", "frame_base", "parse_camera_map", "CameraIdentity",
           "StreamPlan", "plan_streams", "camera_streams"]

# trailing topic parts that name a message kind, not a camera
STREAM_SUFFIXES = ("compressed", "image_raw", "camera_info", "image", "image_rect", "image_color",
                   "image_rect_color", "depth_gt", "instance_gt")
FRAME_SUFFIXES = ("_optical_frame", "_optical", "_frame", "_link")
IMAGE_TYPES = {"sensor_msgs/msg/Image": "raw", "sensor_msgs/msg/CompressedImage": "compressed"}
CAMERA_INFO_TYPE = "sensor_msgs/msg/CameraInfo"
GT_SUFFIXES = ("/depth_gt", "/instance_gt")


def stream_of_topic(topic: str) -> str:
    """``/robot/front/image_raw/compressed`` -> ``robot/front``; ``/front/camera_info`` -> ``front``."""
    parts = [p for p in topic.strip("/").split("/") if p]
    while len(parts) > 1 and parts[-1] in STREAM_SUFFIXES:
        parts.pop()
    return "/".join(parts)


def frame_base(frame_id: str) -> str:
    """``/robot/front_optical_frame`` -> ``front``: last part of a frame id without a frame-kind suffix."""
    base = frame_id.strip("/").rsplit("/", 1)[-1]
    for s in FRAME_SUFFIXES:
        if base.endswith(s) and len(base) > len(s):
            return base[: -len(s)]
    return base


def parse_camera_map(entries: Iterable[str] | str | None) -> dict[str, str]:
    """``["robot/front=front", "rear_cam=back"]`` or ``"robot/front=front,rear_cam=back"`` -> {key: camera}.

    Keys are streams, topics or frame ids (leading ``/`` ignored). Raises ValueError naming the bad entry."""
    if entries is None:
        return {}
    if isinstance(entries, str):
        entries = [entries]
    out: dict[str, str] = {}
    for chunk in entries:
        for item in str(chunk).split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, cam = item.partition("=")
            key, cam = key.strip().strip("/"), cam.strip()
            if not sep or not key or not cam:
                raise ValueError(f"camera map entry {item!r} is not of the form <stream|topic|frame>=<camera> "
                                 "(e.g. robot/front=front)")
            if key in out and out[key] != cam:
                raise ValueError(f"camera map gives {key!r} two cameras: {out[key]!r} and {cam!r}")
            out[key] = cam
    return out


def camera_streams(camera_map: Iterable[str] | str | None, cameras: Iterable[str]) -> dict[str, str]:
    """camera -> the stream its topics live under, for a subscriber that builds topics from a template
    (the node: ``/{camera}/image_raw`` with ``{camera}`` = ``robot/front`` for ``robot/front=front``).
    Cameras the map does not name keep their own name. Raises ValueError naming a camera mapped from two
    streams, or a map value that is not a camera."""
    cams = list(cameras)
    m = parse_camera_map(camera_map)
    bad = sorted({c for c in m.values() if c not in cams})
    if bad:
        raise ValueError(f"camera map names camera(s) {bad} that are not in the cameras {cams}")
    out = {c: c for c in cams}
    seen: dict[str, str] = {}
    for key, cam in m.items():
        if cam in seen:
            raise ValueError(f"camera {cam!r} is mapped from two streams: {seen[cam]!r} and {key!r}")
        seen[cam] = key
        out[cam] = key
    return out


@dataclass
class CameraIdentity:
    """The mapping stream / frame id -> camera name (module doc: the rule)."""

    cameras: list[str] | None = None  # configured names; None: discover (see module doc)
    explicit: dict[str, str] = field(default_factory=dict)  # stream | topic | frame id -> camera
    frames: dict[str, str] = field(default_factory=dict)  # frame id -> camera, learned from headers

    def __post_init__(self) -> None:
        self.explicit = {k.strip("/"): v for k, v in self.explicit.items()}
        if self.cameras is not None:
            self.cameras = list(self.cameras)
            extra = sorted(set(self.explicit.values()) - set(self.cameras))
            if extra:
                raise ValueError(f"camera map names camera(s) {extra} that are not in the cameras "
                                 f"{self.cameras}")

    def _known(self, name: str) -> bool:
        return self.cameras is None or name in self.cameras

    def camera_of_topic(self, topic: str) -> str | None:
        """Camera of an image / CameraInfo / GT topic, or None when it matches no camera."""
        stream = stream_of_topic(topic)
        for key in (topic.strip("/"), stream):
            if key in self.explicit:
                return self.explicit[key]
        if self.cameras is None:
            return stream
        if stream in self.cameras:
            return stream
        parts = stream.split("/")
        for i in range(1, len(parts)):  # longest trailing part first
            tail = "/".join(parts[i:])
            if tail in self.cameras:
                return tail
        return None

    def camera_of_frame(self, frame_id: str) -> str | None:
        """Camera of a frame id (TF child frame, header frame_id), or None."""
        f = frame_id.strip("/")
        if not f:
            return None
        if f in self.explicit:
            return self.explicit[f]
        if f in self.frames:
            return self.frames[f]
        base = frame_base(f)
        if base in self.explicit:
            return self.explicit[base]
        if self.cameras is None or base in self.cameras:
            return base
        return None

    def learn_frame(self, frame_id: str, camera: str) -> None:
        """Remember that ``frame_id`` (a header of ``camera``'s own stream) is that camera's frame."""
        f = frame_id.strip("/")
        if f and f not in self.explicit:
            self.frames.setdefault(f, camera)


@dataclass
class StreamPlan:
    """What to read from a bag: one image topic per camera, its CameraInfo, and what was left out and why."""

    cameras: list[str]
    image_topic: dict[str, str]  # camera -> chosen image topic
    transport: dict[str, str]  # camera -> raw | compressed
    info_topic: dict[str, str | None]  # camera -> CameraInfo topic (None: the bag has none for it)
    unmatched: list[str] = field(default_factory=list)  # image/info topics that match no camera (by name)
    not_used: dict[str, str] = field(default_factory=dict)  # topic -> why it is not read (other transport)
    notes: list[str] = field(default_factory=list)  # said once, in the log and the run summary
    missing: list[str] = field(default_factory=list)  # configured cameras with no image stream
    identity: CameraIdentity | None = None  # the mapping with the cameras fixed (discovery resolved)

    @property
    def topic_camera(self) -> dict[str, str]:
        """Every topic to read -> its camera."""
        out = {t: c for c, t in self.image_topic.items()}
        out.update({t: c for c, t in self.info_topic.items() if t})
        return out


def _discovery_names(streams: list[str], explicit: Mapping[str, str]) -> dict[str, str]:
    """Discovery: stream -> camera (last part when unique among the image streams, else the whole stream)."""
    last = {}
    for s in streams:
        last.setdefault(s.rsplit("/", 1)[-1], set()).add(s)
    return {s: explicit.get(s) or (s.rsplit("/", 1)[-1] if len(last[s.rsplit("/", 1)[-1]]) == 1 else s)
            for s in streams}


def plan_streams(topics: Mapping[str, str], identity: CameraIdentity, transport: str = "raw",
                 image_topics: Iterable[str] | None = None) -> StreamPlan:
    """Choose the streams of each camera from ``topics`` (topic -> message type, ``pkg/msg/Type``).

    ``transport``: which one a camera with both raw (Image) and compressed (CompressedImage) streams uses;
    a camera with only the other one uses that (said in ``notes``). Ground-truth image topics
    (``*/depth_gt``, ``*/instance_gt``) and depth streams are never camera inputs. ``image_topics``: take only
    these image topics (error if one is missing). Raises ValueError when one camera has two image streams of
    the same transport (naming both and the fix)."""
    if transport not in ("raw", "compressed"):
        raise ValueError(f"image transport must be 'raw' or 'compressed', not {transport!r}")
    norm = {t: m.replace("/msg/", "/").replace("/", "/msg/", 1) for t, m in topics.items()}
    images = [t for t, m in sorted(norm.items()) if m in IMAGE_TYPES and not t.endswith(GT_SUFFIXES)
              and "depth" not in t.strip("/").split("/")[-1]]
    if image_topics is not None:
        image_topics = list(image_topics)
        missing = [t for t in image_topics if t not in norm]
        if missing:
            raise ValueError(f"image topics not in the bag: {missing} (bag has {sorted(norm)})")
        images = image_topics
    infos = [t for t, m in sorted(norm.items()) if m == CAMERA_INFO_TYPE]
    if identity.cameras is None:  # discovery: names from the image streams themselves
        names = _discovery_names(list(dict.fromkeys(stream_of_topic(t) for t in images)), identity.explicit)
        ident = CameraIdentity(None, {**names, **identity.explicit}, identity.frames)
    else:
        ident = identity
    by_cam: dict[str, dict[str, list[str]]] = {}
    unmatched = []
    for t in images:
        cam = ident.camera_of_topic(t)
        if cam is None:
            unmatched.append(t)
            continue
        by_cam.setdefault(cam, {}).setdefault(IMAGE_TYPES[norm[t]], []).append(t)
    cameras = list(identity.cameras) if identity.cameras is not None else list(by_cam)
    plan = StreamPlan([], {}, {}, {}, unmatched=unmatched,
                      identity=CameraIdentity(cameras, dict(ident.explicit), ident.frames))
    for cam in cameras:
        kinds = by_cam.get(cam)
        if not kinds:
            plan.missing.append(cam)
            continue
        for kind, ts in kinds.items():
            if len(ts) > 1:
                raise ValueError(f"camera {cam!r} has {len(ts)} {kind} image streams: {ts}; choose one with "
                                 f"--image-topics, or map them to different cameras with --camera-map")
        pick = transport if transport in kinds else next(iter(kinds))
        topic = kinds[pick][0]
        plan.cameras.append(cam)
        plan.image_topic[cam] = topic
        plan.transport[cam] = pick
        if len(kinds) > 1:
            other = kinds["compressed" if pick == "raw" else "raw"][0]
            plan.not_used[other] = f"camera {cam} reads {topic} ({pick})"
            plan.notes.append(f"camera {cam}: both raw and compressed images; using {pick} {topic}, not {other} "
                              f"(--image-transport {'compressed' if pick == 'raw' else 'raw'} to switch)")
        elif pick != transport:
            plan.notes.append(f"camera {cam}: no {transport} images; using {pick} {topic}")
    stream_of_image = {c: stream_of_topic(t) for c, t in plan.image_topic.items()}
    for cam in plan.cameras:
        cands = [t for t in infos if ident.camera_of_topic(t) == cam]
        same = [t for t in cands if stream_of_topic(t) == stream_of_image[cam]]
        plan.info_topic[cam] = (same or cands or [None])[0]
    used_infos = set(plan.info_topic.values())
    plan.unmatched += [t for t in infos if t not in used_infos and ident.camera_of_topic(t) not in plan.cameras]
    return plan
