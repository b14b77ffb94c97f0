"""Shared pytest set-up: keep DDS traffic on loopback and torch small on CI's 2 cores."""

import os

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

try:  # torch is a hard dependency, but keep collection of ROS-only tests independent of it
    import torch

    torch.set_num_threads(2)
except ImportError:  # pragma: no cover
    pass
