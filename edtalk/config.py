"""Model configuration: one frozen dataclass that travels with the weights."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

FAMILIES = ("edtalk", "lip_pose")

#: Channel width per resolution of the published networks (encoder and decoder share it).
OFFICIAL_WIDTHS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of an EDTalk generator.

    ``family`` is ``"edtalk"`` (mouth + pose + expression, EEM blocks; ``EDTalk.pt``) or
    ``"lip_pose"`` (mouth + pose; ``EDTalk_lip_pose.pt``). ``widths`` lists the channel width of
    every resolution from 4 up to ``size`` (4, 8, 16, ...). Official: size 256, widths
    512, 512, 512, 512, 256, 128, 64.
    """

    family: str = "edtalk"
    size: int = 256
    widths: tuple[int, ...] = field(default=tuple(OFFICIAL_WIDTHS.values()))
    style_dim: int = 512
    lip_dim: int = 20
    pose_dim: int = 6
    exp_dim: int = 10
    eem_hidden: int = 128

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        log = math.log2(self.size) if self.size > 0 else 0
        if self.size < 8 or log != int(log):
            raise ValueError(f"size must be a power of two >= 8, got {self.size}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.widths) != int(log) - 1:
            raise ValueError(f"size {self.size} needs {int(log) - 1} widths (4..{self.size}), got {len(self.widths)}")
        if self.family == "lip_pose" and self.exp_dim != 0:
            raise ValueError("the lip_pose family has no expression: exp_dim must be 0")
        if self.family == "edtalk" and self.exp_dim <= 0:
            raise ValueError("the edtalk family needs exp_dim > 0")

    @property
    def channels(self) -> dict[int, int]:
        """Width per resolution, ``{4: c4, 8: c8, ..., size: c_size}``."""
        return {4 * 2**i: w for i, w in enumerate(self.widths)}

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    @property
    def motion_dim(self) -> int:
        """Number of motion bases: mouth + pose (+ expression)."""
        return self.lip_dim + self.pose_dim + self.exp_dim

    @property
    def has_expression(self) -> bool:
        return self.family == "edtalk"

    @classmethod
    def from_channels(cls, channels: dict[int, int], **kw) -> ModelConfig:
        size = kw.pop("size", max(channels))
        widths = tuple(channels[4 * 2**i] for i in range(int(math.log2(size)) - 1))
        return cls(size=size, widths=widths, **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        return cls(**d)
