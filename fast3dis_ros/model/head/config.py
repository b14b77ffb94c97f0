"""Configuration of the FAST3DIS instance head (pixel decoder + anchored query decoder).

`InstanceHeadConfig` is embedded by `model/config.py` (`Fast3disConfig`); it round-trips through
plain dicts (`to_dict` / `from_dict`) so checkpoints can store it as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class InstanceHeadConfig:
    """Hyper-parameters of `InstanceHead`.

    Shapes: the backbone gives 4 taps, each ``(B, V, in_channels[i], h, w)`` with ``h = H // patch_size``.
    Mask logits come out at ``(H // mask_stride, W // mask_stride)``.
    Lengths in the anchor/offset fields are in *normalised scene units* (see `anchors.py`):
    one unit = the median distance of the scene's points to their coordinate-wise median.
    """

    in_channels: list[int] = field(default_factory=lambda: [1024, 1024, 1024, 1024])
    patch_size: int = 14
    # pixel decoder (DPT-style)
    reassemble_channels: list[int] = field(default_factory=lambda: [256, 512, 1024, 1024])
    hidden_dim: int = 256
    mask_dim: int = 256
    mask_stride: int = 4  # mask logits at (H // mask_stride, W // mask_stride)
    geometry_fourier_bands: int = 4  # Fourier bands of the injected normalised point map
    num_feature_levels: int = 3  # levels used by cross-attention: 1/2x, 1x, 2x patch resolution
    view_chunk: int = 0  # >0: run the per-view pixel decoder on chunks of this many images
    # queries / anchors
    num_queries: int = 80
    anchor_init_range: float = 1.0  # anchors init uniform in [-r, r]^3 (normalised units)
    fourier_bands: int = 8  # Fourier PE of anchors: freqs pi/2 * 2^k, k < fourier_bands
    # decoder
    num_decoder_layers: int = 6
    num_heads: int = 8
    num_sampling_points: int = 4  # learned 3D offsets around each anchor, per head
    offset_init_radius: float = 0.05  # initial radius of the sampling offsets (normalised units)
    dim_feedforward: int = 1024
    dropout: float = 0.0
    # scene normalisation
    depth_eps: float = 1e-4  # points with camera z <= eps are "behind" the camera

    def __post_init__(self) -> None:
        if len(self.in_channels) != 4:
            raise ValueError(f"in_channels needs 4 entries (one per backbone tap), got {self.in_channels}")
        if len(self.reassemble_channels) != 4:
            raise ValueError(f"reassemble_channels needs 4 entries, got {self.reassemble_channels}")
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(f"hidden_dim {self.hidden_dim} not divisible by num_heads {self.num_heads}")
        if not 1 <= self.num_feature_levels <= 3:
            raise ValueError("num_feature_levels must be 1, 2 or 3")
        if self.num_decoder_layers < 1:
            raise ValueError("num_decoder_layers must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InstanceHeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown InstanceHeadConfig keys: {unknown}")
        d = dict(d)
        for k in ("in_channels", "reassemble_channels"):
            if k in d:
                d[k] = list(d[k])
        return cls(**d)

    @classmethod
    def tiny(cls, in_channels: list[int] | None = None) -> "InstanceHeadConfig":
        """A few-thousand-parameter head that builds and runs in milliseconds on CPU (tests)."""
        return cls(
            in_channels=list(in_channels) if in_channels is not None else [32, 32, 32, 32],
            reassemble_channels=[16, 24, 32, 32],
            hidden_dim=32,
            mask_dim=32,
            geometry_fourier_bands=2,
            num_queries=16,
            fourier_bands=4,
            num_decoder_layers=2,
            num_heads=4,
            num_sampling_points=2,
            dim_feedforward=64,
        )
