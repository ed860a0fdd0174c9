"""Training-time augmentation: a random crop of the landmark at a random scale, a flip, a colour change.

Positives of a landmark differ by viewpoint, distance and lighting, so the crop covers a wide range of
scales (``scale=(0.25, 1)`` of the image area by default), the flip is free (mirrored buildings still
match their own class better than other buildings), and the colour jitter is mild (a hue shift does not
turn a sandstone college into a brick one, but a strong one would make colour useless as a cue).
Every parameter is a config value; :meth:`Augmentation.from_config` rejects unknown keys by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oxford_ir.errors import ConfigError

INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}


@dataclass(frozen=True)
class Augmentation:
    """Parameters of the training transform (see :meth:`transform`)."""

    #: RandomResizedCrop: range of the crop's area as a fraction of the image, and of its aspect ratio
    scale: tuple[float, float] = (0.25, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    #: probability of a horizontal flip
    hflip: float = 0.5
    #: ColorJitter strengths (0 disables each); hue at most 0.5
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    #: resampling filter of the crop resize
    interpolation: str = "bilinear"
    #: normalisation the backbone expects
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "mean", "std"):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, tuple(float(v) for v in value))
            except (TypeError, ValueError):
                raise ConfigError(f"augmentation.{name} must be a list of numbers, got {value!r}") from None
        lo, hi = self.scale
        if len(self.scale) != 2 or not 0 < lo <= hi <= 1:
            raise ConfigError(f"augmentation.scale must be [min, max] with 0 < min <= max <= 1, got {list(self.scale)}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1] or not math.isfinite(self.ratio[1]):
            raise ConfigError(f"augmentation.ratio must be [min, max] with 0 < min <= max, got {list(self.ratio)}")
        if not 0 <= self.hflip <= 1:
            raise ConfigError(f"augmentation.hflip is a probability in [0, 1], got {self.hflip}")
        for name in ("brightness", "contrast", "saturation", "hue"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"augmentation.{name} must be >= 0 (0 disables it), got {getattr(self, name)}")
        if self.hue > 0.5:
            raise ConfigError(f"augmentation.hue must be at most 0.5, got {self.hue}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(
                f"augmentation.interpolation {self.interpolation!r} is unknown; "
                f"choose one of {', '.join(INTERPOLATIONS)}"
            )
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("augmentation.mean and augmentation.std need three values, std positive")

    @classmethod
    def from_config(cls, config: Mapping | None) -> Augmentation:
        """Build from a (possibly partial) mapping such as ``data.augmentation`` of the Hydra config."""
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ConfigError(f"unknown augmentation parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**config)

    def as_dict(self) -> dict:
        return asdict(self)

    def transform(self, image_size: int) -> T.Compose:
        """PIL RGB image -> normalised ``3 x image_size x image_size`` float tensor, randomly cropped and changed."""
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size must be a positive number of pixels, got {image_size!r}")
        steps = [
            T.RandomResizedCrop(
                image_size,
                scale=self.scale,
                ratio=self.ratio,
                interpolation=INTERPOLATIONS[self.interpolation],
                antialias=True,
            )
        ]
        if self.hflip > 0:
            steps.append(T.RandomHorizontalFlip(self.hflip))
        if any((self.brightness, self.contrast, self.saturation, self.hue)):
            steps.append(T.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)


def train_transform(image_size: int, augmentation: Mapping | None = None) -> T.Compose:
    """The training transform for crops of ``image_size`` with the parameters in ``augmentation``."""
    return Augmentation.from_config(augmentation).transform(image_size)
