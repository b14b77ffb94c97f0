"""Keep third-party start-up chatter out of every run's output (issue 19: "every run prints library noise").

* ``depth_anything_3.cfg`` calls omegaconf's deprecated ``register_new_resolver`` at import, which prints a
  multi-line ``UserWarning``: filtered by message (only that one).
* DA3's own ``Logger`` prints ``[INFO ] using MLP layer as FFN`` for every backbone it builds, to stdout, in
  colour: its messages are routed to Python ``logging`` (logger ``depth_anything_3``) with INFO and DEBUG
  lowered to DEBUG, WARN to WARNING, ERROR to ERROR, so ``--log-level debug`` (or any logging config) still
  shows them.

Called once from ``fast3dis_ros/model/__init__.py``, before any DA3 module is imported.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_depth_anything"]

_LEVELS = {"ERROR": logging.ERROR, "WARN": logging.WARNING, "INFO": logging.DEBUG, "DEBUG": logging.DEBUG}


def quiet_depth_anything() -> bool:
    """Install the filter and the logger bridge; False when depth_anything_3 is not importable."""
    warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)
    try:
        from depth_anything_3.utils import logger as da3_logger
    except ImportError:
        return False
    target = logging.getLogger("depth_anything_3")

    def log(level_str: str, *args, **_kw) -> None:
        level = _LEVELS.get(level_str.split(":")[0].strip(), logging.INFO)
        target.log(level, " ".join(str(a) for a in args))

    da3_logger.logger.log = log
    return True
