"""Loss-weight schedules (used for the confidence-weighted overlap penalty)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class WarmupDecaySchedule:
    """Weight ``w(step)`` with linear warm-up, then decay to a floor.

    Exact definition (``s`` = step, clamped below at 0):

    * ``s < warmup``:            ``w = max_weight * s / warmup``  (0 at step 0)
    * ``warmup <= s < total``:   with ``t = (s - warmup) / (total - warmup)`` in [0, 1):
      ``cosine``: ``w = floor + (max_weight - floor) * 0.5 * (1 + cos(pi * t))``;
      ``linear``: ``w = max_weight - (max_weight - floor) * t``
    * ``s >= total``:            ``w = floor``

    The peak ``max_weight`` is reached at ``s = warmup``. ``warmup = 0`` starts at the peak;
    ``total <= warmup`` means no decay phase (floor right after warm-up).
    """

    max_weight: float = 1.0
    floor: float = 0.1
    warmup: int = 2000
    total: int = 50000
    decay: str = "cosine"  # "cosine" | "linear"

    def __post_init__(self) -> None:
        if self.decay not in ("cosine", "linear"):
            raise ValueError(f"decay must be 'cosine' or 'linear', got {self.decay!r}")
        if self.warmup < 0 or self.total < 0:
            raise ValueError("warmup and total must be >= 0")

    def __call__(self, step: int) -> float:
        s = max(float(step), 0.0)
        if s < self.warmup:
            return self.max_weight * s / self.warmup
        if s >= self.total:
            return self.floor
        t = (s - self.warmup) / (self.total - self.warmup)
        if self.decay == "cosine":
            return self.floor + (self.max_weight - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        return self.max_weight - (self.max_weight - self.floor) * t

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "WarmupDecaySchedule":
        return cls(**d)
