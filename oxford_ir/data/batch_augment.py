"""Training augmentation of a whole batch as tensor operations on its device.

The random choices of each image come from its seed (:meth:`Augmentation.draw
<oxford_ir.data.augmentation.Augmentation.draw>`, the draws of the per-image transform); what is applied to the
pixels is applied to the batch at once, whatever its size:

- colour jitter (:func:`color_jitter`) with each image's own factors and order of operations: the batch is
  sorted by the operation of each step, and each operation changes a contiguous block of images with a vector
  of factors (at most 4 blocks per step, 16 in all); torchvision's tensor formulas;
- normalisation (ImageNet mean and std);
- with ``data.decode=gpu``, random resized crop and flip of the decoded images of any sizes
  (:func:`resized_crops`): the crops are gathered into one padded batch by one call and resampled by two
  batched matrix products with the antialiased filter weights of ``torchvision.transforms.v2.functional.resize``
  (bilinear or bicubic, PIL's filters, the crop's own border), the flip folded into the weights.

With ``data.decode=cpu`` the DataLoader workers crop, resize and flip each image with PIL
(:class:`~oxford_ir.data.augmentation.SeededCrop`) and send uint8 pixels (:class:`CropBatch`); the device
jitters and normalises (:meth:`BatchAugmentation.finish`). When the training device is the CPU the workers do
that too (:class:`CropCollate`), on their own batch, a few images at a time (``CPU_CHUNK``: cache-friendly).

Pixels: the draws are those of the per-image transform, so crops and flips are the same; the jitter works on
floats instead of PIL's uint8 (a difference of about a grey level), and the device resampling equals
torchvision's resize of the crop to float rounding (half a grey level in float16 on CUDA).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from oxford_ir.data.augmentation import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    SATURATION,
    Augmentation,
    AugmentationDraw,
)
from oxford_ir.errors import ConfigError

_BICUBIC_A = -0.5  # PIL's and torchvision's antialiased bicubic


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp_(min=0.0)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


#: resampling filters of :func:`resized_crops`: torchvision's antialiased filter and its support in pixels
FILTERS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "bilinear": (_bilinear, 1.0),
    "bicubic": (_bicubic, 2.0),
}
#: interpolations :func:`resized_crops` implements (PIL's Lanczos has no tensor counterpart in torchvision)
RESAMPLING = ("nearest", "bilinear", "bicubic")
#: sides of the padded crop buffer are rounded up to a multiple of this (aligned matrix products)
_ALIGN = 8
#: images a CPU worker finishes at a time: a few 362 px float images stay in the processor's cache, a whole
#: batch does not (one thread, crop from a 724 px image included: 12 to 16 ms an image in chunks of 4, 16 to
#: 24 ms for 36 at once, 17 to 20 ms for the per-image PIL transform with its uint8 jitter)
CPU_CHUNK = 4


# -- what the workers send (data.decode=cpu) ------------------------------------------------------------------
class CropItem(NamedTuple):
    """One training image as a worker sends it: cropped, resized and flipped, not yet jittered."""

    #: ``3 x S x S`` uint8 RGB pixels
    crop: torch.Tensor
    label: int
    #: the image's random choices (its colour jitter is applied on the device)
    draw: AugmentationDraw


@dataclass
class CropBatch:
    """A batch of :class:`CropItem`: ``crops`` (``B x 3 x S x S`` uint8), ``labels`` and the draws.

    ``to(device)`` (what Lightning calls) moves the pixels and labels; the draws stay Python objects.
    """

    crops: torch.Tensor
    labels: torch.Tensor
    draws: list[AugmentationDraw]

    def __len__(self) -> int:
        return len(self.draws)

    @property
    def device(self) -> torch.device:
        return self.crops.device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropBatch:
        return CropBatch(
            self.crops.to(device, non_blocking=non_blocking),
            self.labels.to(device, non_blocking=non_blocking),
            self.draws,
        )

    def pin_memory(self) -> CropBatch:
        """Page-locked copies (DataLoader ``pin_memory=True``): asynchronous copies to the GPU."""
        return CropBatch(self.crops.pin_memory(), self.labels.pin_memory(), self.draws)


def collate_crops(items: Sequence[CropItem]) -> CropBatch:
    """:class:`CropItem` list -> :class:`CropBatch` (one stack of the pixels)."""
    if len(items) == 0:
        raise ValueError("cannot collate an empty batch")
    return CropBatch(
        torch.stack([item.crop for item in items]),
        torch.tensor([int(item.label) for item in items], dtype=torch.long),
        [item.draw for item in items],
    )


class CropCollate:
    """DataLoader ``collate_fn`` of the training crops: a :class:`CropBatch`, or with ``finish`` (training on
    the CPU) the finished ``(images, labels)``: the worker jitters and normalises its own batch, ``CPU_CHUNK``
    images at a time (the same values as the whole batch at once). Picklable."""

    def __init__(self, finish: BatchAugmentation | None = None) -> None:
        self.finish = finish

    def __call__(self, items: Sequence[CropItem]) -> CropBatch | tuple[torch.Tensor, torch.Tensor]:
        batch = collate_crops(items)
        if self.finish is None:
            return batch
        images = torch.empty(batch.crops.shape, dtype=torch.float32)
        for i in range(0, len(batch), CPU_CHUNK):
            chunk = slice(i, i + CPU_CHUNK)
            images[chunk] = self.finish.finish(batch.crops[chunk], batch.draws[chunk])
        return images, batch.labels

    def __repr__(self) -> str:
        return f"{type(self).__name__}(finish={self.finish!r})"


# -- colour jitter ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JitterPlan:
    """How :func:`color_jitter` applies the draws of a batch, worked out on the host (no device round trip).

    For step ``k`` (0-3), the batch is reordered by ``gathers[k]`` (None: already in order) so that the images
    whose k-th operation is the same are contiguous; ``blocks[k]`` lists ``(operation, start, stop)``, and
    ``factors[k, start:stop]`` are those images' factors. ``gathers[4]`` restores the batch order.
    """

    gathers: tuple[np.ndarray | None, ...]
    blocks: tuple[tuple[tuple[int, int, int], ...], ...]
    factors: np.ndarray

    @property
    def empty(self) -> bool:
        return not any(self.blocks)

    @classmethod
    def from_draws(cls, draws: Sequence[AugmentationDraw]) -> JitterPlan:
        n = len(draws)
        order = np.array([d.order for d in draws], dtype=np.int64).reshape(n, 4)
        factors = np.array([[np.nan if f is None else f for f in d.factors] for d in draws], dtype=np.float32).reshape(
            n, 4
        )
        rows = np.arange(n)
        current = rows.copy()  # current[i]: the image at position i
        gathers: list[np.ndarray | None] = []
        blocks: list[tuple[tuple[int, int, int], ...]] = []
        step_factors = np.full((4, n), np.nan, dtype=np.float32)
        for step in range(4):
            ops = order[:, step]
            active = ~np.isnan(factors[rows, ops])
            key = np.where(active, ops, 4)[current]  # 4: nothing to do at this step
            if not active.any():
                gathers.append(None)
                blocks.append(())
                continue
            local = np.argsort(key, kind="stable")
            identity = bool((local == rows).all())
            gathers.append(None if identity else local)
            current = current[local]
            key = key[local]
            step_factors[step] = factors[current, ops[current]]
            bounds = np.searchsorted(key, np.arange(5))
            blocks.append(
                tuple((op, int(bounds[op]), int(bounds[op + 1])) for op in range(4) if bounds[op + 1] > bounds[op])
            )
        restore = np.argsort(current, kind="stable")
        gathers.append(None if bool((restore == rows).all()) else restore)
        return cls(tuple(gathers), tuple(blocks), step_factors)


def color_jitter(images: torch.Tensor, draws: Sequence[AugmentationDraw] | JitterPlan) -> torch.Tensor:
    """``ColorJitter`` on a ``B x 3 x H x W`` float batch in [0, 1] with each image's own order and factors.

    Equals torchvision's ``adjust_brightness``/``contrast``/``saturation``/``hue`` applied per image in its order
    (to float rounding). The batch may be changed in place; use the returned tensor.
    """
    plan = draws if isinstance(draws, JitterPlan) else JitterPlan.from_draws(draws)
    if plan.empty:
        return images
    device = images.device
    factors = _to_device(plan.factors, device).to(images.dtype)
    for step, blocks in enumerate(plan.blocks):
        if plan.gathers[step] is not None:
            images = images.index_select(0, _to_device(plan.gathers[step], device))
        for op, start, stop in blocks:
            _OPERATIONS[op](images[start:stop], factors[step, start:stop].view(-1, 1, 1, 1))
    if plan.gathers[4] is not None:
        images = images.index_select(0, _to_device(plan.gathers[4], device))
    return images


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device`` without waiting for the device (the copy is staged by the driver)."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale`` (ITU-R 601-2 luma), ``N x 1 x H x W``."""
    r, g, b = images.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _blend_(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> None:
    """torchvision's ``_blend``, in place: ``images * f + other * (1 - f)`` clamped to [0, 1]."""
    images.mul_(factors).add_(other.mul(1.0 - factors)).clamp_(0.0, 1.0)


def _brightness_(images: torch.Tensor, factors: torch.Tensor) -> None:
    images.mul_(factors).clamp_(0.0, 1.0)


def _contrast_(images: torch.Tensor, factors: torch.Tensor) -> None:
    _blend_(images, _grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), factors)


def _saturation_(images: torch.Tensor, factors: torch.Tensor) -> None:
    _blend_(images, _grayscale(images), factors)


def _hue_(images: torch.Tensor, factors: torch.Tensor) -> None:
    """Rotate the hue of each image by its factor (in turns), as torchvision's RGB -> HSV, shift, HSV -> RGB.

    In one pass over the planes: with ``v = max``, ``c = max - min`` and ``6 h`` from the largest channel (red
    first, then green), HSV -> RGB gives channel ``n`` (5, 3, 1 for R, G, B) as ``v - c clamp(min(k, 4 - k), 0,
    1)``, ``k = (n + 6 h) mod 6``: torchvision's sextant table without building the HSV image.
    """
    r, g, b = images.unbind(dim=-3)
    v = images.amax(dim=-3)
    c = v - images.amin(dim=-3)
    grey = c == 0
    hue6 = torch.where(r == v, g - b, torch.where(g == v, (b - r).add_(c, alpha=2.0), (r - g).add_(c, alpha=4.0)))
    hue6 = hue6.div_(torch.where(grey, torch.ones_like(c), c))
    hue6 = hue6.add_(factors.view(-1, 1, 1), alpha=6.0).remainder_(6.0)
    for channel, n in zip(images.unbind(dim=-3), (5.0, 3.0, 1.0), strict=True):
        k = torch.remainder(hue6 + n, 6.0)
        torch.addcmul(v, c, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), value=-1.0, out=channel)
    images.clamp_(0.0, 1.0)


_OPERATIONS: dict[int, Callable[[torch.Tensor, torch.Tensor], None]] = {
    BRIGHTNESS: _brightness_,
    CONTRAST: _contrast_,
    SATURATION: _saturation_,
    HUE: _hue_,
}


# -- random resized crop of decoded images (data.decode=gpu) -------------------------------------------------
def resample_weights(
    lengths: torch.Tensor, size: int, padded: int, interpolation: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``B x size x padded`` matrices resizing each row's first ``lengths[b]`` pixels to ``size``.

    torchvision's antialiased ``resize`` of a tensor (the weights of ``interpolate(..., antialias=True)``, which are
    PIL's): output pixel ``i`` is centred at ``scale * (i + 0.5)``, ``scale = length / size``, the filter widened
    by ``scale`` when shrinking, cut at the crop's border and normalised. ``nearest``: ``interpolate``'s
    ``floor(i * scale)``. Zero beyond ``lengths[b]`` (padding).
    """
    if interpolation not in RESAMPLING:
        raise ConfigError(f"interpolation {interpolation!r}: batched resizing knows {', '.join(RESAMPLING)}")
    device = lengths.device
    length = lengths.to(torch.float32).view(-1, 1, 1)
    scale = length / size
    i = torch.arange(size, device=device, dtype=torch.float32).view(1, -1, 1)
    j = torch.arange(padded, device=device, dtype=torch.float32).view(1, 1, -1)
    if interpolation == "nearest":
        source = torch.minimum(torch.floor(i * scale), length - 1)
        return (j == source).to(dtype)
    filter_fn, support = FILTERS[interpolation]
    shrink = scale >= 1.0
    support = torch.where(shrink, support * scale, torch.full_like(scale, support))
    invscale = torch.where(shrink, 1.0 / scale, torch.ones_like(scale))
    center = scale * (i + 0.5)
    low = torch.trunc(center - support + 0.5).clamp_(min=0.0)
    high = torch.minimum(torch.trunc(center + support + 0.5), length)
    weights = filter_fn((j - center + 0.5) * invscale)
    weights = torch.where((j >= low) & (j < high), weights, torch.zeros_like(weights))
    total = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(total == 0, torch.ones_like(total), total)
    return weights.to(dtype)


def resized_crops(
    images: Sequence[torch.Tensor],
    draws: Sequence[AugmentationDraw],
    size: int,
    interpolation: str = "bilinear",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``B x 3 x size x size`` float32 crops (values in [0, 255]) of ``3 x H_i x W_i`` uint8 images of any sizes.

    Each image is cropped to its draw's box, resized to ``size x size`` as torchvision's antialiased ``resize``
    of the crop, and flipped where its draw says so: ``RandomResizedCrop`` + ``RandomHorizontalFlip`` of the
    whole batch. The crops are copied into one padded buffer (one ``_foreach_copy_`` call) and resampled by two
    batched matrix products in ``dtype`` (default: float16 on CUDA, tensor cores, pixels within half a grey
    level; float32 elsewhere); the flip reverses the horizontal weights.
    """
    if len(images) != len(draws):
        raise ValueError(f"{len(images)} images but {len(draws)} draws")
    if not images:
        raise ValueError("resized_crops needs at least one image")
    device = images[0].device
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    heights = [d.height for d in draws]
    widths = [d.width for d in draws]
    rows, cols = _aligned(max(heights)), _aligned(max(widths))
    n = len(images)
    # B x H x 3 x W: both products then run on plain 3-D views, without transposing the crops
    buffer = torch.empty(n, rows, 3, cols, dtype=torch.uint8, device=device)
    targets = [buffer[b, : d.height, :, : d.width] for b, d in enumerate(draws)]
    sources = [
        image[:, d.top : d.top + d.height, d.left : d.left + d.width].permute(1, 0, 2)
        for image, d in zip(images, draws, strict=True)
    ]
    torch._foreach_copy_(targets, sources)  # one call, whatever B (the padding is never read: zero weights)
    geometry = _to_device(np.array([heights, widths, [d.flip for d in draws]], dtype=np.float32), device)
    vertical = resample_weights(geometry[0], size, rows, interpolation, dtype)  # B x S x rows
    horizontal = resample_weights(geometry[1], size, cols, interpolation, dtype)  # B x S x cols
    flips = geometry[2].view(-1, 1, 1) > 0
    horizontal = torch.where(flips, horizontal.flip(1), horizontal)
    pixels = buffer.to(dtype)
    across = torch.bmm(pixels.view(n, rows * 3, cols), horizontal.transpose(1, 2))  # B x (rows*3) x S
    out = torch.bmm(vertical, across.view(n, rows, 3 * size))  # B x S x (3*S)
    out = out.view(n, size, 3, size).permute(0, 2, 1, 3)
    return out.to(torch.float32, memory_format=torch.contiguous_format).clamp_(0.0, 255.0)


def _aligned(n: int) -> int:
    return -(-int(n) // _ALIGN) * _ALIGN


# -- the whole batch -------------------------------------------------------------------------------------------
class BatchAugmentation:
    """Device half of training augmentation: batch of crops -> ``B x 3 x S x S`` normalised float32 images.

    :meth:`finish`: jitter and normalise uint8 crops made by :class:`~oxford_ir.data.augmentation.SeededCrop`;
    :meth:`crop_and_finish`: crop, resize and flip decoded images of any sizes first (``data.decode=gpu``).
    Holds plain values only (picklable: DataLoader workers use it when training on the CPU).
    """

    def __init__(self, image_size: int, augmentation: Augmentation | Mapping[str, Any] | None = None) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"image_size must be a positive number of pixels, got {image_size!r}")
        self.image_size = image_size
        self.augmentation = (
            augmentation if isinstance(augmentation, Augmentation) else Augmentation.from_config(augmentation)
        )
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "augmentation": self.augmentation}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["image_size"], state["augmentation"])

    def finish(self, crops: torch.Tensor, draws: Sequence[AugmentationDraw]) -> torch.Tensor:
        """``B x 3 x S x S`` uint8 crops (on any device) -> colour-jittered, normalised float32 images there."""
        if crops.ndim != 4 or crops.shape[1] != 3 or len(draws) != crops.shape[0]:
            raise ValueError(f"expected B x 3 x H x W crops and B draws, got {tuple(crops.shape)} and {len(draws)}")
        images = crops.to(torch.float32).div_(255.0)
        return self._normalise_(color_jitter(images, draws))

    def crop_and_finish(self, images: Sequence[torch.Tensor], draws: Sequence[AugmentationDraw]) -> torch.Tensor:
        """Decoded ``3 x H_i x W_i`` uint8 images -> cropped, resized, flipped, jittered, normalised batch."""
        crops = resized_crops(images, draws, self.image_size, self.augmentation.interpolation).div_(255.0)
        return self._normalise_(color_jitter(crops, draws))

    def prepare(self, batch: CropBatch, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A :class:`CropBatch` -> ``(images, labels)`` on ``device`` (default: where the batch is)."""
        if device is not None:
            batch = batch.to(device, non_blocking=True)
        return self.finish(batch.crops, batch.draws), batch.labels

    def _normalise_(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self._mean_std(images.device)
        return images.sub_(mean).div_(std)

    def _mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation constants on ``device``, copied there once (no per-batch host-device copy)."""
        constants = self._constants.get(device)
        if constants is None:
            with self._lock:
                a = self.augmentation
                constants = tuple(
                    torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device) for v in (a.mean, a.std)
                )
                self._constants[device] = constants
        return constants

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, {self.augmentation})"


def check_resampling(interpolation: str) -> None:
    """ConfigError unless ``interpolation`` can be applied by :func:`resized_crops` (data.decode=gpu)."""
    if interpolation not in RESAMPLING:
        raise ConfigError(
            f"augmentation.interpolation={interpolation} has no tensor implementation, so data.decode=gpu cannot use "
            "it; set augmentation.interpolation to bilinear or bicubic, or data.decode=cpu"
        )


__all__ = [
    "BatchAugmentation",
    "CropBatch",
    "CropCollate",
    "CropItem",
    "JitterPlan",
    "check_resampling",
    "collate_crops",
    "color_jitter",
    "resample_weights",
    "resized_crops",
]
