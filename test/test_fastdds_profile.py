"""config/fastdds_large_clouds.xml (the Fast DDS profile with a 64 MB shared-memory segment for multi-MB
clouds, docs/BENCHMARKS.md section 13): its settings, the launch argument that sets it, its installation, and
real ~3 MB PointCloud2 messages between two processes that load it (publisher and subscriber are both
child processes of scripts/bench_dds_clouds.py, real rclpy on loopback, own domain). Timing is measured by
that script, not asserted here."""

import ast
import glob
import hashlib
import importlib.util
import json
import xml.etree.ElementTree as ET

import pytest

from ros_helpers import ROOT, RosProcess, unique_domain_id

PROFILE = ROOT / "config" / "fastdds_large_clouds.xml"
NS = {"d": "http://www.eprosima.com"}
SEGMENT = 64 * 1024 * 1024
POINTS = 125_000  # x 24 bytes = 3 MB, a ~/window_cloud at 504x378
MESSAGES = 3


def _bench():
    spec = importlib.util.spec_from_file_location("bench_dds_clouds", ROOT / "scripts" / "bench_dds_clouds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(profile=PROFILE):
    # the profile through the environment, as a user's shell or the launch file sets it
    return {"FASTDDS_DEFAULT_PROFILES_FILE": str(profile)}


def test_profile_settings():
    root = ET.parse(PROFILE).getroot()
    assert root.tag == "{http://www.eprosima.com}dds"
    descs = {d.findtext("d:transport_id", namespaces=NS): d
             for d in root.findall("d:profiles/d:transport_descriptors/d:transport_descriptor", NS)}
    by_type = {d.findtext("d:type", namespaces=NS): d for d in descs.values()}
    assert set(by_type) == {"SHM", "UDPv4"}
    assert int(by_type["SHM"].findtext("d:segment_size", namespaces=NS)) == SEGMENT
    (part,) = root.findall("d:profiles/d:participant", NS)
    assert part.get("is_default_profile") == "true"  # rmw_fastrtps uses the default participant profile
    rtps = part.find("d:rtps", NS)
    used = [t.text for t in rtps.findall("d:userTransports/d:transport_id", NS)]
    assert sorted(used) == sorted(descs)
    assert rtps.findtext("d:useBuiltinTransports", namespaces=NS) == "false"
    # the comment says why and what it costs
    text = PROFILE.read_text()
    assert "512 KB" in text and "64 MB" in text and "per" in text and "/dev/shm" in text


def test_launch_argument_sets_the_profile_and_it_is_installed(monkeypatch):
    src = (ROOT / "launch" / "fast3dis.launch.py").read_text()
    tree = ast.parse(src)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    name = lambda c: getattr(c.func, "id", getattr(c.func, "attr", ""))  # noqa: E731
    (arg,) = [c for c in calls if name(c) == "DeclareLaunchArgument" and c.args[0].value == "large_clouds_profile"]
    kws = {k.arg: k.value for k in arg.keywords}
    assert kws["default_value"].value == "true" and "description" in kws
    envs = {c.args[0].value: c for c in calls if name(c) == "SetEnvironmentVariable"}
    # Fast DDS 3 (Kilted) reads FASTDDS_DEFAULT_PROFILES_FILE; the old FASTRTPS_ name is deprecated there
    assert set(envs) == {"FASTDDS_DEFAULT_PROFILES_FILE"}
    for c in envs.values():
        assert "condition" in {k.arg for k in c.keywords}
    assert '"fastdds_large_clouds.xml"' in src and 'IfCondition(LaunchConfiguration("large_clouds_profile"))' in src
    # set before the node is started: the actions run in list order
    first_env = src.index('SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE"')
    assert first_env < src.index("OpaqueFunction(function=_node)")
    # setup.py installs it into share/fast3dis_ros/config (what get_package_share_directory finds)
    monkeypatch.chdir(ROOT)
    setup = ast.parse((ROOT / "setup.py").read_text())
    (files,) = [t.elts[1] for t in ast.walk(setup) if isinstance(t, ast.Tuple) and len(t.elts) == 2
                and isinstance(t.elts[0], ast.JoinedStr) and ast.unparse(t.elts[0]).endswith("/config'")]
    installed = eval(compile(ast.Expression(files), "setup.py", "eval"), {"glob": glob.glob})  # noqa: S307
    assert "config/fastdds_large_clouds.xml" in installed and "config/fast3dis.yaml" in installed


PROBE = r"""
import time, rclpy
rclpy.init()
n = rclpy.create_node("profile_probe")
time.sleep(0.5)  # Fast DDS logs from its own thread
n.destroy_node()
rclpy.shutdown()
print("probe done")
"""


@pytest.mark.timeout(60)
def test_parser_errors_would_show(tmp_path):
    """The check below is not vacuous: a profile with an unknown element makes Fast DDS print XMLPARSER errors
    into the process output, which RosProcess captures."""
    pytest.importorskip("rclpy")
    bad = tmp_path / "bad.xml"
    bad.write_text(PROFILE.read_text().replace("segment_size>", "segment_sise>"))
    with RosProcess(["-c", PROBE], unique_domain_id(), name="bad_profile", env=_env(bad)) as p:
        p.proc.wait(30)
    assert "probe done" in p.output() and "XMLPARSER" in p.output(), p.output()


@pytest.mark.timeout(90)
def test_large_clouds_between_processes_with_profile(tmp_path):
    pytest.importorskip("rclpy")
    pytest.importorskip("sensor_msgs.msg")
    bench = _bench()
    dom = unique_domain_id()
    common = ["--messages", str(MESSAGES), "--points", str(POINTS)]
    script = str(ROOT / "scripts" / "bench_dds_clouds.py")
    out = {r: str(tmp_path / f"{r}.jsonl") for r in ("sub", "pub")}
    sub_args = [script, "--role", "sub", "--out", out["sub"], *common]
    pub_args = [script, "--role", "pub", "--out", out["pub"], "--period", "0.2", *common]
    with RosProcess(sub_args, dom, name="cloud_sub", env=_env()) as sub, \
            RosProcess(pub_args, dom, name="cloud_pub", env=_env()) as pub:
        rc_pub, rc_sub = pub.proc.wait(45), sub.proc.wait(15)
    logs = {"pub": pub.output(), "sub": sub.output()}
    recs = {r: [json.loads(x) for x in open(p).read().splitlines() if x.strip()] for r, p in out.items()}
    assert (rc_pub, rc_sub) == (0, 0), (recs, logs)

    # the profile parsed (Fast DDS prints "[XMLPARSER Error] ..." otherwise) and nothing else went wrong
    for role, text in logs.items():
        assert "XMLPARSER" not in text and "Error" not in text, f"{role}:\n{text}"
    # ... and took effect: both participants map a 64 MB segment (default: 512 KB)
    shm = {r["role"]: r["bytes"] for rr in recs.values() for r in rr if r["kind"] == "shm"}
    assert shm["pub"] >= SEGMENT and shm["sub"] >= SEGMENT, shm

    recv = sorted((r for r in recs["sub"] if r["kind"] == "recv"), key=lambda r: r["index"])
    assert [r["index"] for r in recv] == list(range(MESSAGES))
    for r in recv:
        expected = bench.cloud_bytes(r["index"], POINTS)
        assert len(expected) == POINTS * 24 == 3_000_000
        assert r["equal"] and r["nbytes"] == len(expected) and r["sha256"] == hashlib.sha256(expected).hexdigest()
        assert (r["width"], r["height"], r["point_step"], r["row_step"]) == (POINTS, 1, 24, 24 * POINTS)
        assert r["fields"] == ["x", "y", "z", "rgb", "instance", "score"]
