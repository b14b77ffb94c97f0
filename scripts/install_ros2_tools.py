#!/usr/bin/env python3
"""Install the ROS 2 packages that PyPI lacks (launch, the ros2 CLI, launch_testing, tf2_ros,
message_filters, sensor_msgs_py, the full tf2_msgs, composition_interfaces) into a venv.

Why: PyPI's Kilted wheels stop at rclpy and the message packages. With these, ``ros2 launch``,
``ros2 node/param/topic/service/lifecycle/interface``, ``tf2_ros`` and ``launch_testing`` work from the
venv exactly as on a ROS 2 install (recipe: shared/ros2_sources/README.md).

Where the sources come from, first that applies (``FAST3DIS_ROS2_SOURCES`` forces one: a folder,
``upstream`` or ``system``):
  1. ``../shared/ros2_sources`` beside the repository (the unmodified upstream sources, pinned);
  2. their upstream repositories at the commits of ``requirements/ros2_sources.tsv`` (git, network);
  3. a sourced ROS 2 install (``ROS_DISTRO`` set and ``tf2_ros``, ``launch_ros`` importable outside the
     venv): nothing is built; the venv then relies on that install's environment.
The choice is printed (``[ros2_tools] sources: ...``).

Steps (each skipped when already done for the same pinned commit, so a second run only re-checks):
  1. extra wheels of ``requirements/ros_tools.txt`` (gmock/gtest for ament_cmake_ros, argcomplete ...);
  2. CMake packages ``tf2_msgs``, ``composition_interfaces``, ``tf2``, ``tf2_py``, built with
     scripts/build_interfaces.py's recipe into the venv prefix;
  3. the pure-Python packages with ``pip install --no-deps --no-build-isolation`` from a writable copy
     (CI lays ../shared out read-only; setuptools writes build/ and *.egg-info into the source);
  4. an import check of every package.
What was installed, and from which commit, is kept in ``V/share/fast3dis_ros/ros2_tools.json``.

Usage: python scripts/install_ros2_tools.py --venv .venv [--force]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_interfaces as bi  # noqa: E402  (same folder: the project's CMake/rosidl builder)

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "requirements" / "ros2_sources.tsv"
TOOLS_REQUIREMENTS = ROOT / "requirements" / "ros_tools.txt"
SHARED = ROOT.parent / "shared" / "ros2_sources"
CACHE = ROOT / ".ros2_sources"  # upstream checkouts (git-ignored)
BUILD = ROOT / ".interfaces_build"
STAMP_NAME = "ros2_tools.json"

# CMake packages in build order, with what shows each is installed (run in the venv's Python).
CMAKE_PACKAGES: dict[str, str] = {
    "tf2_msgs": "from tf2_msgs.srv import FrameGraph; from tf2_msgs.action import LookupTransform",
    "composition_interfaces": "from composition_interfaces.srv import LoadNode",
    "tf2": "import sys, pathlib; assert (pathlib.Path(sys.prefix) / 'lib' / 'libtf2.so').is_file()",
    "tf2_py": "import tf2_py",
}
# Pure-Python packages (pip) in dependency order, with the module that shows each is installed.
PYTHON_PACKAGES: dict[str, str] = {
    "osrf_pycommon": "osrf_pycommon", "launch": "launch", "launch_xml": "launch_xml",
    "launch_yaml": "launch_yaml", "launch_testing": "launch_testing", "launch_ros": "launch_ros",
    "launch_testing_ros": "launch_testing_ros", "rosidl_runtime_py": "rosidl_runtime_py",
    "ros2cli": "ros2cli", "ros2launch": "ros2launch", "ros2node": "ros2node", "ros2topic": "ros2topic",
    "ros2param": "ros2param", "ros2pkg": "ros2pkg", "ros2run": "ros2run", "ros2service": "ros2service",
    "ros2lifecycle": "ros2lifecycle", "ros2interface": "ros2interface", "sensor_msgs_py": "sensor_msgs_py",
    "message_filters": "message_filters", "tf2_ros_py": "tf2_ros",
}


def log(msg: str) -> None:
    print(f"[ros2_tools] {msg}", flush=True)


@dataclass(frozen=True)
class Pin:
    package: str
    upstream: str  # GitHub owner/name
    commit: str


def read_manifest(path: Path = MANIFEST) -> dict[str, Pin]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return {r["package"]: Pin(r["package"], r["upstream"], r["commit"]) for r in rows}


# ---------------------------------------------------------------------------------------------- sources
def _package_dir(repo: Path, pkg: str) -> Path:
    """A repository holds the package at its root (package.xml named ``pkg``) or in ``<pkg>/``."""
    sub = repo / pkg
    return sub if (sub / "package.xml").is_file() or (sub / "setup.py").is_file() else repo


def fetch_upstream(pins: dict[str, Pin], cache: Path = CACHE) -> dict[str, Path]:
    """Shallow checkouts of each upstream repository at its pinned commit (reused when present)."""
    if shutil.which("git") is None:
        raise RuntimeError("git is not installed")
    base = os.environ.get("FAST3DIS_ROS2_UPSTREAM_BASE", "https://github.com")
    out: dict[str, Path] = {}
    for (upstream, commit) in sorted({(p.upstream, p.commit) for p in pins.values()}):
        repo = cache / f"{upstream.replace('/', '__')}@{commit[:12]}"
        if not (repo / ".fetched").is_file():
            if repo.exists():
                shutil.rmtree(repo)
            repo.mkdir(parents=True)
            log(f"fetching {upstream} @ {commit[:12]}")
            for cmd in (["git", "init", "-q"], ["git", "fetch", "-q", "--depth", "1", f"{base}/{upstream}", commit],
                        ["git", "checkout", "-q", "FETCH_HEAD"]):
                r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
                if r.returncode != 0:
                    shutil.rmtree(repo, ignore_errors=True)
                    raise RuntimeError(f"{' '.join(cmd)} in {repo}: {r.stderr.strip()[-400:]}")
            (repo / ".fetched").write_text(commit + "\n")
        for p in pins.values():
            if (p.upstream, p.commit) == (upstream, commit):
                out[p.package] = _package_dir(repo, p.package)
    return out


def system_install_has_tools() -> str | None:
    """The sourced ROS 2 install's prefix when it provides tf2_ros and launch_ros, else None."""
    if not os.environ.get("ROS_DISTRO"):
        return None
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix and (Path(prefix) / "share" / "tf2_ros_py" / "package.xml").is_file() and \
                (Path(prefix) / "share" / "launch_ros" / "package.xml").is_file():
            return prefix
    return None


def shared_sources() -> Path | None:
    """``../shared/ros2_sources`` beside this checkout, or beside the main checkout of a git worktree."""
    cands = [SHARED]
    try:
        common = subprocess.run(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        if common:
            cands.append(Path(common).parent.parent / "shared" / "ros2_sources")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return next((c for c in cands if (c / "MANIFEST.tsv").is_file()), None)


def resolve_sources(pins: dict[str, Pin]) -> tuple[str, dict[str, Path] | None]:
    """(description, {package: source folder}) or (description, None) for a sourced ROS 2 install."""
    forced = os.environ.get("FAST3DIS_ROS2_SOURCES", "")
    if forced and forced not in ("upstream", "system"):
        root = Path(forced).resolve()
        return f"{root} (FAST3DIS_ROS2_SOURCES)", {p: root / p for p in pins}
    shared = None if forced else shared_sources()
    if shared is not None:
        return f"{shared.resolve()} (shared/ros2_sources, pinned upstream sources)", {p: shared / p for p in pins}
    upstream_error = ""
    if forced != "system":
        try:
            return f"upstream repositories at the pinned commits (checkouts in {CACHE})", fetch_upstream(pins)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            upstream_error = str(e)
            if forced == "upstream":
                raise SystemExit(f"[ros2_tools] upstream sources unavailable: {e}")
            log(f"upstream sources unavailable ({e}); looking for a sourced ROS 2 install")
    prefix = system_install_has_tools()
    if prefix:
        return f"the sourced ROS 2 {os.environ['ROS_DISTRO']} install at {prefix} (nothing built)", None
    raise SystemExit(
        "[ros2_tools] no source for launch/ros2cli/tf2_ros/message_filters: put the project's shared/ros2_sources "
        "beside the repository (../shared/ros2_sources), or let git reach the upstream repositories of "
        f"{MANIFEST.name} ({upstream_error or 'not tried'}), or source a ROS 2 install "
        "(`source /opt/ros/kilted/setup.bash`) before running this")


# ---------------------------------------------------------------------------------------------- steps
def venv_python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def check(venv: Path, stmt: str) -> bool:
    return bi.importable(venv, stmt)


def failing(venv: Path, checks: dict[str, str]) -> set[str]:
    """Names whose check statement fails, all run in one interpreter of the venv (one start, not 25)."""
    code = ("import json, sys\nbad = []\nfor name, stmt in json.loads(sys.argv[1]).items():\n"
            "    try:\n        exec(stmt, {})\n    except Exception:\n        bad.append(name)\n"
            "print(json.dumps(bad))")
    r = subprocess.run([venv_python(venv), "-c", code, json.dumps(checks)], env=bi.venv_env(venv),
                       capture_output=True, text=True)
    try:
        return set(json.loads(r.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return set(checks)  # the interpreter itself failed: treat everything as missing


def load_stamp(venv: Path) -> dict:
    p = venv / "share" / "fast3dis_ros" / STAMP_NAME
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def save_stamp(venv: Path, stamp: dict) -> None:
    p = venv / "share" / "fast3dis_ros" / STAMP_NAME
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")


def install_wheels(venv: Path) -> None:
    r = subprocess.run([venv_python(venv), "-m", "pip", "install", "-q", "-r", str(TOOLS_REQUIREMENTS)])
    if r.returncode != 0:
        raise SystemExit(f"[ros2_tools] pip install -r {TOOLS_REQUIREMENTS} failed")


def build_cmake(venv: Path, todo: list[str], sources: dict[str, Path], jobs: int) -> dict[str, float]:
    bi.ensure_toolchain()
    n = bi.fix_cmake_paths(venv)  # the new wheels bring cmake files with the build container's paths too
    if n:
        log(f"rewrote build-container Python paths in {n} cmake file(s)")
    BUILD.mkdir(exist_ok=True)
    times = {}
    for pkg in todo:
        log(f"{pkg}: cmake build from {sources[pkg]}")
        times[pkg] = bi.build(venv, pkg, jobs, src=sources[pkg], build_root=BUILD)
        if not check(venv, CMAKE_PACKAGES[pkg]):
            raise SystemExit(f"[ros2_tools] {pkg}: built and installed but `{CMAKE_PACKAGES[pkg]}` fails")
        log(f"{pkg}: ok ({times[pkg]:.1f} s)")
    return times


def install_python(venv: Path, todo: list[str], sources: dict[str, Path]) -> float:
    """One pip run over writable copies of the package folders (setuptools writes into the source)."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ros2_tools-") as tmp:
        copies = []
        for pkg in todo:
            dst = Path(tmp) / pkg
            shutil.copytree(sources[pkg], dst, ignore=shutil.ignore_patterns("test", ".git", "build", "*.egg-info"))
            for p in [dst, *dst.rglob("*")]:  # CI's ../shared has no write bits; the copies keep them
                p.chmod(p.stat().st_mode | 0o200)
            copies.append(str(dst))
        r = subprocess.run([venv_python(venv), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                            *copies])
        if r.returncode != 0:
            raise SystemExit(f"[ros2_tools] pip install of {todo} failed")
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=str(ROOT / ".venv"))
    ap.add_argument("--force", action="store_true", help="rebuild and reinstall everything")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    venv = Path(args.venv).resolve()
    if not (venv / "bin" / "python").exists():
        raise SystemExit(f"[ros2_tools] no python in {venv}/bin: create the venv first")
    t0 = time.monotonic()
    pins = read_manifest()
    unknown = set(CMAKE_PACKAGES) | set(PYTHON_PACKAGES)
    missing_pins = sorted(unknown - set(pins))
    if missing_pins:
        raise SystemExit(f"[ros2_tools] {MANIFEST} lacks pins for {missing_pins}")
    stamp = {} if args.force else load_stamp(venv)

    checks = {**CMAKE_PACKAGES, **{p: f"import importlib.util as u; assert u.find_spec('{m}')"
                                   for p, m in PYTHON_PACKAGES.items()}}
    bad = failing(venv, checks)
    todo = [p for p in checks if p in bad or stamp.get(p) != pins[p].commit]
    cmake_todo = [p for p in CMAKE_PACKAGES if p in todo]
    py_todo = [p for p in PYTHON_PACKAGES if p in todo]
    if not cmake_todo and not py_todo:
        log(f"all {len(CMAKE_PACKAGES) + len(PYTHON_PACKAGES)} packages installed at their pinned commits: "
            f"skipped ({time.monotonic() - t0:.1f} s; --force rebuilds)")
        return 0
    what, sources = resolve_sources(pins)
    log(f"sources: {what}")
    if sources is None:
        return 0
    absent = [p for p in cmake_todo + py_todo if not sources[p].is_dir()]
    if absent:
        raise SystemExit(f"[ros2_tools] source folders missing: {[str(sources[p]) for p in absent]}")
    install_wheels(venv)
    if cmake_todo:
        build_cmake(venv, cmake_todo, sources, args.jobs)
        for p in cmake_todo:
            stamp[p] = pins[p].commit
        save_stamp(venv, stamp)
    if py_todo:
        log(f"pip install {len(py_todo)} pure-Python package(s): {' '.join(py_todo)}")
        dt = install_python(venv, py_todo, sources)
        log(f"pure-Python packages installed ({dt:.1f} s)")
    bad = sorted(failing(venv, {p: f"import {m}" for p, m in PYTHON_PACKAGES.items()}))
    if bad:
        raise SystemExit(f"[ros2_tools] installed but not importable: {bad}")
    for p in py_todo:
        stamp[p] = pins[p].commit
    stamp["_sources"] = what
    save_stamp(venv, stamp)
    log(f"done in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
