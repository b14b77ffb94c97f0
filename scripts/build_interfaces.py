#!/usr/bin/env python3
"""Build the project's ROS 2 interface package (fast3dis_msgs) into a venv; also the CMake builder of
scripts/install_ros2_tools.py (tf2_msgs, composition_interfaces, tf2, tf2_py from ../shared/ros2_sources).

The ROS 2 Kilted wheels on PyPI turn a venv into a ROS prefix (``V/share/<pkg>``, ``V/lib``,
ament index in ``V/share/ament_index``) and ship the real rosidl generators and ament_cmake. This
script runs the ordinary ament_cmake build of each package under ``interfaces/`` against that
prefix and installs it there, so ``from fast3dis_msgs.msg import InstanceArray`` works like on a real
ROS install. (tf2_msgs is built from its full upstream source by scripts/install_ros2_tools.py.)

Steps (see shared/ROS2_ON_PYPI.md):
  1. skip packages that already import in the venv's Python (idempotent; ``--force`` rebuilds);
  2. rewrite the wheel build container's Python include paths
     (``/opt/python/cp311-cp311/...``) in ``V/share/**/*.cmake`` to this machine's;
  3. ``cmake -S interfaces/<pkg> -B .interfaces_build/<pkg> -DCMAKE_PREFIX_PATH=V
     -DCMAKE_INSTALL_PREFIX=V -DPython3_EXECUTABLE=V/bin/python -DBUILD_TESTING=OFF`` and
     ``cmake --build ... --target install``; the log goes to ``.interfaces_build/<pkg>.log`` and
     its tail is printed on failure (exit status 1);
  4. import check in a fresh interpreter.

Usage: python scripts/build_interfaces.py --venv .venv [--force] [--jobs N] [pkg ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "interfaces"
BUILD = ROOT / ".interfaces_build"
# Build order matters: later packages may depend on earlier ones.
PACKAGES = {
    "fast3dis_msgs": "from fast3dis_msgs.msg import Instance, InstanceArray; from fast3dis_msgs.srv import GetInstances, ResetMap, SaveMap",
}
CONTAINER_PY = "/opt/python/cp311-cp311"


def log(msg: str) -> None:
    print(f"[build_interfaces] {msg}", flush=True)


def venv_env(venv: Path) -> dict:
    env = dict(os.environ)
    env["AMENT_PREFIX_PATH"] = str(venv) + (
        os.pathsep + env["AMENT_PREFIX_PATH"] if env.get("AMENT_PREFIX_PATH") else ""
    )
    env["CMAKE_PREFIX_PATH"] = str(venv)
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return env


def importable(venv: Path, stmt: str) -> bool:
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", stmt],
        env=venv_env(venv),
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


def python_paths(venv: Path) -> tuple[str, str]:
    code = "import sysconfig, numpy; print(sysconfig.get_paths()['include']); print(numpy.get_include())"
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], env=venv_env(venv), capture_output=True, text=True
    )
    if r.returncode != 0:
        raise SystemExit(f"[build_interfaces] cannot query the venv's Python/numpy include dirs:\n{r.stderr}")
    inc, np_inc = r.stdout.split()[-2:]
    return inc, np_inc


def fix_cmake_paths(venv: Path) -> int:
    """Point the message wheels' exported include dirs at this machine's Python and numpy."""
    inc, np_inc = python_paths(venv)
    mapping = [
        (f"{CONTAINER_PY}/include/python3.11", inc),
        (f"{CONTAINER_PY}/lib/python3.11/site-packages/numpy/_core/include", np_inc),
    ]
    changed = 0
    for path in (venv / "share").rglob("*.cmake"):
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if CONTAINER_PY not in text:
            continue
        new = text
        for old, repl in mapping:
            new = new.replace(old, repl)
        if new != text:
            path.write_text(new)
            changed += 1
    left = [p for p in (venv / "share").rglob("*.cmake") if CONTAINER_PY in p.read_text(errors="ignore")]
    if left:
        log(f"warning: {len(left)} cmake files still name {CONTAINER_PY} (e.g. {left[0]})")
    return changed


def ensure_toolchain() -> None:
    """cmake + a C/C++ compiler; installed from Debian when missing and we are root with apt-get."""
    missing = [t for t in ("cmake", "make", "cc", "c++") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return  # the caller reports what is missing
    log(f"installing {missing} from Debian (apt-get install cmake g++ make)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
    r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "cmake", "g++", "make"],
                       env=env)
    if r.returncode != 0:
        log("apt-get install failed")


def run_logged(cmd: list[str], logf, env: dict, cwd: Path) -> int:
    logf.write(f"\n$ {' '.join(cmd)}\n")
    logf.flush()
    return subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd).returncode


def fail(pkg: str, log_path: Path, what: str) -> None:
    tail = log_path.read_text(errors="replace").splitlines()[-80:]
    print("\n".join(tail), file=sys.stderr)
    raise SystemExit(f"[build_interfaces] {pkg}: {what} failed; full log: {log_path}")


def build(venv: Path, pkg: str, jobs: int, src: Path | None = None, build_root: Path = BUILD) -> float:
    """cmake configure + build + install of the package in ``src`` (default ``interfaces/<pkg>``) into
    ``venv``; the build tree is ``build_root/<pkg>``, the log ``build_root/<pkg>.log``. Seconds taken."""
    t0 = time.monotonic()
    src = SRC / pkg if src is None else Path(src)
    bdir = build_root / pkg
    if bdir.exists():
        shutil.rmtree(bdir)  # stale caches from another venv path break configure
    bdir.mkdir(parents=True)
    log_path = build_root / f"{pkg}.log"
    env = venv_env(venv)
    py = str(venv / "bin" / "python")
    with open(log_path, "w") as logf:
        configure = [
            "cmake", "-S", str(src), "-B", str(bdir),
            f"-DCMAKE_PREFIX_PATH={venv}",
            f"-DCMAKE_INSTALL_PREFIX={venv}",
            f"-DPython3_EXECUTABLE={py}",
            "-DBUILD_TESTING=OFF",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        log(f"{pkg}: configure")
        if run_logged(configure, logf, env, ROOT) != 0:
            fail(pkg, log_path, "cmake configure")
        log(f"{pkg}: build + install (-j{jobs})")
        if run_logged(["cmake", "--build", str(bdir), "--target", "install", "--", f"-j{jobs}"], logf, env, ROOT) != 0:
            fail(pkg, log_path, "cmake build/install")
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=str(ROOT / ".venv"), help="venv that holds the ROS 2 wheels")
    ap.add_argument("--force", action="store_true", help="rebuild even if already importable")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("packages", nargs="*", help=f"subset of {list(PACKAGES)}")
    args = ap.parse_args(argv)
    venv = Path(args.venv).resolve()
    if not (venv / "bin" / "python").exists():
        raise SystemExit(f"[build_interfaces] no python in {venv}/bin: create the venv first")
    wanted = args.packages or list(PACKAGES)
    unknown = [p for p in wanted if p not in PACKAGES]
    if unknown:
        raise SystemExit(f"[build_interfaces] unknown package(s) {unknown}; known: {list(PACKAGES)}")

    todo = [p for p in wanted if args.force or not importable(venv, PACKAGES[p])]
    for p in wanted:
        if p not in todo:
            log(f"{p}: already importable, skipped (use --force to rebuild)")
    if not todo:
        return 0
    ensure_toolchain()
    for tool in ("cmake", "make", "cc", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"[build_interfaces] '{tool}' not found: install cmake and a C/C++ toolchain "
                "(Debian: apt-get install cmake build-essential)"
            )
    if not importable(venv, "import rosidl_generator_py, rosidl_adapter, ament_package, em, lark, catkin_pkg"):
        raise SystemExit(
            "[build_interfaces] rosidl/ament build tools are missing in the venv: "
            "pip install -r requirements/ros.txt first"
        )
    n = fix_cmake_paths(venv)
    log(f"rewrote build-container Python paths in {n} cmake file(s)")
    BUILD.mkdir(exist_ok=True)
    for p in todo:
        dt = build(venv, p, args.jobs)
        if not importable(venv, PACKAGES[p]):
            r = subprocess.run([str(venv / "bin" / "python"), "-c", PACKAGES[p]], env=venv_env(venv),
                               capture_output=True, text=True)
            raise SystemExit(f"[build_interfaces] {p}: built and installed but `{PACKAGES[p]}` fails:\n{r.stderr}")
        log(f"{p}: ok ({dt:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
