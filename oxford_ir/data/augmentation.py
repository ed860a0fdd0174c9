"""Training-time augmentation: a random crop of the landmark at a random scale, a flip, a colour change.

Positives of a landmark differ by viewpoint, distance and lighting, so the crop covers a wide range of
scales (``scale=(0.25, 1)`` of the image area by default), the flip is free (mirrored buildings still
match their own class better than other buildings), and the colour jitter is mild (a hue shift does not
turn a sandstone college into a brick one, but a strong one would make colour useless as a cue).
Every parameter is a config value; :meth:`Augmentation.from_config` rejects unknown keys by name.

Two ways to apply it, drawing the same random numbers for the same seed:

- :meth:`Augmentation.transform`: the whole transform on one PIL image (torchvision's ``RandomResizedCrop``,
  ``RandomHorizontalFlip``, ``ColorJitter`` in PIL, ``ToTensor``, ``Normalize``) under the global generator:
  the per-image reference.
- :meth:`Augmentation.draw` gives the random choices of one image for its seed (:class:`AugmentationDraw`: crop
  box, flip, colour order and factors) from a private generator, exactly those the transform makes after
  ``torch.manual_seed(seed)``. Training uses it: :class:`SeededCrop` crops, resizes and flips one image in a
  DataLoader worker (PIL, as the transform does) and sends uint8 pixels with the draw; colour jitter and
  normalisation then run on the whole batch at once on the device (:mod:`oxford_ir.data.batch_augment`). With
  ``data.decode=gpu`` the crop is batched on the device too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from oxford_ir.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from oxford_ir.errors import ConfigError

if TYPE_CHECKING:
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

#: ``augmentation.interpolation`` values -> the names of torchvision's ``InterpolationMode`` (torchvision, a second
#: of imports, is imported where an image is transformed, not by the test-time path that only validates names)
INTERPOLATIONS = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS"}


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's ``InterpolationMode`` of an ``augmentation.interpolation`` value."""
    from torchvision.transforms import InterpolationMode

    return InterpolationMode[INTERPOLATIONS[name]]


#: ColorJitter's numbering of the colour operations (its ``fn_idx``)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass(frozen=True)
class AugmentationDraw:
    """The random choices of one training crop: what ``Augmentation.transform`` draws for the same seed."""

    #: crop box in pixels of the image (as ``RandomResizedCrop.get_params`` returns it)
    top: int
    left: int
    height: int
    width: int
    flip: bool
    #: order of the colour operations (ColorJitter's ``fn_idx``: brightness, contrast, saturation, hue)
    order: tuple[int, int, int, int]
    #: factors of brightness, contrast, saturation, hue; None where that operation is disabled
    factors: tuple[float | None, float | None, float | None, float | None]


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

    @property
    def jitter_ranges(self) -> tuple[tuple[float, float] | None, ...]:
        """ColorJitter's ranges of brightness, contrast, saturation, hue; None for a disabled one (strength 0)."""
        return (
            (max(0.0, 1 - self.brightness), 1 + self.brightness) if self.brightness else None,
            (max(0.0, 1 - self.contrast), 1 + self.contrast) if self.contrast else None,
            (max(0.0, 1 - self.saturation), 1 + self.saturation) if self.saturation else None,
            (-self.hue, self.hue) if self.hue else None,
        )

    def draw(self, seed: int, height: int, width: int) -> AugmentationDraw:
        """The crop, flip and jitter of an image of ``height x width`` for ``seed``.

        The same calls, in the same order, as ``T.RandomResizedCrop``, ``T.RandomHorizontalFlip`` and
        ``T.ColorJitter`` of :meth:`transform` make on the global generator after ``torch.manual_seed(seed)``,
        made on a private generator instead, so the global random state is untouched.
        """
        g = torch.Generator().manual_seed(int(seed))
        top, left, h, w = self._crop(g, int(height), int(width))
        flip = bool(torch.rand(1, generator=g) < self.hflip) if self.hflip > 0 else False
        ranges = self.jitter_ranges
        if any(r is not None for r in ranges):
            order = tuple(int(i) for i in torch.randperm(4, generator=g))
            factors = tuple(
                None if r is None else float(torch.empty(1).uniform_(r[0], r[1], generator=g)) for r in ranges
            )
        else:
            order, factors = (0, 1, 2, 3), (None, None, None, None)
        return AugmentationDraw(top, left, h, w, flip, order, factors)

    def _crop(self, g: torch.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        """``RandomResizedCrop.get_params`` with generator ``g``."""
        scale, ratio = self.scale, self.ratio
        area = height * width
        log_ratio = torch.log(torch.tensor(ratio))  # float32, as get_params computes it: the same draws
        lo, hi = float(log_ratio[0]), float(log_ratio[1])
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
            aspect_ratio = math.exp(torch.empty(1).uniform_(lo, hi, generator=g).item())
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,), generator=g).item())
                left = int(torch.randint(0, width - w + 1, size=(1,), generator=g).item())
                return top, left, h, w
        in_ratio = width / height  # fallback: the central crop of the nearest allowed aspect ratio
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def transform(self, image_size: int) -> T.Compose:
        """PIL RGB image -> normalised ``3 x image_size x image_size`` float tensor, randomly cropped and changed.

        The per-image reference of training augmentation (global generator; see the module doc)."""
        from torchvision import transforms as T

        _check_size(image_size)
        steps = [
            T.RandomResizedCrop(
                image_size,
                scale=self.scale,
                ratio=self.ratio,
                interpolation=interpolation_mode(self.interpolation),
                antialias=True,
            )
        ]
        if self.hflip > 0:
            steps.append(T.RandomHorizontalFlip(self.hflip))
        if any((self.brightness, self.contrast, self.saturation, self.hue)):
            steps.append(T.ColorJitter(self.brightness, self.contrast, self.saturation, self.hue))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)


class SeededCrop:
    """The per-image part of training augmentation, for DataLoader workers: ``(PIL image, seed) -> (uint8
    3 x S x S tensor, draw)``.

    Crops, resizes (``augmentation.interpolation``, antialiased, as PIL resizes) and flips exactly as
    :meth:`Augmentation.transform` does for the seed (same draws, same PIL calls), without the colour jitter and
    the normalisation, which run on the whole batch on the device
    (:meth:`~oxford_ir.data.batch_augment.BatchAugmentation.finish`) with the draw's factors. Picklable.
    """

    def __init__(self, image_size: int, augmentation: Augmentation | Mapping | None = None) -> None:
        _check_size(image_size)
        self.image_size = int(image_size)
        self.augmentation = (
            augmentation if isinstance(augmentation, Augmentation) else Augmentation.from_config(augmentation)
        )

    def __call__(self, image: Image.Image, seed: int) -> tuple[torch.Tensor, AugmentationDraw]:
        d = self.augmentation.draw(seed, image.height, image.width)
        size = [self.image_size, self.image_size]
        from torchvision.transforms import functional as TF

        interpolation = interpolation_mode(self.augmentation.interpolation)
        crop = TF.resized_crop(image, d.top, d.left, d.height, d.width, size, interpolation, antialias=True)
        if d.flip:
            crop = TF.hflip(crop)
        pixels = np.asarray(crop.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous(), d

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, {self.augmentation})"


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size!r}")


def train_transform(image_size: int, augmentation: Mapping | None = None) -> T.Compose:
    """The training transform for crops of ``image_size`` with the parameters in ``augmentation``."""
    return Augmentation.from_config(augmentation).transform(image_size)
