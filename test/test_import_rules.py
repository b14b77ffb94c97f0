"""The package's import rules, checked on the source (``ast``), imports inside functions included.

* Layers import only downward (``LAYERS``: a module may import modules of its own rank or lower).
* No import cycles between modules, not even through imports hidden inside functions.
* Only ``fast3dis_ros/ros/`` imports ROS (rclpy, message packages, launch, tf2, message_filters).
* The product never imports the experiments (``experiments/`` at the repository root).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fast3dis_ros"

#: Rank of each part (longest matching prefix wins). Same rank: allowed both ways, but never in a cycle.
LAYERS: dict[str, int] = {
    "fast3dis_ros": 0,  # the package __init__ (version only)
    "fast3dis_ros.core": 0,  # shared types and counters
    "fast3dis_ros.geometry": 1,  # numpy geometry
    "fast3dis_ros.model.config": 2,  # the one network config
    "fast3dis_ros.model.head.config": 2,
    "fast3dis_ros.model.weights_io": 2,
    "fast3dis_ros.model.median": 2,  # exportable medians (ONNX / TensorRT), used by the head and fast3dis.py
    "fast3dis_ros.model.schedule": 2,  # the overlap-loss schedule, part of LossConfig
    "fast3dis_ros.model.da3": 3,  # DA3 transcription, its weights and LoRA, the exact block runner
    "fast3dis_ros.model.fastpath": 4,  # accelerators: build the fast runner the backbone is given
    "fast3dis_ros.model.head": 4,  # the FAST3DIS head
    "fast3dis_ros.model": 5,  # fast3dis.py (meta-architecture), checkpoint.py
    "fast3dis_ros.inference": 6,  # predictor: model -> pipeline types
    "fast3dis_ros.deploy": 6,  # exported engines (ONNX, onnxruntime, TensorRT) behind the same Predictor
    "fast3dis_ros.pipeline": 7,  # torch-free runtime
    "fast3dis_ros.data": 7,
    "fast3dis_ros.train": 8,
    "fast3dis_ros.eval": 8,
    "fast3dis_ros.ros": 9,  # the only ROS layer
    "fast3dis_ros.bench": 10,  # benchmarks: nothing in the product imports them
    "fast3dis_ros.demo": 11,
    "fast3dis_ros.cli": 11,
}

ROS_ROOTS = {"rclpy", "launch", "launch_ros", "launch_testing", "tf2_ros", "tf2_py", "message_filters",
             "rosidl_runtime_py", "builtin_interfaces", "sensor_msgs_py", "rosbag2_py", "ament_index_python"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def rank(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and docs/ARCHITECTURE.md)"
    return LAYERS[best]


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """Every absolute module name ``module`` imports (with its line), relative imports resolved."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            # ``from pkg import submodule`` imports the submodule too
            out += [(f"{target}.{a.name}", node.lineno) for a in node.names if f"{target}.{a.name}" in MODULES]
    return out


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for target, _ in imports_of(m, p):
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions():
    """The checker itself: a function-level import is an edge (cli imports its commands lazily)."""
    assert "fast3dis_ros.train.train" in package_graph()["fast3dis_ros.cli"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(package_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_layers_import_only_downward():
    bad = []
    for m, p in MODULES.items():
        for target, line in imports_of(m, p):
            if target in MODULES and rank(target) > rank(m):
                bad.append(f"{p.relative_to(ROOT)}:{line} {m} (rank {rank(m)}) imports {target} (rank {rank(target)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_da3_transcription_never_imports_the_fast_path():
    """The backbone reaches the fast path only through its injected runner (``model/da3/runner.py``)."""
    bad = [f"{m} imports {t}" for m, p in MODULES.items() if m.startswith("fast3dis_ros.model.da3")
           for t, _ in imports_of(m, p) if t.startswith("fast3dis_ros.model.fastpath")]
    assert not bad
    assert "fast3dis_ros.model.da3.backbone" in package_graph()["fast3dis_ros.model.fastpath.accelerate"]


def test_core_imports_nothing_of_the_package():
    bad = [(m, t) for m, p in MODULES.items() if m.startswith("fast3dis_ros.core")
           for t, _ in imports_of(m, p) if t.startswith("fast3dis_ros.") and not t.startswith("fast3dis_ros.core")]
    assert not bad


def is_ros(name: str) -> bool:
    root = name.split(".")[0]
    return root in ROS_ROOTS or root.endswith(("_msgs", "_srvs", "_interfaces"))


def test_only_ros_layer_imports_ros():
    bad = []
    for m, p in MODULES.items():
        if m.startswith("fast3dis_ros.ros"):
            continue
        bad += [f"{p.relative_to(ROOT)}:{line} imports {t}" for t, line in imports_of(m, p) if is_ros(t)]
    assert not bad, "ROS imported outside fast3dis_ros/ros/:\n" + "\n".join(bad)


def test_product_never_imports_experiments():
    bad = [f"{m} imports {t}" for m, p in MODULES.items() for t, _ in imports_of(m, p)
           if t.split(".")[0] == "experiments"]
    assert not bad


@pytest.mark.parametrize("name", ["rclpy.node", "sensor_msgs.msg", "fast3dis_msgs.msg", "tf2_ros", "launch"])
def test_ros_detector_knows_ros(name):
    assert is_ros(name)
    assert not is_ros("numpy") and not is_ros("fast3dis_ros.pipeline.fusion")
