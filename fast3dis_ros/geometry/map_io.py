"""Writing an instance map to disk: PLY and PCD (PCL) files, all-or-nothing.

Why its own module: the node's ``~/save_map`` service and offline tools share it, and it must be
testable without ROS. Both formats keep the per-point instance id, so a saved map can be split by
object later (Kimera-Semantics #16, nvblox save_map reports):

* PLY, binary little endian: ``x y z`` float, ``red green blue`` uchar, ``instance`` uint, ``score``
  float (MeshLab / CloudCompare / Open3D / plyfile read it);
* PCD v0.7, binary: ``x y z rgb instance score`` with PCL's packed-float ``rgb`` and ``instance`` as
  an unsigned 4-byte field, i.e. the byte layout of the node's PointCloud2
  (``clouds.pointcloud_structured``), which ``pcl::io::loadPCDFile`` reads into a custom point type.

A save never leaves a partial file: every file is written to a hidden temporary in the target folder
and renamed into place only after all of them were written; on any error the temporaries are removed.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fast3dis_ros.core.frames import InstanceCloud
from .clouds import POINT_FIELDS, pointcloud_structured, select

__all__ = ["MapSaveError", "FORMATS", "check_output_path", "ply_bytes", "pcd_bytes", "save_cloud",
           "instance_path"]

FORMATS = (".ply", ".pcd")


class MapSaveError(ValueError):
    """A save request that cannot be honoured (bad path, empty map); the message says why."""


@dataclass(frozen=True)
class _Planned:
    path: Path
    data: bytes


def check_output_path(path: str) -> Path:
    """The output path as a ``Path`` if a map can be written there, else ``MapSaveError`` with the reason.

    Absolute paths only: a relative one would land in the node's working directory, which a service
    caller does not know."""
    if not path:
        raise MapSaveError("empty path")
    p = Path(path)
    if not p.is_absolute():
        raise MapSaveError(f"path '{path}' is not absolute")
    if p.suffix.lower() not in FORMATS:
        raise MapSaveError(f"path '{path}': unknown extension '{p.suffix}' (use one of {list(FORMATS)})")
    if p.is_dir():
        raise MapSaveError(f"path '{path}' is a directory")
    parent = p.parent
    if not parent.is_dir():
        raise MapSaveError(f"folder '{parent}' does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MapSaveError(f"folder '{parent}' is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise MapSaveError(f"file '{p}' exists and is not writable")
    return p


def ply_bytes(cloud: InstanceCloud) -> bytes:
    """Binary little-endian PLY of the cloud (one vertex per point, no faces)."""
    n = len(cloud)
    dt = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
                   ("instance", "<u4"), ("score", "<f4")])
    arr = np.empty(n, dt)
    xyz = np.asarray(cloud.xyz, np.float32).reshape(n, 3)
    rgb = np.asarray(cloud.rgb, np.uint8).reshape(n, 3)
    for i, k in enumerate("xyz"):
        arr[k] = xyz[:, i]
    for i, k in enumerate(("red", "green", "blue")):
        arr[k] = rgb[:, i]
    arr["instance"] = np.asarray(cloud.instance, np.uint32)
    arr["score"] = np.asarray(cloud.score, np.float32)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"comment fast3dis_ros instance map, frame {cloud.frame_id}, stamp_ns {int(cloud.stamp_ns)}\n"
        f"element vertex {n}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "property uint instance\nproperty float score\nend_header\n"
    )
    return header.encode("ascii") + arr.tobytes()


_PCD_TYPE = {"<f4": ("F", 4), "<u4": ("U", 4)}


def pcd_bytes(cloud: InstanceCloud) -> bytes:
    """PCD v0.7 (binary) with fields ``x y z rgb instance score``, the PointCloud2 layout of the node."""
    n = len(cloud)
    arr = pointcloud_structured(cloud)
    names = [f[0] for f in POINT_FIELDS]
    types = [_PCD_TYPE[arr.dtype.fields[k][0].str] for k in names]
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\n"
        f"# fast3dis_ros instance map, frame {cloud.frame_id}, stamp_ns {int(cloud.stamp_ns)}\n"
        "VERSION 0.7\n"
        f"FIELDS {' '.join(names)}\n"
        f"SIZE {' '.join(str(s) for _, s in types)}\n"
        f"TYPE {' '.join(t for t, _ in types)}\n"
        f"COUNT {' '.join('1' for _ in names)}\n"
        f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA binary\n"
    )
    return header.encode("ascii") + arr.tobytes()


def instance_path(path: Path, instance_id: int) -> Path:
    """``/d/map.pcd`` -> ``/d/map_instance_<id>.pcd``."""
    return path.with_name(f"{path.stem}_instance_{int(instance_id)}{path.suffix}")


def _encode(cloud: InstanceCloud, suffix: str) -> bytes:
    return ply_bytes(cloud) if suffix.lower() == ".ply" else pcd_bytes(cloud)


def save_cloud(cloud: InstanceCloud, path: str, per_instance: bool = False) -> list[Path]:
    """Write ``cloud`` to ``path`` (format from the extension) and, with ``per_instance``, one file per
    instance id > 0 next to it. Returns the files written (map first). All or nothing: raises
    ``MapSaveError`` (bad path, empty map, an OSError while writing such as a full disk) and then leaves
    no file behind."""
    out = check_output_path(path)
    if len(cloud) == 0:
        raise MapSaveError("the map is empty: nothing to save (no window fused yet, or the map was reset)")
    plan = [_Planned(out, _encode(cloud, out.suffix))]
    if per_instance:
        inst = np.asarray(cloud.instance)
        for gid in np.unique(inst[inst > 0]).tolist():
            plan.append(_Planned(instance_path(out, gid), _encode(select(cloud, np.flatnonzero(inst == gid)),
                                                                  out.suffix)))
    temps: list[tuple[str, Path]] = []
    item = plan[0]
    try:
        for item in plan:
            fd, tmp = tempfile.mkstemp(prefix=f".{item.path.name}.", suffix=".part", dir=item.path.parent)
            temps.append((tmp, item.path))
            with os.fdopen(fd, "wb") as f:
                f.write(item.data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, final in temps:
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
    except BaseException as e:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError):  # e.g. a read-only or pseudo file system, disk full
            raise MapSaveError(f"cannot write '{item.path}': {e.strerror or e}; nothing was written") from e
        raise
    return [item.path for item in plan]
